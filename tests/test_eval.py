"""Evaluation: scoring agrees with a direct transformers computation, random models score at chance,
task formats follow lm-evaluation-harness, perplexity / bits per byte agree with sampling.score_text,
GSM8K grading, BLEU/ROUGE, the judge (local model and a fake OpenAI-compatible server), the report
card and the CLI."""
from __future__ import annotations

import bz2
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, shared_data, shared_file

from lmforge.common import LmforgeError
from lmforge.eval.harness import HFModel, LmforgeModel, encode_pair, load_eval_model, loglikelihoods
from lmforge.eval.multiple_choice import centred, evaluate_multiple_choice, fewshot_prefix
from lmforge.eval.tasks import (
    MC_TASKS,
    DataUnavailable,
    MCItem,
    arc_item,
    hellaswag_item,
    hellaswag_preprocess,
    hub_unreachable,
    load_gsm8k,
    load_mc_task,
    mmlu_item,
)
from lmforge.models.transformer import GPT, get_config
from lmforge.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- fixture data


def build_data_root(dest: Path) -> Path:
    """tests/fixtures/eval (a few hand-written items per benchmark, in the layout and formats of
    the shared data) copied to dest, with the HellaSwag text bz2-compressed as the real file is."""
    shutil.copytree(FIXTURES / "eval", dest, dirs_exist_ok=True)
    text = dest / "hellaswag" / "hellaswag_val_full.txt"
    (dest / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(text.read_bytes()))
    text.unlink()
    return dest


def build_hub_mirror(dest: Path) -> Path:
    """tests/fixtures/hub laid out as the hub serves it: every `X.parquet.jsonl` (the rows, as
    JSON lines) becomes the parquet file X, next to the dataset cards (README.md with `configs:`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for src in sorted((FIXTURES / "hub").rglob("*")):
        if src.is_file():
            out = dest / src.relative_to(FIXTURES / "hub")
            out.parent.mkdir(parents=True, exist_ok=True)
            if src.name.endswith(".parquet.jsonl"):
                rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
                pq.write_table(pa.Table.from_pylist(rows), out.with_suffix(""))
            else:
                shutil.copy(src, out)
    return dest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return build_data_root(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory) -> Path:
    return build_hub_mirror(tmp_path_factory.mktemp("hub_mirror"))


def _set_hub_offline(monkeypatch, offline: bool) -> None:
    """huggingface_hub and datasets read HF_HUB_OFFLINE when imported: set the variable and their copies."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("LMFORGE_HUB_MIRROR", raising=False)


@pytest.fixture
def offline_hub(monkeypatch):
    """HF_HUB_OFFLINE=1: nothing may touch the network."""
    _set_hub_offline(monkeypatch, True)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A hub endpoint that refuses connections (a closed local port), not in offline mode: what a
    machine without network looks like to the reachability check, on any machine."""
    from huggingface_hub import constants

    _set_hub_offline(monkeypatch, False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


@pytest.fixture(scope="module")
def bpe(corpus_text):
    """A small BPE tokenizer with real merges, so tokenization of context + continuation is not
    simply the concatenation of the parts (the case lm-eval's split rule exists for)."""
    return Tokenizer.train(iter([corpus_text]), 512, show_progress=False)


def tiny_lm(tok, block_size=1024, seed=0) -> LmforgeModel:
    torch.manual_seed(seed)
    return LmforgeModel(GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=block_size)), tok)


def sample_requests(root, n_items=3) -> list[tuple[str, str]]:
    reqs = []
    for task in ("hellaswag", "arc_easy", "mmlu", "winogrande"):
        for item in load_mc_task(task, root, "local")[:n_items]:
            reqs += list(zip(item.contexts, item.continuations))
    return reqs + [("Answer: ", "yes"), ("The end", ".")]  # trailing space moves; a one-token continuation


# ----------------------------------------------------------------------------- independent reference


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe):
    """A random LlamaForCausalLM built with transformers, saved with an lmforge-layout tokenizer."""
    transformers = pytest.importorskip("transformers")
    from lmforge.hf import hf_tokenizer_files

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=bpe.bos_id, eos_token_id=bpe.bos_id,
                                   initializer_range=0.2)  # large enough that choices really differ
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(d)
    for name, data in hf_tokenizer_files(bpe, get_config("tiny", block_size=256)).items():
        (d / name).write_bytes(data)
    return d


