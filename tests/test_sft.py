"""Conversation loading, SFT batching (masking, padding without leaks, mixture), the sft run, LoRA merge."""
import json
import shutil

import pytest
import torch
from conftest import FIXTURES, run_cli, shared_file

from lmforge.chat import render_for_training
from lmforge.common import LmforgeError
from lmforge.data.rows import MixtureSampler, split_heldout
from lmforge.models.transformer import GPT, get_config
from lmforge.posttrain.conversations import load_file, load_hf, load_source, parse_mixture, write_jsonl
from lmforge.stages.sft import SFTOptions, collate, sft, tokenize_conversations
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import list_checkpoints, load_model, save_checkpoint
from lmforge.train.logs import read_log

# ----------------------------------------------------------------------------- loading
from lmforge.train.loop import TrainConfig

# ----------------------------------------------------------------------------- loading


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_jsonl_errors_name_the_line_and_skipping_is_counted(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps(GOOD), "", "{not json", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), json.dumps(GOOD)]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(LmforgeError, match=r"c\.jsonl:3: invalid JSON"):
        load_file(p)
    convs, report = load_file(p, skip_invalid=True)
    assert len(convs) == 2 and report.loaded == 2
    assert [w.rsplit(":", 1)[1] for w, _ in report.skipped] == ["3", "4", "5"]
    assert "role 'bot'" in report.skipped[1][1] and "no assistant message" in report.skipped[2][1]
    assert "3 skipped" in report.summary()
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(LmforgeError, match="no usable conversations"):
        load_file(tmp_path / "bad.jsonl", skip_invalid=True)
    with pytest.raises(LmforgeError, match="not found"):
        load_file(tmp_path / "missing.jsonl")


def test_alpaca_and_sharegpt_files_convert():
    """Fixtures in the exact layouts of Stanford Alpaca's json and FastChat's ShareGPT json."""
    convs, report = load_file(FIXTURES / "sft" / "alpaca.json")
    assert report.loaded == 5 and not report.skipped
    assert convs[0] == [{"role": "user", "content": "Name three colours of a traffic light."},
                        {"role": "assistant", "content": "Red, amber and green."}]
    # A non-empty input follows the instruction after a blank line; both are stripped.
    assert convs[1][0]["content"] == "Translate the sentence into French.\n\nThe cat sleeps on the warm windowsill."
    assert convs[4] == [{"role": "user", "content": "Classify the animal as mammal, bird or fish.\n\npenguin"},
                        {"role": "assistant", "content": "Bird."}]
    assert convs[3][1]["content"].count("\n") == 2  # the reply is kept as written

    convs, report = load_file(FIXTURES / "sft" / "sharegpt.json")
    assert report.loaded == 3 and [len(c) for c in convs] == [2, 4, 6]
    assert [m["role"] for m in convs[2]] == ["user", "assistant"] * 3
    assert convs[1][2] == {"role": "user", "content": "Four, two of them children."}
    assert convs[2][-1] == {"role": "assistant", "content": "Enjoy your breakfast."}


def test_real_alpaca_and_fastchat_files_convert():
    """The same on the real files: all 5000 Alpaca items, FastChat's multi-turn dummy set."""
    alpaca = shared_file("alpaca/alpaca_5000.json")
    convs, report = load_file(alpaca)
    assert report.loaded == 5000 and not report.skipped
    raw = json.loads(alpaca.read_text())
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    assert convs[with_input] == [{"role": "user", "content": raw[with_input]["instruction"].strip() + "\n\n" +
                                  raw[with_input]["input"].strip()},
                                 {"role": "assistant", "content": raw[with_input]["output"]}]
    fastchat = shared_file("sft/fastchat/dummy_conversation.json")
    convs, _ = load_file(fastchat)
    raw = json.loads(fastchat.read_text())
    assert len(convs) == len(raw)
    assert [m["content"] for m in convs[0]] == [t["value"] for t in raw[0]["conversations"]]
    assert [m["role"] for m in convs[0]][:2] == ["user", "assistant"]


