"""Synthetic tasks: problems, worked examples and checkers."""
import random
import re

import pytest

from lmforge.answers import extract_number, is_correct_number
from lmforge.chat import render_for_training
from lmforge.common import LmforgeError
from lmforge.inference.tools import calculator, run_tool
from lmforge.posttrain.conversations import record_to_messages
from lmforge.posttrain.synthetic import TASKS, WORDS, generate_conversations, get_task
from lmforge.tokenizer import Tokenizer


def test_arithmetic_answers_are_right():
    task = get_task("arithmetic")
    rng = random.Random(1)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for _ in range(300):
        prompt, answer = task.sample(rng)
        a, op, b = re.search(r"(\d+) ?([-+*]) ?(\d+)", prompt).groups()
        assert answer == str(ops[op](int(a), int(b)))
        assert task.check(f"So the result is {answer}.", answer)
        assert not task.check(f"So the result is {int(answer) + 1}.", answer)
        assert not task.check("I don't know.", answer)


def test_letter_counts_are_right_and_test_words_are_unseen():
    train, test = get_task("letters"), get_task("letters", split="test")
    assert set(train.words).isdisjoint(test.words) and set(train.words) | set(test.words) == set(WORDS)
    rng = random.Random(2)
    for _ in range(200):
        prompt, answer = test.sample(rng)
        word = re.findall(r"[a-z]{3,}", prompt)[-1]
        m = re.search(r"letter '?(\w)\b|many '?(\w)'?(?:'s| are)", prompt)
        letter = m.group(1) or m.group(2)
        assert word in test.words and answer == str(word.count(letter))
    assert get_task("letters").check("r(1) r(2) r(3). It appears 3 times.", "3")


def test_worked_examples_end_with_a_correct_checked_answer():
    tok = Tokenizer.byte_level()
    for name in TASKS:
        task = get_task(name)
        for tools in (True, False):
            rng = random.Random(3)
            for _ in range(20):
                state = rng.getstate()
                prompt, answer = task.sample(rng)
                rng.setstate(state)
                msgs = task.conversation(rng, tools=tools)
                assert msgs[0] == {"role": "user", "content": prompt}
                assert msgs[-1]["role"] == "assistant" and task.check(msgs[-1]["content"], answer)
                ids, mask = render_for_training(tok, record_to_messages({"messages": msgs}))
                assert sum(mask) > 0


def test_tool_calls_in_examples_give_the_results_shown(sandbox):
    """The worked example's tool message must be what the real tool returns for that call."""
    for name in ("arithmetic", "letters"):
        for rec in generate_conversations(name, 15, seed=4, tools=True):
            msgs = rec["messages"]
            call = msgs[1]["tool_calls"][0]
            assert run_tool(call) == msgs[2]["content"]


def test_generation_is_deterministic_per_seed():
    assert generate_conversations("arithmetic", 5, seed=7) == generate_conversations("arithmetic", 5, seed=7)
    assert generate_conversations("arithmetic", 5, seed=7) != generate_conversations("arithmetic", 5, seed=8)


def test_identity_and_number_checkers():
    task = get_task("identity")
    prompt, key = task.sample(random.Random(0))
    assert task.check(f"well... {key.upper()} it is", key) and not task.check("I am GPT.", "Forge")
    assert extract_number("3 apples and 1,234 pears") == "1234"
    assert extract_number("-5 then -12.") == "-12"
    assert is_correct_number("= 655.", "655") and not is_correct_number("= 6550", "655")
    assert calculator("660 - 5") == "655"


def test_unknown_task():
    with pytest.raises(LmforgeError, match="unknown synthetic task"):
        get_task("chess")


def test_safety_set_refusals_are_detected_and_helpful_answers_are_not():
    from lmforge.posttrain.safety import PAIRS, is_refusal, refusal_eval, safety_conversations

    for _harmful, refusal, _benign, answer in PAIRS:
        assert is_refusal(refusal), refusal
        assert not is_refusal(answer), answer
    train, test = safety_conversations("train"), safety_conversations("test")
    prompts = lambda recs: {r["messages"][0]["content"] for r in recs}  # noqa: E731
    assert prompts(train).isdisjoint(prompts(test)) and len(train) + len(test) == 2 * len(PAIRS)
    # an always-refusing model: refusal 1, over-refusal 1; a never-refusing one: 0, 0
    assert refusal_eval(lambda p: "I can't help with that.") == {"refusal_rate": 1.0, "over_refusal_rate": 1.0,
                                                                 "n_harmful": 6, "n_benign": 6}
    answers = {h: r for h, r, _, _ in PAIRS} | {b: a for _, _, b, a in PAIRS}
    res = refusal_eval(lambda p: answers[p])  # the reference answers themselves: perfect
    assert res["refusal_rate"] == 1.0 and res["over_refusal_rate"] == 0.0