def direct_transformers(hf_dir, requests) -> list[float]:
    """log p(continuation | context) the plain way: transformers' own tokenizer (which adds the
    document start), one forward per request, lm-eval's split of the joint tokenization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = []
    for ctx, cont in requests:
        stripped = ctx.rstrip()
        cont = ctx[len(stripped):] + cont
        ctx_ids = tok(stripped)["input_ids"]
        whole = tok(stripped + cont)["input_ids"]
        n = len(whole) - len(ctx_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
        out.append(sum(logp[len(whole) - 1 - n + i, whole[len(whole) - n + i]].item() for i in range(n)))
    return out


def test_loglikelihoods_equal_direct_transformers(hf_dir, tmp_path, data_root):
    from lmforge.hf import import_hf

    reqs = sample_requests(data_root)
    want = direct_transformers(hf_dir, reqs)
    assert len(set(round(w, 3) for w in want)) > len(want) // 2  # a model with real preferences
    got_hf = [r.logprob for r in loglikelihoods(HFModel(hf_dir), reqs, batch_size=5)]
    import_hf(hf_dir, tmp_path / "imported")
    lm = load_eval_model(tmp_path / "imported")
    assert isinstance(lm, LmforgeModel)
    got_lmforge = [r.logprob for r in loglikelihoods(lm, reqs, batch_size=7)]
    torch.testing.assert_close(torch.tensor(got_hf), torch.tensor(want), rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.tensor(got_lmforge), torch.tensor(want), rtol=0, atol=1e-3)


def test_greedy_generation_agrees_between_adapters(hf_dir, tmp_path):
    """The HF adapter's plain greedy loop and the engine on the imported checkpoint write the same text."""
    from lmforge.hf import import_hf

    import_hf(hf_dir, tmp_path / "imported")
    prompts = ["Question: Who is there?\nAnswer:", "First Citizen:"]
    a = HFModel(hf_dir).generate(prompts, 12, stop=("\n\n",))
    b = load_eval_model(tmp_path / "imported").generate(prompts, 12, stop=("\n\n",))
    assert a == b and all(a)


def test_batching_and_order_do_not_change_scores(bpe, data_root):
    lm = tiny_lm(bpe, seed=1)
    reqs = sample_requests(data_root, 2)
    one = [r.logprob for r in loglikelihoods(lm, reqs, batch_size=1)]
    many = [r.logprob for r in loglikelihoods(lm, reqs, batch_size=64)]
    rev = [r.logprob for r in loglikelihoods(lm, reqs[::-1], batch_size=5)][::-1]
    # contexts run once through the KV cache vs every request as a full row
    calls = []
    shared = lm.score_shared
    lm.score_shared = lambda groups: calls.append(len(groups)) or shared(groups)
    loglikelihoods(lm, reqs, batch_size=8)
    assert calls  # the MMLU questions (one-letter answers after a long context) took the cached path
    rows = loglikelihoods(lm, reqs, batch_size=8, shared_context=False)
    torch.testing.assert_close(torch.tensor(many), torch.tensor(one), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(rev), torch.tensor(one), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor([r.logprob for r in rows]), torch.tensor(one), rtol=0, atol=1e-4)
    assert [r.num_tokens for r in rows] == [r.num_tokens for r in loglikelihoods(lm, reqs)]
    assert [r.is_greedy for r in rows] == [r.is_greedy for r in loglikelihoods(lm, reqs)]


def test_encode_pair_follows_lm_eval_split(bpe):
    lm = tiny_lm(bpe)
    ctx, cont = encode_pair(lm, "Question: who? Answer: ", "the king")
    assert ctx[0] == bpe.bos_id
    # the trailing space travels with the continuation, and the pair is tokenized jointly
    assert bpe.decode(cont) == " the king"
    assert ctx[1:] + cont == bpe.encode("Question: who? Answer: the king")
    with pytest.raises(LmforgeError, match="empty continuation"):
        encode_pair(lm, "x", "")


def test_too_long_sequences_are_cut_from_the_left(bpe):
    lm = tiny_lm(bpe, block_size=32)
    long_ctx = "word " * 200
    [r] = loglikelihoods(lm, [(long_ctx, " end")])
    # the same as scoring with only the last 32 tokens of (context + continuation) as input
    ctx, cont = encode_pair(lm, long_ctx, " end")
    full = (ctx + cont)[-33:]
    logp = torch.log_softmax(lm.model(torch.tensor([full[:-1]]))[0], -1)
    want = sum(logp[32 - len(cont) + i, cont[i]].item() for i in range(len(cont)))
    assert r.logprob == pytest.approx(want, abs=1e-4)


# ----------------------------------------------------------------------------- chance


def within(acc, chance, n, k=4.0):
    se = math.sqrt(chance * (1 - chance) / n)
    return abs(acc - chance) <= k * se


@pytest.mark.parametrize("task", ["hellaswag", "arc_easy", "arc_challenge"])
def test_random_model_scores_at_chance(task):
    """On 400 real items (a handful of fixture items cannot measure chance)."""
    shared_file(MC_TASKS[task].local_file)
    tok = Tokenizer.byte_level()
    items = load_mc_task(task, shared_data(), "local")[:400]
    r = evaluate_multiple_choice(tiny_lm(tok, block_size=1024, seed=3), items, batch_size=32)
    m = r.metrics
    assert m["chance"] == pytest.approx(sum(1 / len(i.contexts) for i in items) / len(items))
    for k in ("acc", "acc_norm"):
        assert within(m[k], m["chance"], len(items)), (k, m)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mmlu", "piqa", "winogrande", "copa", "siqa", "commonsense_qa"])
