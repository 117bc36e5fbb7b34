"""The LSTM family (lmforge/models/lstm.py) through the model protocol: the same training, checkpoint,
resume, DDP and generation paths as the transformer, with a fixed-size (h, c) decode state and no
context window."""
import json
import math
import sys

import pytest
import torch
from conftest import check_exact_resume, context_free_loss, run_cli, torchrun

from lmforge.common import LmforgeError
from lmforge.models.lstm import FAMILY, LSTMLM, LSTMConfig, LSTMState
from lmforge.models.protocol import UNLIMITED_SCORING_WINDOW, check_param_groups, scoring_window, tokens_left
from lmforge.models.registry import build_model, get_family
from lmforge.stages.pretrain import PretrainOptions, pretrain
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.logs import read_log
from lmforge.train.loop import TrainConfig
from lmforge.train.optim import Muon, build_optimizers

VOCAB = 268  # the byte-level tokenizer of the tiny_data fixture


def tiny_model(seed=0, **overrides) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(FAMILY.config("tiny", vocab_size=VOCAB, **overrides)).eval()


def losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]


# ----------------------------------------------------------------------------- config and shape


def test_config_round_trip_registry_and_window():
    cfg = FAMILY.config("cpu", dropout=0.1)
    assert LSTMConfig.from_dict(cfg.to_dict()) == cfg
    assert get_family("lstm") is FAMILY and FAMILY.default_preset == "cpu"
    model = build_model("lstm", FAMILY.config("tiny").to_dict())
    assert isinstance(model, LSTMLM) and model.family == "lstm"
    # No window: any number of tokens still fits, and long texts are scored in the fixed window.
    assert model.context_limit is None
    assert tokens_left(model, 10**9) == sys.maxsize
    assert scoring_window(model) == UNLIMITED_SCORING_WINDOW
    with pytest.raises(LmforgeError, match="unknown LSTMConfig fields.*block_size"):
        LSTMConfig.from_dict({**cfg.to_dict(), "block_size": 64})


@pytest.mark.parametrize("kw, msg", [
    (dict(n_hidden=0), "n_hidden must be a positive integer"),
    (dict(n_layer=-1), "n_layer must be a positive integer"),
    (dict(n_embd=2.5), "n_embd must be a positive integer"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(embed_std=0.0), "embed_std must be positive"),
    (dict(forget_bias=float("nan")), "forget_bias must be a finite number"),
])
def test_invalid_configs_raise_one_clear_error(kw, msg):
    with pytest.raises(LmforgeError, match=msg):
        LSTMConfig(**kw)


def test_cli_refuses_transformer_only_flags(tiny_data, tmp_path):
    code, _, err = run_cli("pretrain", "--arch", "lstm", "--model", "tiny", "--data-dir", tiny_data,
                           "--out", tmp_path / "r", "--block-size", "64")
    assert code == 2 and "--block-size does not apply to the lstm family" in err
    assert "Traceback" not in err


def test_forward_logits_loss_and_hidden_states():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == torch.float32
    hidden = model.hidden_states(idx)
    assert hidden.shape == (3, 11, model.hidden_size) and model.hidden_size == model.config.n_hidden
    torch.testing.assert_close(model.lm_head(hidden), logits)
    targets = torch.randint(0, VOCAB, (3, 11))
    targets[1, 4:] = -100  # ignored positions drop out of the mean
    keep = targets != -100
    expected = -torch.log_softmax(logits, -1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(model(idx, targets), expected)
    assert model(idx, targets, reduction="sum").item() == pytest.approx(expected.item() * keep.sum().item(), rel=1e-5)
    # Causal by construction: what follows a position never changes its logits.
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])


def test_tied_embeddings_with_and_without_projection():
    same = tiny_model(tie_embeddings=True, n_embd=64, n_hidden=64)
    assert same.out_proj is None and same.lm_head.weight is same.embed_tokens.weight
    proj = tiny_model(tie_embeddings=True)  # 32 -> 64: the head needs a projection back to 32
    assert proj.out_proj is not None and proj.lm_head.weight is proj.embed_tokens.weight
    assert proj(torch.randint(0, VOCAB, (2, 5))).shape == (2, 5, VOCAB)
    untied = tiny_model()
    # The shared table is counted once; non_embedding keeps it as the head.
    assert proj.num_params() == untied.num_params() - VOCAB * 64 + 64 * 32
    assert proj.num_params(non_embedding=True) == proj.num_params()
    assert untied.num_params(non_embedding=True) == untied.num_params() - VOCAB * 32


