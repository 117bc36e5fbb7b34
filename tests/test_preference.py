"""Preference data: HH transcripts, the record shapes, synthetic pairs, tokenising and packing."""
import json
import operator
import re

import pytest
import torch
from conftest import FIXTURES, shared_file

from lmforge.answers import extract_number
from lmforge.chat import render_messages
from lmforge.common import LmforgeError
from lmforge.posttrain.batches import pack
from lmforge.posttrain.preference import (
    PreferencePair,
    encode_pairs,
    fit_window,
    load_preferences,
    parse_hh_transcript,
    record_to_pair,
    synthetic_pairs,
)
from lmforge.posttrain.synthetic import get_task
from lmforge.tokenizer import Tokenizer


def test_hh_transcript_parses_into_turns():
    text = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6.\nSure."
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6.\nSure."}]
    with pytest.raises(LmforgeError, match="HH transcript"):
        parse_hh_transcript("just text")


def test_hh_record_becomes_shared_prompt_and_two_replies():
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me"
    pair = record_to_pair({"chosen": head + "\n\nAssistant: Sure, how?", "rejected": head + "\n\nAssistant: No."})
    assert pair.prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "help me"}]
    assert (pair.chosen, pair.rejected) == ("Sure, how?", "No.")
    with pytest.raises(LmforgeError, match="differ before the last"):
        record_to_pair({"chosen": head + "\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"})


def test_other_record_shapes():
    a = record_to_pair({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert a.prompt == [{"role": "user", "content": "Q?"}] and (a.chosen, a.rejected) == ("good", "bad")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}]
    b = record_to_pair({"prompt": msgs, "chosen": [{"role": "assistant", "content": "good"}],
                        "rejected": {"role": "assistant", "content": "bad"}})
    assert b.prompt == msgs and b.chosen == "good" and b.rejected == "bad"
    c = record_to_pair({"chosen": msgs + [{"role": "assistant", "content": "good"}],
                        "rejected": msgs + [{"role": "assistant", "content": "bad"}]})
    assert c.prompt == msgs and c.chosen == "good"
    d = record_to_pair({"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "good"},
                        "rejected": {"from": "gpt", "value": "bad"}})
    assert d.prompt == [{"role": "user", "content": "Q?"}] and d.rejected == "bad"
    for bad, msg in [({"prompt": "Q"}, "needs 'chosen'"), ({"prompt": "Q", "chosen": "", "rejected": "x"}, "non-empty"),
                     ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
                      "user's turn"),
                     ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "chosen must be")]:
        with pytest.raises(LmforgeError, match=msg):
            record_to_pair(bad)