def test_hf_loader_converts_rows(tmp_path, monkeypatch):
    """The name -> dataset step is replaced by the `datasets` JSON loader on a local file."""
    datasets = pytest.importorskip("datasets")
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "say x", "input": "", "output": "x"}] * 3)
    real = datasets.load_dataset
    seen = {}

    def fake(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return real("json", data_files=str(p), split="train", cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    convs, report = load_hf("someone/chat:default@train[:10]")
    assert seen == {"name": "someone/chat", "config": "default", "split": "train[:10]"}
    assert report.loaded == 6 and convs[1] == [{"role": "user", "content": "say x"},
                                               {"role": "assistant", "content": "x"}]
    assert convs[0] == GOOD["messages"]


def test_sources_and_mixture_specs():
    convs, report = load_source("synthetic:arithmetic:7")
    assert len(convs) == 7 and report.source == "synthetic:arithmetic:7"
    convs, _ = load_source("safety")
    assert len(convs) > 20
    assert parse_mixture(["a.jsonl", "synthetic:letters:10*2.5"]) == [("a.jsonl", 1.0), ("synthetic:letters:10", 2.5)]
    for bad in (["x*0"], ["x*two"], []):
        with pytest.raises(LmforgeError):
            parse_mixture(bad)
    with pytest.raises(LmforgeError, match="integer"):
        load_source("synthetic:arithmetic:many")


# ----------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def test_collate_masks_everything_but_assistant_targets(tok):
    convs = [GOOD["messages"],
             [{"role": "user", "content": "a longer question"}, {"role": "assistant", "content": "ok"}]]
    examples, stats = tokenize_conversations(tok, convs, 200)
    x, y = collate(examples, tok.pad_id, "cpu")
    for r, msgs in enumerate(convs):
        ids, mask = render_for_training(tok, msgs)
        n = len(ids) - 1
        assert x[r, :n].tolist() == ids[:-1] and (x[r, n:] == tok.pad_id).all()
        learned = [t for t in y[r].tolist() if t != -100]
        assert tok.decode(learned) == msgs[-1]["content"] + "<|assistant_end|>"
        assert (y[r, n:] == -100).all()


def test_padding_does_not_leak_between_rows(tok):
    """Each row's loss in a padded batch equals its loss computed alone."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=128)).eval()
    convs = [c["messages"] for c in json.loads(json.dumps([GOOD]))] + \
        [[{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 30}]]
    examples, _ = tokenize_conversations(tok, convs, 127)
    x, y = collate(examples, tok.pad_id, "cpu")
    logits = model(x)
    per_row = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none").sum(1)
    for r, e in enumerate(examples):
        xa, ya = collate([e], tok.pad_id, "cpu")
        alone = model(xa, ya, reduction="sum")
        torch.testing.assert_close(per_row[r], alone, atol=1e-4, rtol=1e-5)


def test_truncation_and_dropping_are_counted(tok):
    long_prompt = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "answer"}]
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 100}]
    examples, stats = tokenize_conversations(tok, [long_prompt, long_answer], 50)
    assert stats == {"truncated": 2, "dropped_no_target": 1}
    assert len(examples) == 1 and len(examples[0].ids) == 51


def test_mixture_follows_weights_and_resumes_exactly():
    s = MixtureSampler([10, 30, 5], [1, 2, 1], seed=3)
    draws = [s.next() for _ in range(4000)]
    counts = [sum(d == k for d, _ in draws) for k in range(3)]
    for c, w in zip(counts, [0.25, 0.5, 0.25]):
        assert abs(c / 4000 - w) < 0.03
    # within a pass over a source, no conversation repeats
    first10 = [i for d, i in draws if d == 0][:10]
    assert sorted(first10) == list(range(10))
    a = MixtureSampler([10, 30, 5], [1, 2, 1], seed=3)
    for _ in range(123):
        a.next()
    b = MixtureSampler([10, 30, 5], [1, 2, 1], seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.next() for _ in range(50)] == [b.next() for _ in range(50)] == draws[123:173]


def test_heldout_split_is_disjoint_and_seeded():
    items = list(range(100))
    tr, va = split_heldout(items, 0.1, 0)
    assert len(va) == 10 and sorted(tr + va) == items and split_heldout(items, 0.1, 0) == (tr, va)
    assert split_heldout(items, 0.0, 0) == (items, [])


# ----------------------------------------------------------------------------- the sft run


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A random tiny model saved as a checkpoint (SFT only needs weights and a tokenizer)."""
    root = tmp_path_factory.mktemp("sft_base")
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=160))
    save_checkpoint(root / "checkpoints", 0, model, None, {"tokenizer_fingerprint": tok.fingerprint},
                    files={"tokenizer.json": (root / "tokenizer.json").read_bytes()})
    return root


def cfg(out, steps=4, **kw):
    kw = {"lr": 3e-3, **kw}
    return TrainConfig(out_dir=str(out), max_steps=steps, eval_every=2, ckpt_every=2, keep_checkpoints=5,
                       log_every=1, optimizer="adamw", warmup_steps=1, dtype="fp32", compile="off",
                       device="cpu", progress=False, **kw)


DATA = ["synthetic:arithmetic:60*2", "synthetic:identity:30"]