def test_flops_per_token_counts_gate_matmuls_and_head():
    model = LSTMLM(LSTMConfig(vocab_size=1000, n_layer=3, n_embd=48, n_hidden=80))
    gates = 4 * 80 * (48 + 80) + 2 * 4 * 80 * (80 + 80)  # layer 0 reads the embedding, the rest h
    assert model.flops_per_token() == 6 * (gates + 1000 * 80)
    assert model.flops_per_token(10) == model.flops_per_token(10_000)  # no attention: length-free
    # The same count as 6 x every matrix the LSTM and head multiply by.
    weights = sum(p.numel() for n, p in model.named_parameters() if "weight" in n and "embed" not in n)
    assert model.flops_per_token() == 6 * weights


# ----------------------------------------------------------------------------- parameter groups


def test_param_groups_put_exactly_the_gate_matrices_under_muon():
    for model in (tiny_model(), tiny_model(tie_embeddings=True)):
        groups = model.param_groups()
        check_param_groups(model, groups)
        names = {id(p): n for n, p in model.named_parameters()}
        expected_matrix = {f"lstm.weight_{k}_l{i}" for k in ("ih", "hh") for i in range(2)}
        expected_embedding = {"embed_tokens.weight"}
        if model.out_proj is not None:
            expected_matrix.add("out_proj.weight")
        else:
            expected_embedding.add("lm_head.weight")
        assert {names[id(p)] for p in groups["matrix"]} == expected_matrix
        assert {names[id(p)] for p in groups["embedding"]} == expected_embedding
        assert {names[id(p)] for p in groups["vector"]} == {f"lstm.bias_{k}_l{i}" for k in ("ih", "hh")
                                                           for i in range(2)}
        adamw, muon = build_optimizers(model, name="muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                       muon_lr=0.02, muon_momentum=0.95)
        assert isinstance(muon, Muon)
        assert {names[id(p)] for g in muon.param_groups for p in g["params"]} == expected_matrix
        # Lookups and vectors go to AdamW, never with weight decay.
        assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups)
        assert sum(len(g["params"]) for g in adamw.param_groups) == len(groups["embedding"]) + len(groups["vector"])
        # --optimizer adamw: the same matrices are the only ones with weight decay.
        (only,) = build_optimizers(model, name="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                   muon_lr=0.02, muon_momentum=0.95)
        decayed = {names[id(p)] for g in only.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed == expected_matrix


# ----------------------------------------------------------------------------- decode state


def padded_batch(rows, width, pad_seed):
    g = torch.Generator().manual_seed(pad_seed)
    idx = torch.randint(0, VOCAB, (len(rows), width), generator=g)  # padding: arbitrary ids
    for b, row in enumerate(rows):
        idx[b, :len(row)] = torch.tensor(row)
    return idx, torch.tensor([len(r) - 1 for r in rows])


@torch.no_grad()
def test_prefill_and_decode_equal_the_full_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 1)]
    idx, last = padded_batch(rows, 9, pad_seed=2)
    cache = model.new_cache(3)
    logits = model.prefill(idx, cache, last)
    assert logits.shape == (3, VOCAB) and logits.dtype == torch.float32
    for b, row in enumerate(rows):
        torch.testing.assert_close(logits[b], model(torch.tensor([row]))[0, -1], rtol=1e-5, atol=1e-5)
    # Other padding ids leave the logits and the state exactly as they were: padding never leaks in.
    other = model.new_cache(3)
    torch.testing.assert_close(model.prefill(padded_batch(rows, 9, pad_seed=3)[0], other, last), logits,
                               rtol=0, atol=0)
    torch.testing.assert_close(other.h, cache.h, rtol=0, atol=0)
    torch.testing.assert_close(other.c, cache.c, rtol=0, atol=0)
    # Each decode step continues every row from its own length.
    for _ in range(6):
        nxt = torch.randint(0, VOCAB, (3, 1), generator=g)
        logits = model.decode(nxt, cache, [len(r) for r in rows])
        for b in range(3):
            rows[b].append(nxt[b, 0].item())
            torch.testing.assert_close(logits[b], model(torch.tensor([rows[b]]))[0, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_keep_with_repeats_and_extend():
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 7)]
    cache = model.new_cache(3, max_len=2)  # max_len is ignored: the state has no length
    idx, last = padded_batch(rows, 7, pad_seed=5)
    model.prefill(idx, cache, last)
    cache.keep(torch.tensor([2, 0, 0]))
    assert isinstance(cache, LSTMState) and cache.batch_size == 3
    late = model.new_cache(1)
    model.prefill(torch.tensor([rows[1]]), late)
    cache.extend(late)
    assert cache.batch_size == 4
    order = [rows[2], rows[0], rows[0], rows[1]]
    nxt = torch.tensor([[11], [12], [13], [14]])
    logits = model.decode(nxt, cache, [len(r) for r in order])
    for b, row in enumerate(order):
        torch.testing.assert_close(logits[b], model(torch.tensor([row + [nxt[b, 0].item()]]))[0, -1],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(LmforgeError, match="different LSTM models"):
        cache.extend(tiny_model(n_hidden=32).new_cache(1))
    with pytest.raises(LmforgeError, match="prefill of 2 rows into a decode state of 4"):
        model.prefill(torch.zeros(2, 3, dtype=torch.long), cache)


@torch.no_grad()
def test_decoding_runs_far_beyond_the_training_window():
    """Trained on 256-token windows or not, an LSTM reads on: 600 decode steps from a one-token
    prefill give the logits of a forward pass over all 601 tokens."""
    model = tiny_model()
    seq = torch.randint(0, VOCAB, (1, 601), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(1)
    model.prefill(seq[:, :1], cache)
    for t in range(1, 601):
        logits = model.decode(seq[:, t:t + 1], cache, [t])
    torch.testing.assert_close(logits[0], model(seq)[0, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_bf16_decode_state():
    """Engine(dtype="bf16") asks for a bf16 state: it is kept in bf16 and read by the fp32 weights."""
    model = tiny_model()
    seq = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    cache = model.new_cache(2, dtype=torch.bfloat16)
    model.prefill(seq[:, :10], cache)
    logits = model.decode(seq[:, 10:11], cache, [10, 10])
    assert cache.h.dtype == cache.c.dtype == torch.bfloat16
    torch.testing.assert_close(logits, model(seq[:, :11])[:, -1], rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- the inference engine


def test_engine_greedy_generation_with_and_without_the_cache_agree():
    from lmforge.inference.engine import Engine
    from lmforge.tokenizer import Tokenizer

    model = tiny_model()
    engine = Engine(model, Tokenizer.byte_level())
    prompts = [list(b"def main():\n    "), list(b"x")]
    # 300 new tokens: past the 256-token windows pretraining uses without a context window.
    cached = engine.generate(prompts, 300, temperature=0, stop_ids=())
    plain = engine.generate(prompts, 300, temperature=0, stop_ids=(), use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in plain]
    assert all(len(c.tokens) == 300 and c.finish_reason == "length" for c in cached)
    # compile=True has no decode_step to compile here and decodes as it is; bf16 keeps a bf16 state.
    compiled = Engine(model, Tokenizer.byte_level(), compile=True).generate(prompts, 50, temperature=0, stop_ids=())
    assert [c.tokens for c in compiled] == [c.tokens[:50] for c in cached]
    (bf16,) = Engine(model, Tokenizer.byte_level(), dtype="bf16").generate(prompts[:1], 50, temperature=0.8, seed=0,
                                                                           stop_ids=())
    assert len(bf16.tokens) == 50


# ----------------------------------------------------------------------------- training


def test_pretrain_cli_trains_an_lstm_and_checkpoints_it(tiny_data, tmp_path):
    out = tmp_path / "r"
    code, stdout, err = run_cli(
        "pretrain", "--arch", "lstm", "--model", "tiny", "--data-dir", tiny_data, "--out", out,
        "--max-steps", "150", "--seq-len", "32", "--batch-size", "8", "--eval-every", "0", "--ckpt-every", "0",
        "--eval-tokens", "4096", "--log-every", "1", "--warmup-steps", "5", "--dtype", "fp32", "--compile", "off",
        "--no-progress")
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    curve = losses(out)
    assert len(curve) == 150
    # A fresh model is near uniform over the 268 byte ids; 150 steps must take the held-out loss well
    # below the best any context-blind predictor (the targets' own unigram entropy) can reach.
    assert curve[0] > math.log(VOCAB) - 0.5
    assert result["val_loss"] < context_free_loss(tiny_data, 8, 32, 4096) - 0.3
    model, state = ckpt_io.load_model(out)
    assert isinstance(model, LSTMLM) and state["model_family"] == "lstm" and state["seq_len"] == 32
    assert state["model_config"] == FAMILY.config("tiny", vocab_size=VOCAB).to_dict()


def lstm_run(tiny_data, out, *, resume=False):
    cfg = TrainConfig(out_dir=str(out), max_steps=10, ckpt_every=5, eval_every=0, log_every=1, warmup_steps=2,
                      dtype="fp32", compile="off", progress=False)  # Muon on the gate matrices (default)
    opts = PretrainOptions(data_dir=str(tiny_data), model="lstm", preset="tiny", model_overrides={"dropout": 0.2},
                           batch_size=4, seq_len=24, eval_tokens=1024, resume=resume)
    return pretrain(opts, cfg)


def test_interrupted_run_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """Dropout makes the RNG state part of what must resume (conftest.check_exact_resume)."""
    straight, resumed = check_exact_resume(lambda out, resume=False: lstm_run(tiny_data, out, resume=resume),
                                           tmp_path, monkeypatch)
    assert resumed["val_loss"] == straight["val_loss"]


def test_ddp_two_processes_train_like_one(tiny_data, tmp_path):
    """torchrun with 2 gloo processes of 2 rows each == one process of 4 rows, step by step.

    AdamW, not Muon: the two runs sum gradients in another order, and Muon's bf16 Newton-Schulz
    iteration amplifies that rounding in near-null directions of a gradient (measured: after 4 steps
    weight_hh_l0 differed by 5% of its movement, the losses by < 1e-4), which would hide a real
    difference. Muon itself needs nothing from DDP: it runs on the already all-reduced gradients."""
    argv = ["pretrain", "--arch", "lstm", "--model", "tiny", "--data-dir", str(tiny_data), "--seq-len", "24",
            "--max-steps", "4", "--eval-every", "0", "--ckpt-every", "0", "--eval-tokens", "1024", "--log-every", "1",
            "--warmup-steps", "1", "--optimizer", "adamw", "--dtype", "fp32", "--compile", "off", "--device", "cpu",
            "--no-progress"]
    code, _, err = run_cli(*argv, "--batch-size", "4", "--out", tmp_path / "one")
    assert code == 0, err
    torchrun("-m", "lmforge.cli", *argv, "--batch-size", "2", "--out", tmp_path / "two")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    state = json.loads((ckpt_io.resolve_checkpoint(tmp_path / "two") / "state.json").read_text())
    assert state["world_size"] == 2 and state["model_family"] == "lstm"
    a = ckpt_io.load_model(tmp_path / "one")[0].state_dict()
    b = ckpt_io.load_model(tmp_path / "two")[0].state_dict()
    # Compared by how far each tensor moved: ranks that did not average their gradients would
    # differ by about as much as training moved them; measured here, ~1e-6 of it.
    torch.manual_seed(1337)  # pretrain's default seed: the weights both runs started from
    start = LSTMLM(FAMILY.config("tiny", vocab_size=VOCAB)).state_dict()
    for k in a:
        assert (a[k] - b[k]).norm() < 1e-4 * (a[k] - start[k]).norm(), k