def test_random_model_scores_at_chance_more_tasks(task):
    """(BoolQ and OpenBookQA are left out: their gold answers differ in length from the others
    systematically ("yes" vs "no"; longer right answers), and a random model's log-likelihood
    prefers short answers, so it lands on a length prior rather than on 1 / n.)"""
    shared_file(MC_TASKS[task].local_file)
    tok = Tokenizer.byte_level()
    items = load_mc_task(task, shared_data(), "local")[:400]
    m = evaluate_multiple_choice(tiny_lm(tok, block_size=1024, seed=3), items, batch_size=32).metrics
    for k in ("acc", "acc_norm"):
        assert within(m[k], m["chance"], len(items)), (k, m)


def test_a_model_that_knows_the_answers_scores_perfectly():
    """The scoring direction: a fake model whose logits favour the gold continuation's tokens."""
    tok = Tokenizer.byte_level()
    items = [MCItem(["Q: 1+1=?\nA:"] * 3, [" 2", " 3", " 11"], 0), MCItem(["Q: 2+2=?\nA:"] * 2, [" 5", " 4"], 1)]

    class Oracle:  # the adapter interface, nothing else
        max_length, prefix_ids = 64, [tok.bos_id]
        encode = staticmethod(tok.encode)

        def logits(self, ids):
            out = torch.zeros(ids.shape[0], ids.shape[1], tok.vocab_size)
            out[:, :, ord("2")] = out[:, :, ord("4")] = 5.0  # the right digits are likely
            return out

    m = evaluate_multiple_choice(Oracle(), items).metrics
    assert m["acc"] == m["acc_norm"] == m["acc_bytes"] == 1.0
    assert m["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert centred(1.0, m["chance"]) == 1.0 and centred(m["chance"], m["chance"]) == 0.0


# ----------------------------------------------------------------------------- task formats


def test_hellaswag_follows_lm_eval_convention(data_root):
    item = hellaswag_item("Removing ice from car", "Then, the man writes over the snow.", "then",
                          ["Clean it. [title] Use a brush. [step] Rinse.", "stops."], 1)
    assert item.contexts[0] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert item.choice_texts == ["Clean it.. Use a brush. Rinse.", "stops."]
    assert item.continuations[1] == " stops."
    assert hellaswag_preprocess(" a [header] b ") == "a b"
    # the local six-line bz2 file: ctx_b's lowercase fragment is capitalised as lm-eval does
    local = load_mc_task("hellaswag", data_root, "local")
    assert len(local) == 4 and [it.gold for it in local] == [2, 0, 1, 3]
    assert local[0].contexts == ["Painting a fence: A woman dips a wide brush into a can of white paint. She"] * 4
    assert local[1].contexts[0].endswith("on the stove. When the water boils, he")
    assert local[0].continuations[2] == " spreads the paint along the top board in long strokes."
    bad = data_root.parent / "bad_hellaswag"
    (bad / "hellaswag").mkdir(parents=True, exist_ok=True)
    (bad / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(b"ctx\n1\na\nb\n"))
    with pytest.raises(LmforgeError, match="expected 6 lines per item, got 4"):
        load_mc_task("hellaswag", bad, "local")


def test_local_formats_render_as_lm_eval(data_root):
    """Each local file shape (MosaicML's query/choices/gold, context_options/continuation/gold,
    the lettered SIQA and CommonsenseQA, MMLU jsonl) on the fixture files."""
    arc = load_mc_task("arc_challenge", data_root, "local")
    assert len(arc) == 4 and arc[0].contexts[0] == ("Question: A box slides across a floor and slows down after the "
                                                    "push ends. Which force slows it?\nAnswer:")
    assert arc[0].continuations[0] == " friction" and arc[3].gold == 3
    assert arc_item("Which?", ["x", "y"], 1).contexts[0] == "Question: Which?\nAnswer:"
    m = mmlu_item(" What is 2+2? ", ["3", "4", "5", "6"], 1)
    assert m.contexts[0] == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert m.continuations == [" A", " B", " C", " D"] and m.gold == 1
    mmlu = load_mc_task("mmlu", data_root, "local")
    assert mmlu[0].contexts[0] == "What is the value of 3 squared plus 4 squared?\nA. 7\nB. 12\nC. 25\nD. 49\nAnswer:"
    assert mmlu[0].gold == 2
    piqa = load_mc_task("piqa", data_root, "local")[1]
    assert piqa.contexts[0] == "Question: How do I loosen a tight jar lid?\nAnswer:" and piqa.gold == 1
    wino = load_mc_task("winogrande", data_root, "local")[0]  # partial scoring: the options are in the contexts
    assert wino.contexts == ["Maria lent her umbrella to Jess because Maria",
                             "Maria lent her umbrella to Jess because Jess"]
    assert wino.continuations == [" was going out into the rain."] * 2 and wino.gold == 1
    assert wino.choice_texts == wino.contexts  # lm-eval normalises by the option's length here
    copa = load_mc_task("copa", data_root, "local")[1]  # "The road was wet, because": lm-eval has no comma
    assert copa.contexts[0] == "The road was wet because" and copa.continuations == ["  it had rained overnight.",
                                                                                      "  the sun was shining."]
    boolq = load_mc_task("boolq", data_root, "local")[1]
    assert boolq.contexts[0] == ("Penguins are birds that cannot fly; over time their wings became flippers that they "
                                 "use to swim.\nQuestion: are penguins a kind of bird?\nAnswer:")
    assert boolq.continuations == [" no", " yes"] and boolq.gold == 1
    obqa = load_mc_task("openbookqa", data_root, "local")[0]
    assert obqa.contexts[0] == "A magnet will most strongly attract" and obqa.continuations[1] == " a paper clip"
    siqa = load_mc_task("siqa", data_root, "local")[2]  # MosaicML's lettered two-choice form, kept as it is
    assert siqa.contexts[0].startswith("Context: Leo found a wallet")
    assert siqa.contexts[0].endswith("B. careless\nAnswer:")
    assert siqa.continuations == [" A", " B"] and siqa.gold == 0
    csqa = load_mc_task("commonsense_qa", data_root, "local")[2]
    assert csqa.continuations == [" A", " B", " C", " D"] and csqa.gold == 2
    for name in MC_TASKS:
        assert all(0 <= it.gold < len(it.contexts) for it in load_mc_task(name, data_root, "local"))
    gsm = load_gsm8k(data_root, "local")
    assert [it.answer for it in gsm] == ["18", "3", "10"] and len(load_gsm8k(data_root, "local", "train")) == 4


def test_a_malformed_local_file_is_an_error_not_missing_data(tmp_path):
    path = tmp_path / "eval" / "llm-foundry" / "piqa.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"query": "Question: a?\\n", "choices": ["x", "y"], "gold": 0}\n'
                    '{"query": "Question: b?\\n", "gold": 1}\n')
    with pytest.raises(LmforgeError, match=r"piqa.jsonl: item 2 does not have the expected fields") as e:
        load_mc_task("piqa", tmp_path, "auto")
    assert not isinstance(e.value, DataUnavailable)
    path.write_text('{"query": "Question: a?", "choices": ["x", "y"], "gold": 0}\nnot json\n')
    with pytest.raises(LmforgeError, match=r"piqa.jsonl:2 is not valid JSON"):
        load_mc_task("piqa", tmp_path, "local")