def test_sft_trains_logs_and_resumes_exactly(base, tok, tmp_path):
    import math

    opts = SFTOptions(checkpoint=str(base), data=DATA, batch_size=4)
    result = sft(opts, cfg(tmp_path / "a", lr=1e-2), log=lambda *a: None)
    log = read_log(tmp_path / "a" / "log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    val_losses = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) == 4 and [r["step"] for r in log if "val_loss" in r] == [2, 4]
    # The random base guesses about uniformly over 268 byte ids (5.59 nats) on the reply tokens;
    # 4 steps take the held-out loss to ~3.9 (4.7 at step 2), measured. Without learning: ~5.6.
    uniform = math.log(tok.vocab_size)
    assert losses[0] == pytest.approx(uniform, abs=0.1)
    assert result["val_loss"] == val_losses[-1] < val_losses[0] < uniform - 0.5
    assert result["val_loss"] < uniform - 1.0
    # the checkpoint is a normal model checkpoint (chat, sample, export read it)
    model, state = load_model(tmp_path / "a")
    assert state["stage"] == "sft" and state["lora"] is None and state["tokenizer_fingerprint"]
    # resume from step 2 reproduces steps 3-4 exactly
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    sft(SFTOptions(checkpoint=str(base), data=DATA, batch_size=4, resume=True), cfg(tmp_path / "b", lr=1e-2),
        log=lambda *a: None)
    resumed = [r["loss"] for r in read_log(tmp_path / "b" / "log.jsonl") if "loss" in r]
    assert resumed == losses
    b, _ = load_model(tmp_path / "b")
    for (n, p), q in zip(model.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_sft_lora_saves_a_small_adapter_that_merges(base, tmp_path):
    from lmforge.posttrain.lora import LoRAConfig

    opts = SFTOptions(checkpoint=str(base), data=DATA, batch_size=4, lora=LoRAConfig(rank=2, alpha=4))
    result = sft(opts, cfg(tmp_path / "lora", lr=1e-2), log=lambda *a: None)
    assert 0 < result["trainable_params"] < 0.05 * result["total_params"]
    adapter = tmp_path / "lora" / "adapter" / "adapter.safetensors"
    base_size = (list_checkpoints(base / "checkpoints")[-1] / "model.safetensors").stat().st_size
    assert adapter.stat().st_size < 0.05 * base_size
    trained = result["model"].eval()
    # the base weights did not move
    base_model, _ = load_model(base)
    for n, p in base_model.state_dict().items():
        assert torch.equal(trained.state_dict()[n], p), n
    code, out, err = run_cli("lora", "merge", "--adapter", tmp_path / "lora", "--out", tmp_path / "merged")
    assert code == 0, err
    merged, _ = load_model(tmp_path / "merged")
    run, state = load_model(tmp_path / "lora")  # the run itself: chat, sample and export read it directly
    assert state["lora"]["rank"] == 2 and not any("lora_" in k for k in run.state_dict())
    x = torch.randint(0, 250, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), trained(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(x), trained(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(x), base_model(x), atol=1e-4)  # training changed something


def test_sft_cli_errors(base, tmp_path):
    code, _, err = run_cli("sft", "--checkpoint", base, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "r")
    assert code == 2 and err.startswith("error:") and "not found" in err
    code, _, err = run_cli("sft", "--checkpoint", base, "--data", "synthetic:identity:10", "--out", tmp_path / "r",
                           "--lora-rank", "2", "--optimizer", "muon")
    assert code == 2 and "AdamW" in err
    code, _, err = run_cli("sft", "--checkpoint", base, "--data", "synthetic:identity:10", "--out", tmp_path / "r",
                           "--lora-targets", "q_proj")
    assert code == 2 and "--lora-rank" in err
    code, _, err = run_cli("lora", "merge", "--adapter", tmp_path, "--out", tmp_path / "m")
    assert code == 2 and "not found" in err


def test_cli_sft_end_to_end(base, tmp_path):
    """`lmforge sft` teaches the random base the identity answers (a fixed reply per question, which a
    tiny model memorises in seconds), and `lmforge synthetic eval` sees it: the base cannot name
    itself (0%), the fine-tuned model mostly can (85-90% over 3 seeds after 100 steps)."""
    code, out, err = run_cli("sft", "--checkpoint", base, "--data", "synthetic:identity:200", "--data", "safety*0.05",
                             "--out", tmp_path / "run", "--max-steps", 100, "--batch-size", 8, "--lr", "1e-2",
                             "--compile", "off", "--no-progress", "--eval-every", 50, "--device", "cpu",
                             "--dtype", "fp32")
    assert code == 0, err
    assert "safety: 36 conversations" in out and json.loads(out[out.index("{"):])["step"] == 100

    def identity_accuracy(checkpoint) -> float:
        code, out, err = run_cli("synthetic", "eval", "--checkpoint", checkpoint, "--tasks", "identity", "--n", 20)
        assert code == 0, err
        res = json.loads(out)
        assert set(res["tasks"]) == {"identity"}
        return res["accuracy"]

    assert identity_accuracy(base) == 0.0
    assert identity_accuracy(tmp_path / "run") >= 0.5
