import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.stages.pretrain import PretrainOptions, pretrain
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.logs import read_log
from lmforge.train.loop import TrainConfig, Trainer, TrainingDiverged
from lmforge.train.optim import lr_multiplier, newton_schulz_orthogonalize

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def run(tiny_data, out, *, steps, resume=False, optimizer="muon", ckpt_every=0, batch_size=4, grad_accum=1,
        dtype="fp32", compile="off", dropout=0.0, **kw):
    cfg = TrainConfig(out_dir=str(out), max_steps=steps, optimizer=optimizer, ckpt_every=ckpt_every,
                      eval_every=0, log_every=1, warmup_steps=2, dtype=dtype, progress=False,
                      grad_accum=grad_accum, compile=compile, **kw)
    opts = PretrainOptions(data_dir=str(tiny_data), preset="tiny", model_overrides=dict(TINY, dropout=dropout),
                           batch_size=batch_size, eval_tokens=2048, resume=resume)
    return pretrain(opts, cfg)


def losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]


def test_muon_orthogonalizes():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        G = torch.randn(shape)
        s = torch.linalg.svdvals(newton_schulz_orthogonalize(G).float())
        assert s.min() > 0.5 and s.max() < 1.5, s


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (3, 40, 24), (2, 2, 24, 40)])
def test_newton_schulz_follows_the_quintic_iteration_computed_in_float64(shape):
    """The bf16 iteration (each step folded into one fused product) against the textbook polynomial
    X <- aX + (bA + cA^2)X, A = XX^T, run in float64 on the smaller Gram matrix."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    X = G.double().mT if shape[-2] > shape[-1] else G.double()
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    for _ in range(5):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    want = (X.mT if shape[-2] > shape[-1] else X).float()
    got = newton_schulz_orthogonalize(G)
    assert got.shape == G.shape and got.dtype == G.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # bf16 rounding: ~5e-3 typical


def test_schedules():
    kw = dict(warmup_steps=10, min_lr_frac=0.1, decay_frac=0.2)
    assert lr_multiplier(0.0, 0, schedule="cosine", **kw) == pytest.approx(0.1)  # warmup starts small
    assert lr_multiplier(0.01, 10, schedule="cosine", **kw) > 0.99
    assert lr_multiplier(1.0, 1000, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(0.5, 500, schedule="wsd", **kw) == 1.0
    assert lr_multiplier(0.9, 900, schedule="wsd", **kw) == pytest.approx(0.55)
    assert lr_multiplier(1.0, 1000, schedule="wsd", **kw) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_training_lowers_validation_loss(tiny_data, tmp_path, optimizer):
    import math

    res = run(tiny_data, tmp_path / "r", steps=40, optimizer=optimizer, lr=3e-3)
    uniform = math.log(268)  # nats per byte-level token of a model that has learned nothing
    # A fresh model predicts about uniformly; 40 steps of 128 tokens take the validation loss
    # ~2.1 nats lower (3.47 muon, 3.49 adamw on stdlib source: roughly its byte frequencies,
    # measured). An optimizer that does not step, or steps the wrong way, stays at ~5.6.
    assert losses(tmp_path / "r")[0] == pytest.approx(uniform, abs=0.1)
    assert res["val_loss"] < uniform - 1.5
    assert res["val_bpb"] == pytest.approx(res["val_loss"] / math.log(2), rel=0.05)  # ~1 byte per token
    assert (tmp_path / "r" / "loss.png").stat().st_size > 1000


def test_resume_reproduces_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    from lmforge.stages.pretrain import NextTokenTask

    full = tmp_path / "full"
    run(tiny_data, full, steps=12, ckpt_every=6, dropout=0.1)  # dropout: the RNG must resume too
    part = tmp_path / "part"
    # Kill the run during step 9: checkpoint at 6 exists, log lines for steps 7-8 were written after
    # it (resume must discard and redo them).
    original, calls = NextTokenTask.next_batch, []

    def dying_next_batch(self):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(NextTokenTask, "next_batch", dying_next_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_data, part, steps=12, ckpt_every=6, dropout=0.1)
    monkeypatch.setattr(NextTokenTask, "next_batch", original)
    assert len(losses(part)) == 8
    run(tiny_data, part, steps=12, ckpt_every=6, resume=True, dropout=0.1)
    assert len(losses(part)) == 12
    assert losses(part) == losses(full)  # bit-identical loss curve
    a = ckpt_io.load_model(full)[0].state_dict()
    b = ckpt_io.load_model(part)[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_with_other_config_is_refused(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "r", steps=2)
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), max_steps=4, progress=False, compile="off")
    opts = PretrainOptions(data_dir=str(tiny_data), preset="tiny", model_overrides=dict(TINY, n_layer=3),
                           batch_size=4, resume=True)
    with pytest.raises(LmforgeError, match="different model config"):
        pretrain(opts, cfg)


def test_interrupted_save_keeps_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "r"
    run(tiny_data, out, steps=3)
    root = out / "checkpoints"
    # A crash mid-save leaves a .tmp folder without state.json: it must never be picked.
    (root / "step_000009.tmp").mkdir()
    (root / "step_000009.tmp" / "model.safetensors").write_bytes(b"partial")
    assert ckpt_io.resolve_checkpoint(out).name == "step_000003"
    run(tiny_data, out, steps=5, resume=True)
    assert ckpt_io.resolve_checkpoint(out).name == "step_000005"


class NaNTask:
    """Wraps a task and poisons the loss at a given step."""

    def __init__(self, inner, bad_step):
        self.inner, self.bad_step, self.calls = inner, bad_step, 0

    def next_batch(self):
        return self.inner.next_batch()

    def loss(self, model, batch):
        self.calls += 1
        loss, n = self.inner.loss(model, batch)
        return (loss * float("nan") if self.calls == self.bad_step else loss), n

    def evaluate(self, model):
        return {}

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_data, tmp_path):
    from lmforge.data.loader import TokenSplit
    from lmforge.models.transformer import GPT, get_config
    from lmforge.stages.pretrain import NextTokenTask

    out = tmp_path / "r"
    split = TokenSplit(tiny_data, "train")
    inner = NextTokenTask(split, None, torch.ones(268, dtype=torch.long), batch_size=4, seq_len=32, seed=0,
                          device="cpu", eval_tokens=128)
    model = GPT(get_config("tiny", vocab_size=268, **TINY))
    cfg = TrainConfig(out_dir=str(out), max_steps=10, ckpt_every=2, eval_every=0, progress=False, dtype="fp32",
                      compile="off")
    trainer = Trainer(model, NaNTask(inner, bad_step=5), cfg)
    with pytest.raises(TrainingDiverged, match=r"at step 5.*step_000004"):
        trainer.fit()
    assert ckpt_io.resolve_checkpoint(out).name == "step_000004"


def test_grad_accumulation_matches_big_batch(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "big", steps=4, batch_size=8, optimizer="adamw")
    run(tiny_data, tmp_path / "acc", steps=4, batch_size=4, grad_accum=2, optimizer="adamw")
    # Two micro-batches of 4 are the same 8 windows as one batch of 8, so the runs must agree.
    a, b = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert a == pytest.approx(b, rel=1e-5)


def test_ddp_two_processes_match_one_process(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with batch 4 per rank == 1 process with batch 8."""
    common = ["pretrain", "--data-dir", str(tiny_data), "--model", "tiny", "--n-layer", "2", "--n-head", "2",
              "--n-embd", "32", "--block-size", "32", "--max-steps", "5", "--eval-every", "0", "--ckpt-every", "0",
              "--dtype", "fp32", "--no-progress", "--optimizer", "adamw", "--warmup-steps", "1", "--log-every", "1",
              "--compile", "off"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "lmforge.cli", *common, "--batch-size", "8", "--out", str(one)],
                   check=True, env=env, capture_output=True)
    two = tmp_path / "two"
    with socket.socket() as sock:  # a free port: a fixed one can still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "-m", "lmforge.cli", *common, "--batch-size", "4", "--out", str(two)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 5
    for x, y in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-4)
    st = json.loads((ckpt_io.resolve_checkpoint(two) / "state.json").read_text())
    assert st["world_size"] == 2