def test_hub_loaders_read_the_hub_layout_offline(data_root, hub_mirror, offline_hub):
    """Every task's hub loader on a mirror laid out as the hub serves it (dataset cards with
    `configs:`, parquet files with the hub's columns; baber/piqa has no card, its splits come from
    the file names), through datasets.load_dataset with HF_HUB_OFFLINE=1. Where the local format
    keeps what lm-eval's prompt needs, the same question gives the same item from both sources."""
    for name, task in MC_TASKS.items():
        hub = load_mc_task(name, data_root, "hub", hub_mirror=hub_mirror)
        local = load_mc_task(name, data_root, "local")
        assert 2 <= len(hub) < len(local), name
        if task.same_items:
            assert hub == local[:len(hub)], name
    # the renderings whose local form differs: lm-eval's text exactly
    siqa = load_mc_task("siqa", source="hub", hub_mirror=hub_mirror)[1]
    assert siqa.contexts[0] == ("Q: Priya stayed late to help a coworker finish a report. How would the coworker "
                                "feel?\nA:")
    assert siqa.continuations == [" annoyed at Priya", " grateful for the help", " sleepy and bored"] and siqa.gold == 1
    csqa = load_mc_task("commonsense_qa", source="hub", hub_mirror=hub_mirror)[0]
    assert csqa.contexts[0] == ("Question: Where would you most likely keep milk cold?\nA. refrigerator\nB. oven\n"
                                "C. bookshelf\nD. mailbox\nE. garage roof\nAnswer:")
    assert csqa.continuations == [" A", " B", " C", " D", " E"] and csqa.gold == 0
    copa = load_mc_task("copa", source="hub", hub_mirror=hub_mirror)[3]  # "I forgot..." lowercased, as lm-eval
    assert copa.contexts[0] == "My phone battery died because" and copa.continuations[0] == "  i forgot to charge it."
    arc = load_mc_task("arc_easy", source="hub", hub_mirror=hub_mirror)[2]  # choices labelled 1-4, answerKey "3"
    assert arc.gold == 2 and arc.continuations[2] == " water"
    assert load_gsm8k(None, "hub", "train", hub_mirror=hub_mirror) == load_gsm8k(data_root, "local", "train")[:2]
    # "auto" prefers the local file when it is there
    assert len(load_mc_task("piqa", data_root, "auto", hub_mirror=hub_mirror)) == 4