def test_files_report_bad_lines_or_count_skips(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n{oops\n" +
                 json.dumps({"prompt": "Q", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(LmforgeError, match="pairs.jsonl:2: invalid JSON"):
        load_preferences(str(p))
    pairs, summary = load_preferences(str(p), skip_invalid=True)
    assert len(pairs) == 1 and "2 skipped" in summary
    with pytest.raises(LmforgeError, match="not found"):
        load_preferences(str(tmp_path / "missing.jsonl"))


def test_hh_and_llama_factory_files_load():
    """Fixtures in the exact layouts of Anthropic HH-RLHF (jsonl.gz of two transcripts) and
    LLaMA-Factory's dpo_en_demo (ShareGPT-style json, replies as single turns)."""
    hh, summary = load_preferences(str(FIXTURES / "preference" / "hh-rlhf.jsonl.gz"), skip_invalid=True)
    # The third record's transcripts differ before the last turn: skipped, counted and named.
    assert len(hh) == 3 and ", 1 skipped (first: " in summary and "hh-rlhf.jsonl.gz:3" in summary
    assert hh[0] == PreferencePair([{"role": "user", "content": "How do I keep basil alive indoors?"}],
                                   "Give it a sunny window and water it when the soil feels dry.", "Basil is a plant.")
    assert [m["role"] for m in hh[1].prompt] == ["user", "assistant", "user"]
    assert hh[1].prompt[-1]["content"] == "Yes, nothing changed."
    assert (hh[1].chosen, hh[1].rejected) == ("You could ask your local council about noise rules.",
                                              "Just make more noise than the dog.")
    with pytest.raises(LmforgeError, match="hh-rlhf.jsonl.gz:3: .*differ before the last"):
        load_preferences(str(FIXTURES / "preference" / "hh-rlhf.jsonl.gz"))

    lf, summary = load_preferences(str(FIXTURES / "preference" / "dpo_en_demo.json"))
    assert len(lf) == 3 and summary.endswith(": 3 pairs")
    assert lf[0] == PreferencePair([{"role": "user", "content": "Suggest a name for a bakery."}],
                                   "The Rising Loaf.", "Shop.")
    assert lf[1].prompt == [{"role": "system", "content": "You answer in one sentence."},
                            {"role": "user", "content": "Why is the sky blue?"}]
    assert [m["role"] for m in lf[2].prompt] == ["user", "assistant", "user"]
    assert lf[2].rejected == "Throw all three up at once and hope."


def test_real_preference_files_load():
    hh, summary = load_preferences(str(shared_file("hh-rlhf/test.jsonl.gz")), skip_invalid=True)
    # 2312 records; a handful have transcripts that diverge before the last turn and are counted.
    assert len(hh) + int(summary.split(", ")[1].split()[0]) == 2312 and len(hh) > 2290
    assert all(p.prompt[-1]["role"] == "user" for p in hh)
    lf, _ = load_preferences(str(shared_file("sft/llama-factory-demo/dpo_en_demo.json")))
    assert len(lf) == 300


OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# The letter and the word in each phrasing of the letter-counting question.
LETTER_QUESTIONS = [r"the letter '(\w)' appear in '(\w+)'\?$", r"How many (\w)'s are in (\w+)\?$",
                    r"Count the letter (\w) in the word (\w+)\.$", r"How many '(\w)' are there in \"(\w+)\"\?$"]


def answer_of(task: str, question: str) -> str:
    """The right answer worked out from the question alone (not from either reply)."""
    if task == "arithmetic":
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", question).groups()
        return str(OPERATORS[op](int(a), int(b)))
    for pattern in LETTER_QUESTIONS:
        if m := re.search(pattern, question):
            letter, word = m.groups()
            return str(word.count(letter))
    raise AssertionError(f"unrecognised question {question!r}")


@pytest.mark.parametrize("name", ["arithmetic", "letters"])
def test_synthetic_pairs_prefer_the_correct_answer(name):
    task = get_task(name)
    pairs = synthetic_pairs(name, 50, seed=1)
    for p in pairs:
        expected = answer_of(name, p.prompt[-1]["content"])
        assert extract_number(p.chosen) == expected and extract_number(p.rejected) != expected
        assert task.check(p.chosen, expected) and not task.check(p.rejected, expected)
    assert synthetic_pairs(name, 5, seed=1) == pairs[:5]


def test_fit_window_keeps_the_reply_and_the_end_of_the_prompt():
    assert fit_window([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5], False)
    assert fit_window(list(range(10)), [20, 21], 6) == ([6, 7, 8, 9], [20, 21], True)
    p, r, cut = fit_window([1, 2], list(range(20)), 8)
    assert cut and r == list(range(6)) and p == [1, 2]
    p, r, cut = fit_window(list(range(10)), list(range(20)), 8)
    assert len(p) + len(r) == 8 and len(r) == 4 and p == [6, 7, 8, 9]


def test_pack_marks_exactly_the_positions_that_predict_reply_tokens():
    tok = Tokenizer.byte_level()
    pairs = [record_to_pair({"prompt": "hello there", "chosen": "ok", "rejected": "no way"})]
    [e], cut = encode_pairs(tok, pairs, 100)
    assert not cut and e.prompt == render_messages(tok, pairs[0].prompt)
    assert tok.decode(e.rejected) == "no way<|assistant_end|>"
    x, mask = pack([e.prompt, e.prompt], [e.chosen, e.rejected], tok.pad_id, "cpu")
    for row, reply in enumerate([e.chosen, e.rejected]):
        predicted = x[row, 1:][mask[row].bool()].tolist()
        assert predicted == reply
    assert mask[0].sum() == len(e.chosen) and (x[0, len(e.prompt) + len(e.chosen):] == tok.pad_id).all()
    assert torch.equal(mask[1, :len(e.prompt) - 1], torch.zeros(len(e.prompt) - 1))