def test_compile_failure_falls_back_to_eager(tiny_data, tmp_path, monkeypatch, capsys):
    """A machine where torch.compile cannot work (e.g. no C++ compiler) still trains, identically."""
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda m, **k: Broken(m))
    run(tiny_data, tmp_path / "fallback", steps=4, compile="on")
    assert "torch.compile failed" in capsys.readouterr().out
    run(tiny_data, tmp_path / "eager", steps=4, compile="off")
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")


def test_compiled_training_matches_eager(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "c", steps=3, compile="on")
    run(tiny_data, tmp_path / "e", steps=3, compile="off")
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "e"), rel=1e-3)


def test_nan_gradient_with_finite_loss_stops_before_the_step(tiny_data, tmp_path):
    """A finite loss whose backward pass yields a NaN gradient (here: a hook on one weight at step 4)
    must never reach the weights nor a checkpoint: the run stops at that step, naming the last good
    checkpoint, with the weights as they were before the step."""
    from lmforge.data.loader import TokenSplit
    from lmforge.models.transformer import GPT, get_config
    from lmforge.stages.pretrain import NextTokenTask

    class NaNGradientTask(NaNTask):
        def loss(self, model, batch):
            self.calls += 1
            loss, n = self.inner.loss(model, batch)
            if self.calls == self.bad_step:
                self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}
                weight = model.layers[0].mlp.down_proj.weight
                handle = weight.register_hook(lambda g: (handle.remove(), torch.full_like(g, float("nan")))[1])
            return loss, n

    out = tmp_path / "r"
    inner = NextTokenTask(TokenSplit(tiny_data, "train"), None, torch.ones(268, dtype=torch.long), batch_size=4,
                          seq_len=32, seed=0, device="cpu", eval_tokens=128)
    model = GPT(get_config("tiny", vocab_size=268, **TINY))
    cfg = TrainConfig(out_dir=str(out), max_steps=10, ckpt_every=2, eval_every=0, progress=False, dtype="fp32",
                      compile="off", grad_clip=0.0)  # no clipping: the norm is checked all the same
    task = NaNGradientTask(inner, bad_step=4)
    trainer = Trainer(model, task, cfg)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at step 4 \(loss \d.*step_000002"):
        trainer.fit()
    after = model.state_dict()
    for k, v in task.before.items():
        assert torch.equal(after[k], v), k  # the step was not taken
    assert all(torch.isfinite(v).all() for v in after.values())
    assert [p.name for p in ckpt_io.list_checkpoints(out / "checkpoints")] == ["step_000002"]
    saved, _ = ckpt_io.load_model(out)
    assert all(torch.isfinite(v).all() for v in saved.state_dict().values())


def test_compile_auto_follows_the_device_and_dropout():
    from lmforge.models.transformer import GPT, get_config
    from lmforge.train.precision import use_compile

    plain, dropped = GPT(get_config("tiny")), GPT(get_config("tiny", dropout=0.2))
    assert use_compile("auto", "cpu", plain) and not use_compile("auto", "cpu", dropped)
    assert use_compile("auto", "cuda:0", dropped) and not use_compile("auto", "mps", plain)
    assert use_compile("on", "cpu", dropped) and not use_compile("off", "cuda", plain)
    # Only dropout on the attention weights keeps a CPU model eager (it takes SDPA off its fused
    # kernel); residual dropout alone compiles, as the cpu preset's does.
    assert use_compile("auto", "cpu", GPT(get_config("tiny", dropout=0.2, attn_dropout=0.0)))
    assert not use_compile("auto", "cpu", GPT(get_config("tiny", attn_dropout=0.1)))
    assert use_compile("auto", "cpu", GPT(get_config("cpu", dropout=0.2, n_layer=1, vocab_size=64)))


def test_newton_schulz_orthogonalises_a_stack_matrix_by_matrix():
    """Muon runs same-shaped matrices (a mixture of experts' experts) as one batch: each must come out
    as it would alone."""
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 48, 32, generator=g) * torch.logspace(-2, 1, 5)[:, None, None]
    together = newton_schulz_orthogonalize(stack)
    for G, out in zip(stack, together):
        torch.testing.assert_close(out, newton_schulz_orthogonalize(G), rtol=0, atol=2e-2)
        s = torch.linalg.svdvals(out.float())
        assert 0.5 < s.min() and s.max() < 1.3