def test_a_hub_row_without_its_columns_is_an_error_not_missing_data(tmp_path, offline_hub):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "baber" / "piqa"
    repo.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": "a?", "sol1": "x", "sol2": "y", "label": 0}]),
                   repo / "piqa_validation.parquet")
    with pytest.raises(LmforgeError, match=r"piqa: hub row 0 of baber/piqa does not have the expected columns") as e:
        load_mc_task("piqa", tmp_path, "hub", hub_mirror=tmp_path)
    assert not isinstance(e.value, DataUnavailable)
    # a mirrored repo without the config asked for: the mirror is wrong, and that is an error too
    arc = tmp_path / "allenai" / "ai2_arc"
    (arc / "ARC-Challenge").mkdir(parents=True)
    (arc / "README.md").write_text("---\nconfigs:\n- config_name: ARC-Challenge\n  data_files:\n  - split: test\n"
                                   "    path: ARC-Challenge/test-*\n---\n")
    pq.write_table(pa.Table.from_pylist([{"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                          "answerKey": "A"}]), arc / "ARC-Challenge" / "test-00000-of-00001.parquet")
    assert len(load_mc_task("arc_challenge", tmp_path, "hub", hub_mirror=tmp_path)) == 1
    with pytest.raises(LmforgeError, match=r"arc_easy: allenai/ai2_arc ARC-Easy \(test\) could not be read") as e:
        load_mc_task("arc_easy", tmp_path, "hub", hub_mirror=tmp_path)
    assert not isinstance(e.value, DataUnavailable)


def test_missing_data_is_data_unavailable_with_the_way_to_get_it(tmp_path, offline_hub, monkeypatch):
    import time

    with pytest.raises(LmforgeError, match="unknown multiple-choice task"):
        load_mc_task("nope")
    t0 = time.perf_counter()
    for name, task in MC_TASKS.items():  # offline, nothing cached: every task, fast
        with pytest.raises(DataUnavailable) as e:
            load_mc_task(name, tmp_path, "auto")
        assert e.value.task == name and str(tmp_path / task.local_file) in e.value.reason
        assert "HF_HUB_OFFLINE" in e.value.reason
        assert task.local_file in e.value.how and task.hub[0] in e.value.how and "LMFORGE_SHARED_DATA" in e.value.how
    assert time.perf_counter() - t0 < 30
    with pytest.raises(DataUnavailable, match=r"piqa\.jsonl not found"):
        load_mc_task("piqa", tmp_path, "local")
    with pytest.raises(DataUnavailable, match="openai/gsm8k"):
        load_gsm8k(tmp_path, "auto")
    with pytest.raises(DataUnavailable, match=r"baber/piqa is not there \(hub mirror"):
        load_mc_task("piqa", tmp_path, "hub", hub_mirror=tmp_path)
    monkeypatch.setenv("LMFORGE_HUB_MIRROR", str(tmp_path))  # the variable does the same
    with pytest.raises(DataUnavailable, match="hub mirror from LMFORGE_HUB_MIRROR"):
        load_mc_task("piqa", tmp_path, "hub")


def test_an_unreachable_hub_is_detected_before_datasets_retries(tmp_path, unreachable_hub):
    """Without HF_HUB_OFFLINE, datasets retries an unreachable hub for ~25 s per dataset here; one
    TCP connection decides first (a closed local port stands for a machine without network)."""
    import time

    t0 = time.perf_counter()
    for name in ("hellaswag", "arc_easy", "copa"):
        with pytest.raises(DataUnavailable, match=r"the Hugging Face hub \(127\.0\.0\.1\) is not reachable"):
            load_mc_task(name, tmp_path, "auto")
    assert time.perf_counter() - t0 < 10


def test_real_sets_have_their_full_size_and_lm_eval_rendering():
    """The development data (not in the repository): item counts and a known first item."""
    root = shared_file("hellaswag/hellaswag_val_full.txt.bz2").parents[1]
    sizes = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "mmlu": 3018, "piqa": 1838, "openbookqa": 500,
             "copa": 100, "winogrande": 1267, "siqa": 1954, "commonsense_qa": 1221, "boolq": 3270}
    for name, n in sizes.items():
        shared_file(MC_TASKS[name].local_file)
        assert len(load_mc_task(name, root, "local")) == n, name
    hs = load_mc_task("hellaswag", root, "local")[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.gold == 3 and hs.continuations[3] == " starts pulling up roofing on a roof."
    arc = load_mc_task("arc_challenge", root, "local")[0]
    assert arc.contexts[0].startswith("Question: An astronomer")
    assert arc.continuations[0] == " Planetary density will decrease."
    assert load_mc_task("copa", root, "local")[0].contexts[0] == "The man turned on the faucet therefore"
    shared_file("gsm8k/test.jsonl")
    assert len(load_gsm8k(root, "local")) == 1319 and load_gsm8k(root, "local")[0].answer == "18"


def test_fewshot_is_fixed_by_seed_and_excludes_the_item():
    items = [MCItem([f"Q{i}:"] * 2, [" a", " b"], i % 2) for i in range(10)]
    p = fewshot_prefix(items, 3, 4, seed=7)
    assert p == fewshot_prefix(items, 3, 4, seed=7) and p != fewshot_prefix(items, 3, 4, seed=8)
    assert p.count("\n\n") == 4 and "Q3:" not in p
    assert fewshot_prefix(items, 3, 0, seed=7) == ""


# ----------------------------------------------------------------------------- perplexity / bpb


def test_bits_per_byte_equals_score_text_and_windows_score_each_token_once(bpe):
    from lmforge.eval.lm import evaluate_text, text_windows
    from lmforge.inference.sampling import score_text

    lm = tiny_lm(bpe, block_size=64, seed=2)
    text = "To be, or not to be, that is the question."
    ref = score_text(lm.model, bpe, text)
    m = evaluate_text(lm, text)
    assert m["bits_per_byte"] == pytest.approx(ref.bits_per_byte, rel=1e-5)
    assert m["perplexity"] == pytest.approx(ref.perplexity, rel=1e-5)
    for n, w, s in [(200, 64, 64), (200, 64, 16), (65, 64, 64), (3, 64, 8)]:
        scored = [t for start, end, first in text_windows(n, w, s) for t in range(first, end + 1)]
        assert scored == list(range(1, n))  # every target exactly once, in order
        assert all(end - start <= w for start, end, _ in text_windows(n, w, s))
    long = "All the world's a stage, and all the men and women merely players. " * 10
    a, b = evaluate_text(lm, long), evaluate_text(lm, long, stride=16)
    assert a["tokens"] == b["tokens"] == len(bpe.encode(long))
    assert a["loss"] != b["loss"]  # more context per token with overlapping windows


def test_shard_split_metrics_match_training_validation(tiny_data):
    from lmforge.eval.lm import evaluate_shards

    tok = Tokenizer.load(tiny_data / ".." / "tokenizer.json")
    lm = tiny_lm(tok, block_size=64)
    m = evaluate_shards(lm.model, tok, tiny_data, "val", max_tokens=4096, batch_size=4)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    # byte-level: one byte per token, except the document starts (special, no text): the 4096
    # targets are the split's tokens 1..4096
    from lmforge.data.loader import TokenSplit

    targets = TokenSplit(tiny_data, "val").read(1, 4096 + 1)
    nbytes = int(tok.token_byte_lengths()[targets].sum())
    assert nbytes == int((targets != tok.bos_id).sum())
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * len(targets) / (math.log(2) * nbytes), rel=1e-4)


# ----------------------------------------------------------------------------- generation


def test_gsm8k_answer_extraction():
    from lmforge.answers import extract_number as extract_answer
    from lmforge.answers import normalize_number

    assert extract_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_answer("so 1,234 dollars in total") == "1234"
    assert extract_answer("The answer is $18.00.") == "18"
    assert extract_answer("-5 degrees") == "-5" and extract_answer("no numbers") is None
    assert normalize_number("1,000.") == "1000"


def test_gsm8k_grading_with_canned_outputs(data_root):
    from lmforge.eval.generative import evaluate_gsm8k, gsm8k_prompt
    from lmforge.eval.tasks import GSM8KItem

    items = load_gsm8k(data_root, "local")[:3]
    assert items[0].answer == "18"

    class Canned:
        def generate(self, prompts, max_new_tokens, stop=(), chat=False):
            assert all(p.endswith("\nAnswer:") for p in prompts) and stop
            return ["12 - 2 - 4 = 6, 6 * 3 = 18\n#### 18", "It takes 3", "wrong: 1"]

    r = evaluate_gsm8k(Canned(), items, items, fewshot=0)
    assert r["metrics"]["exact_match"] == pytest.approx(2 / 3)
    shots = [GSM8KItem("1+1?", "1+1=<<1+1=2>>2\n#### 2")]
    p = gsm8k_prompt(items[0], shots)
    assert p.startswith("Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: A farmer collects 12 eggs")
    assert p.endswith("How many dollars does he earn each morning?\nAnswer:")


def test_gsm8k_through_the_engine_stops_at_stop_strings(bpe, data_root):
    from lmforge.eval.generative import GSM8K_STOP, evaluate_gsm8k

    lm = tiny_lm(bpe, block_size=1024)
    items = load_gsm8k(data_root, "local")[:3]
    r = evaluate_gsm8k(lm, items, load_gsm8k(data_root, "local", "train"), fewshot=2, max_new_tokens=24)
    assert r["metrics"]["n"] == 3 and 0.0 <= r["metrics"]["exact_match"] <= 1.0
    for row in r["predictions"]:
        assert isinstance(row["output"], str) and not any(s in row["output"] for s in GSM8K_STOP)
    # the adapter's batched greedy generation is what the engine gives each prompt alone
    prompts = ["Question: what is 2+2?\nAnswer:", "Hi"]
    batched = lm.generate(prompts, 10)
    assert batched == [lm.generate([p], 10)[0] for p in prompts]


def test_overlap_metrics():
    from lmforge.eval.metrics import bleu, overlap_metrics, rouge

    same = overlap_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["rouge1"] == same["rougeL"] == pytest.approx(1.0)
    assert rouge(["a b c d"], ["e f g h"])["rouge1"] == 0.0
    # several references: the closest one counts
    assert rouge(["the cat"], [["a dog", "the cat"]])["rouge1"] == pytest.approx(1.0)
    assert bleu(["the cat sat on the mat today"], [["the cat sat on the mat today", "x"]]) == pytest.approx(100.0)
    with pytest.raises(LmforgeError, match="pair up"):
        bleu(["a"], ["a", "b"])


# ----------------------------------------------------------------------------- judge


class AlwaysA:
    def verdict(self, q, a, b):
        return "A"


class PrefersLonger:
    def verdict(self, q, a, b):
        return "tie" if len(a) == len(b) else "A" if len(a) > len(b) else "B"


def test_judge_both_orders_expose_position_bias_and_length():
    from lmforge.eval.judge import compare

    qs, a1, a2 = ["q1", "q2", "q3"], ["long answer here", "x", "same"], ["short", "longer one", "SAME"]
    biased = compare(AlwaysA(), qs, a1, a2)
    assert (biased.wins, biased.ties, biased.losses) == (0, 3, 0)
    assert biased.contradiction_rate == 1.0 and biased.flip_rate == 1.0 and biased.first_position_rate == 1.0
    fair = compare(PrefersLonger(), qs, a1, a2)
    assert (fair.wins, fair.ties, fair.losses) == (1, 1, 1) and fair.contradiction_rate == 0.0
    assert fair.longer_wins_rate == 1.0 and fair.first_position_rate == 0.5
    assert fair.mean_length_1 == pytest.approx(sum(map(len, a1)) / 3)
    with pytest.raises(LmforgeError, match="every question needs"):
        compare(AlwaysA(), qs, a1, a2[:2])


def test_model_judge_gives_a_verdict(bpe):
    from lmforge.eval.judge import VERDICTS, ModelJudge, compare

    r = compare(ModelJudge(tiny_lm(bpe)), ["What is 2+2?"], ["4"], ["It is 4."])
    assert r.n == 1 and r.pairs[0].first_order in VERDICTS and r.pairs[0].swapped_order in VERDICTS


def test_endpoint_judge_against_a_local_openai_compatible_server():
    """A fake chat-completions server whose 'judge' prefers the longer answer, with reasoning
    text around the [[X]] verdict; nothing leaves the machine."""
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from lmforge.eval.judge import EndpointJudge, compare, parse_endpoint_verdict

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["model"], body["temperature"]))
            prompt = body["messages"][-1]["content"]
            a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", prompt, re.S).group(1)
            b = re.search(r"\[Answer B\]\n(.*?)\n\n", prompt, re.S).group(1)
            v = "C" if len(a) == len(b) else "A" if len(a) > len(b) else "B"
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"Reasoning... [[{v}]]"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = EndpointJudge(f"http://127.0.0.1:{server.server_port}/v1", model="fake-judge")
        r = compare(judge, ["q1", "q2"], ["a much longer answer", "ab"], ["short", "abc"])
    finally:
        server.shutdown()
    assert (r.wins, r.ties, r.losses) == (1, 0, 1) and r.contradiction_rate == 0.0
    assert len(seen) == 4 and all(p == "/v1/chat/completions" and m == "fake-judge" and t == 0.0 for p, m, t in seen)
    assert parse_endpoint_verdict("first [[B]] then finally [[C]]") == "tie"
    assert parse_endpoint_verdict("no verdict") is None


# ----------------------------------------------------------------------------- report card and CLI


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    from lmforge.stages.pretrain import PretrainOptions, pretrain
    from lmforge.train.loop import TrainConfig

    out = tmp_path_factory.mktemp("run")
    pretrain(PretrainOptions(data_dir=str(tiny_data), preset="tiny", batch_size=4, eval_tokens=1024),
             TrainConfig(out_dir=str(out), max_steps=6, eval_every=3, ckpt_every=6, log_every=1,
                         progress=False, device="cpu", compile="off"))
    return out


def test_cli_eval_writes_json_and_markdown_and_report_card(tiny_run, tmp_path, capsys, data_root, hub_mirror,
                                                          offline_hub):
    from lmforge.cli import main

    out = tmp_path / "res.json"
    text = tmp_path / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    rc = main(["eval", "--checkpoint", str(tiny_run), "--tasks", "arc_easy,copa", "--limit", "6", "--fewshot", "1",
               "--text", str(text), "--out", str(out), "--no-progress", "--data-root", str(data_root)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["tasks"]["arc_easy"]["metrics"]["n"] == 6 and "acc_norm" in res["tasks"]["copa"]["metrics"]
    assert res["tasks"][f"text:{text}"]["metrics"]["bits_per_byte"] > 0
    assert "| arc_easy | 6 | acc_norm |" in out.with_suffix(".md").read_text()
    rc = main(["report-card", "--run", str(tiny_run), "--results", str(out), "--out", str(tmp_path / "card")])
    assert rc == 0
    md = (tmp_path / "card" / "report.md").read_text()
    card = json.loads((tmp_path / "card" / "report.json").read_text())
    assert card["run"]["tokens_seen"] == 6 * 4 * 64 and f"{card['run']['tokens_seen']:,}" in md
    assert card["run"]["params"] == GPT(get_config("tiny", vocab_size=Tokenizer.byte_level().vocab_size)).num_params()
    m = res["tasks"]["arc_easy"]["metrics"]
    assert card["centred"]["arc_easy"] == pytest.approx((m["acc_norm"] - 0.25) / 0.75)
    assert "aggregate" in md and (tmp_path / "card" / "loss.png").stat().st_size > 0
    assert (tmp_path / "card" / "tasks.png").stat().st_size > 0
    # the same command reads the hub's layout from a mirror (--source hub: the data root is not looked at)
    rc = main(["eval", "--checkpoint", str(tiny_run), "--tasks", "piqa,boolq", "--source", "hub", "--hub-mirror",
               str(hub_mirror), "--out", str(tmp_path / "hub.json"), "--no-progress", "--data-root", str(data_root)])
    assert rc == 0
    hub = json.loads((tmp_path / "hub.json").read_text())["tasks"]
    assert hub["piqa"]["metrics"]["n"] == 2 and hub["boolq"]["metrics"]["n"] == 2  # the mirror's rows, not the 4 local


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys, offline_hub):
    from lmforge.cli import main

    assert main(["eval", "--checkpoint", str(tiny_run), "--tasks", "nope"]) == 2
    assert "error: unknown task(s) nope" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--tasks", "copa"]) == 2
    assert "error: model not found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_run)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_run), "--tasks", "piqa", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: piqa: data not available") and err.count("\n") == 1 and "baber/piqa" in err


def test_cli_judge_with_a_model_and_an_answers_file(tiny_run, tmp_path, capsys, data_root):
    from lmforge.cli import main

    answers = tmp_path / "b.jsonl"
    answers.write_text('"A short answer."\n{"answer": "Another answer, a little longer."}\n')
    out = tmp_path / "judge.json"
    rc = main(["judge", "--judge", str(tiny_run), "--model-a", str(tiny_run), "--answers-b", str(answers),
               "--limit", "2", "--max-new-tokens", "8", "--out", str(out), "--no-progress",
               "--data-root", str(data_root)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["n"] == 2 and res["wins"] + res["ties"] + res["losses"] == 2
    assert res["mean_length_2"] == pytest.approx((len("A short answer.") + len("Another answer, a little longer.")) / 2)
    assert "contradicts itself" in capsys.readouterr().out
    assert main(["judge", "--judge", str(tiny_run), "--answers-a", str(answers), "--limit", "2",
                 "--data-root", str(data_root)]) == 2
    assert "either --model-a" in capsys.readouterr().err


def test_judge_questions_file_errors_name_the_file_and_line(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.eval.judge import load_questions_file

    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "What is 2+2?"}\n\n"Name a colour."\n')
    assert load_questions_file(good) == ["What is 2+2?", "Name a colour."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 2+2?"}\n{"prompt": "no question field"}\n')
    with pytest.raises(LmforgeError, match=r'bad.jsonl:2: expected \{"question"'):
        load_questions_file(bad)
    code = main(["judge", "--judge", str(tmp_path / "none"), "--answers-a", str(good), "--answers-b", str(good),
                 "--questions", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "bad.jsonl:2" in err and err.count("\n") == 1
