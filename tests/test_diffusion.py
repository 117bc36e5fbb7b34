"""Masked diffusion: the loss and its exact form, the bound against a distribution small enough to
enumerate, the samplers' invariants, and training through the shared Trainer."""
import itertools
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, check_exact_resume

from lmforge.common import LmforgeError
from lmforge.eval.lm import windows_nll
from lmforge.inference.diffusion import METHODS, diffusion_generate
from lmforge.models.diffusion import DiffusionConfig, MaskedDiffusionLM, exact_bound
from lmforge.models.protocol import check_param_groups
from lmforge.models.registry import build_model, get_family
from lmforge.stages.pretrain import PretrainOptions, pretrain
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.config import TrainConfig
from lmforge.train.logs import read_log


def tiny(vocab=16, block=32):
    torch.manual_seed(0)
    return MaskedDiffusionLM(DiffusionConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=16))


def test_registered_bidirectional_and_groups():
    model = build_model("diffusion", get_family("diffusion").config("tiny").to_dict())
    assert isinstance(model, MaskedDiffusionLM) and model.mask_id == 512
    check_param_groups(model, model.param_groups())
    # Bidirectional: changing the last token changes the first position's logits.
    model.eval()
    x = torch.randint(0, 512, (1, 10))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 512
    assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])
    assert model(x).shape == (1, 10, 512)  # no column for the mask id
    with pytest.raises(LmforgeError, match="samplers"):
        model.new_cache(1)
    with pytest.raises(LmforgeError, match="attends both ways"):
        DiffusionConfig(causal=True)


def test_loss_matches_hand_computation():
    model = tiny()
    model.eval()
    x = torch.randint(0, 16, (3, 6))
    y = torch.randint(0, 16, (3, 6))
    y[1, :2] = -100  # a prompt: visible, never masked, no loss
    t = torch.tensor([0.3, 0.6, 0.9])
    model.sample_times = lambda b, device: t
    torch.manual_seed(5)
    loss = model(x, y, reduction="sum")
    torch.manual_seed(5)
    u = torch.rand(3, 6)  # the same draw forward makes after sample_times
    clean = y.clone()
    clean[1, :2] = x[1, 1:3]
    masked = (u < t[:, None]) & (y != -100)
    xt = clean.masked_fill(masked, model.mask_id)
    logp = model(xt).log_softmax(-1)
    hand = sum(-logp[b, i, clean[b, i]] / t[b] for b in range(3) for i in range(6) if masked[b, i])
    assert torch.allclose(loss, hand, atol=1e-5)
    assert masked.sum() > 0 and not masked[1, :2].any()


def test_antithetic_times_cover_the_interval():
    t = tiny().sample_times(8, "cpu")
    gaps = torch.sort(((t - 1e-3) / (1 - 1e-3)) % 1.0).values
    assert torch.allclose(gaps.diff(), torch.full((7,), 1 / 8), atol=1e-5)


class TrueDenoiser(MaskedDiffusionLM):
    """The exact conditional p(x_i | visible tokens) of an enumerable distribution over sequences."""

    def __init__(self, probs: dict):
        L = len(next(iter(probs)))
        super().__init__(DiffusionConfig(vocab_size=3, block_size=L, n_layer=1, n_head=1, n_embd=4))
        self.probs = probs

    def denoise(self, xt):
        out = torch.zeros(*xt.shape, 3, dtype=torch.float64)
        for b in range(xt.size(0)):
            row = xt[b].tolist()
            weights = {s: p for s, p in self.probs.items()
                       if all(v == self.mask_id or v == s[i] for i, v in enumerate(row))}
            z = sum(weights.values())
            for i in range(xt.size(1)):
                for v in range(3):
                    out[b, i, v] = sum(p for s, p in weights.items() if s[i] == v) / z
        return out.clamp(min=1e-30).log()


def toy_distribution():
    g = torch.Generator().manual_seed(1)
    seqs = list(itertools.product(range(3), repeat=3))
    p = torch.rand(len(seqs), generator=g, dtype=torch.float64) ** 3
    p = p / p.sum()
    return {s: float(q) for s, q in zip(seqs, p)}


def test_bound_is_exact_for_the_true_denoiser_and_above_for_any_other():
    probs = toy_distribution()
    entropy = -sum(p * math.log(p) for p in probs.values())
    true = TrueDenoiser(probs)
    # The ELBO averages the chain rule over random orders: with the true conditionals it is exact.
    expected = sum(p * exact_bound(true, torch.tensor(s)) for s, p in probs.items())
    assert expected == pytest.approx(entropy, abs=1e-9)
    for s, p in list(probs.items())[:5]:
        assert exact_bound(true, torch.tensor(s)) == pytest.approx(-math.log(p), abs=1e-9)
    other = tiny(vocab=3, block=3)
    other.eval()
    with torch.no_grad():
        worse = sum(p * exact_bound(other, torch.tensor(s)) for s, p in probs.items())
    assert worse > entropy + 0.01


def test_monte_carlo_bound_agrees_with_the_exact_integral():
    model = tiny(vocab=5, block=8)
    model.eval()
    seq = torch.tensor([1, 4, 0, 2, 3])
    with torch.no_grad():
        exact = exact_bound(model, seq)
    x, y = torch.cat([torch.tensor([0]), seq[:-1]])[None], seq[None]
    batches = [(x.repeat(64, 1), y.repeat(64, 1))]
    token_bytes = torch.ones(5, dtype=torch.long)
    torch.manual_seed(0)
    with torch.no_grad():
        few = windows_nll(model, batches, token_bytes, draws=4)
        many = windows_nll(model, batches, token_bytes, draws=32)
    assert few[2:] == many[2:] == (5 * 64, 5 * 64)  # tokens and bytes
    assert many[1] < few[1] / 4  # 8x the draws: the variance of the estimate shrinks ~8x
    assert abs(many[0] / 64 - exact) < 4 * math.sqrt(many[1]) / 64 + 1e-3
    with pytest.raises(LmforgeError, match="at least 2 draws"):
        windows_nll(model, batches, token_bytes, draws=1)


class CertainModel(MaskedDiffusionLM):
    """Predicts `answer` at every position with certainty, whatever it reads."""

    def __init__(self, answer):
        super().__init__(DiffusionConfig(vocab_size=10, block_size=32, n_layer=1, n_head=1, n_embd=4))
        self.answer = torch.tensor(answer)
        self.calls = []

    def denoise(self, xt):
        self.calls.append(xt.clone())
        logits = torch.full((*xt.shape, 10), -1e4)
        logits.scatter_(-1, self.answer[None, :, None].expand(xt.size(0), -1, 1), 1e4)
        return logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block_len", [None, 4])
def test_sampler_reproduces_a_certain_answer_and_never_changes_visible_tokens(method, block_len):
    answer = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    model = CertainModel(answer)
    prompt = answer[:4]
    for steps in (8, 4):  # steps = length, and fewer steps than tokens
        model.calls.clear()
        out = diffusion_generate(model, prompt, 8, steps, method=method, block_len=block_len,
                                 temperature=1.0, seed=0, num_samples=2)
        assert out.tolist() == [answer, answer]
        assert len(model.calls) <= steps
        for before, after in zip(model.calls, model.calls[1:] + [out]):
            visible = before != model.mask_id
            assert torch.equal(after[visible], before[visible])


@pytest.mark.parametrize("method", METHODS)
def test_random_model_keeps_prompt_and_fills_every_position(method):
    model = tiny(vocab=16)
    prompt = [1, 2, 3]
    calls = []
    real = model.denoise
    model.denoise = lambda xt: (calls.append(xt.clone()), real(xt))[1]
    out = diffusion_generate(model, prompt, 12, 3, method=method, block_len=4, top_k=5, top_p=0.9,
                             temperature=0.8, seed=1, num_samples=3)
    assert len(calls) == 3  # one forward pass per step: 3 passes for 12 tokens
    assert (out[:, :3] == torch.tensor(prompt)).all() and (out < 16).all()
    for before, after in zip(calls, calls[1:] + [out]):
        visible = before != model.mask_id
        assert torch.equal(after[visible], before[visible])
    again = diffusion_generate(model, prompt, 12, 3, method=method, block_len=4, top_k=5, top_p=0.9,
                               temperature=0.8, seed=1, num_samples=3)
    assert torch.equal(out, again)


def test_sampler_errors():
    model = tiny()
    with pytest.raises(LmforgeError, match="one step per block"):
        diffusion_generate(model, [1], 8, 1, block_len=4)
    with pytest.raises(LmforgeError, match="context window"):
        diffusion_generate(model, [1] * 30, 8, 8)
    with pytest.raises(LmforgeError, match="unknown diffusion sampler"):
        diffusion_generate(model, [1], 8, 8, method="nope")


def test_pretrain_sample_generate_score_through_the_cli(tiny_data, tmp_path):
    from conftest import run_cli

    run = tmp_path / "run"
    code, out, err = run_cli("pretrain", "--arch", "diffusion", "--model", "tiny", "--data-dir", tiny_data,
                             "--out", run, "--max-steps", "20", "--batch-size", "8", "--seq-len", "64",
                             "--eval-tokens", "4096", "--compile", "off", "--no-progress")
    assert code == 0, err
    summary = json.loads(out[out.index("{"):])
    # Reported as a bound with its error bar, never under the likelihood's name.
    assert "val_bpb" not in summary and "val_loss" not in summary
    assert 0 < summary["val_bpb_bound"] < 8.0 * 2 and 0 < summary["val_bpb_bound_stderr"] < 0.5
    assert (run / "loss.png").exists()
    code, out, err = run_cli("eval", "--checkpoint", run, "--data-dir", tiny_data, "--max-tokens", "4096",
                             "--bound-draws", "3", "--out", tmp_path / "eval.json", "--no-progress")
    assert code == 0, err
    metrics = next(iter(json.loads((tmp_path / "eval.json").read_text())["tasks"].values()))["metrics"]
    assert set(metrics) == {"loss_bound", "perplexity_bound", "bits_per_byte_bound", "bits_per_byte_bound_stderr"}
    assert "bits_per_byte_bound" in out and metrics["bits_per_byte_bound_stderr"] > 0
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["model_family"] == "diffusion"
    for cmd in (["sample", "--prompt", "def ", "--num-samples", "2"], ["generate", "def "],
                ["generate", "def ", "--dtype", "bf16"]):  # weights cast once, as for any family
        code, out, err = run_cli(*cmd, "--checkpoint", run, "--max-new-tokens", "16", "--steps", "4",
                                 "--block-len", "8", "--seed", "0", "--remasking", "random")
        assert code == 0 and "Traceback" not in err, err
    code, out, err = run_cli("score", "--checkpoint", run, "import os", "zq xv kj")
    assert code == 0, err
    assert out.count("import os") == 1 and "zq xv kj" in out
    from lmforge.inference.engine import Engine
    from lmforge.inference.scheduler import Scheduler
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(run)
    tok = load_checkpoint_tokenizer(run)
    # Chat, tools and the server decode token by token: refused up front, one line saying what to use.
    with pytest.raises(LmforgeError, match="fills whole blocks of tokens at once with its samplers"):
        Engine(model, tok)
    # The server's scheduler writes each reply whole (8 positions, 4 passes) and hands it out token by
    # token; min_p is not offered by the diffusion samplers.
    from lmforge.inference.scheduler import SamplingParams

    sched, events = Scheduler(model, tok, diffusion_steps=4), []
    seq = sched.submit([tok.bos_id] + tok.encode("def "), SamplingParams(max_tokens=8, temperature=0), events.append)
    sched.step()
    assert seq.done and events[-1].kind == "done" and 1 <= events[-1].completion_tokens <= 8
    assert "".join(e.text for e in events if e.kind == "text") == tok.decode(
        [t for t in seq.tokens if t not in tok.stop_ids])
    with pytest.raises(LmforgeError, match="min_p"):
        sched.submit([tok.bos_id], SamplingParams(max_tokens=8, min_p=0.1), events.append)
    with pytest.raises(LmforgeError, match="samplers"):
        model.new_cache(1)
    for cmd in (["dpo", "--data", "synthetic:arithmetic:20", "--out", tmp_path / "dpo"],
                ["chat", "--tools"]):  # a preference stage; tool calls in a reply written all at once
        code, out, err = run_cli(*cmd, "--checkpoint", run)
        assert code != 0 and "Traceback" not in err and ("lmforge chat" in err or "--tools" in err), err
    assert not (tmp_path / "dpo").exists()


# ----------------------------------------------------------------------------- SFT and chat (LLaDA-style)


def test_sft_rows_pad_the_reply_with_end_of_turn_targets():
    from lmforge.stages.sft import Example, SFTTask, collate

    short, full = Example([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), Example(list(range(1, 9)), [0, 0, 1, 1, 1, 1, 1, 1])
    end = 99
    x, y = collate([short, full], pad_id=0, device="cpu", fill=(end, 7))
    assert x[0].tolist() == [1, 2, 3, 4, end, end, end]
    assert y[0].tolist() == [-100, -100, 4, 5, end, end, end]  # the prompt is context; the tail is taught
    assert y[1].tolist() == [-100, 3, 4, 5, 6, 7, 8]
    task = SFTTask([[short, full]], [1.0], [], pad_id=0, batch_size=2, seed=0, device="cpu", fill=(end, 7))
    assert task.targets(short) + task.targets(full) == int((y != -100).sum())
    x, y = collate([short, full], pad_id=0, device="cpu")  # autoregressive: padding ignored
    assert y[0].tolist() == [-100, -100, 4, 5, -100, -100, -100]


def test_sft_then_chat_answers_with_a_diffusion_model(tiny_data, tmp_path):
    """A diffusion model fine-tuned on two exchanges answers each in chat: the prompt stays visible,
    the reply (a fixed number of masked positions) is filled in --steps passes and cut at its end
    of turn."""
    from conftest import run_cli

    base = tmp_path / "base"
    code, _, err = run_cli("pretrain", "--arch", "diffusion", "--model", "tiny", "--data-dir", tiny_data,
                           "--out", base, "--max-steps", "1", "--batch-size", "2", "--seq-len", "32",
                           "--eval-every", "0", "--compile", "off", "--no-progress")
    assert code == 0, err
    pairs = {"ping": "pong pong", "colour?": "red"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in pairs.items()))
    run = tmp_path / "sft"
    code, out, err = run_cli("sft", "--checkpoint", base, "--data", data, "--out", run, "--max-steps", "600",
                             "--batch-size", "4", "--seq-len", "24", "--lr", "3e-3", "--val-fraction", "0",
                             "--eval-every", "0", "--compile", "off", "--no-progress")
    assert code == 0, err
    import sys
    from io import StringIO

    stdin = sys.stdin
    try:
        sys.stdin = StringIO("ping\n/reset\ncolour?\n")
        code, out, err = run_cli("chat", "--checkpoint", run, "--temperature", "0", "--max-new-tokens", "12",
                                 "--steps", "12")
    finally:
        sys.stdin = stdin
    assert code in (0, None), err
    assert out.splitlines() == list(pairs.values())
    # The server answers the same, each reply written whole and handed out as decoded ones are.
    from fastapi.testclient import TestClient

    from lmforge.serve.app import ServeConfig, create_app
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(run)
    with TestClient(create_app(model, load_checkpoint_tokenizer(run), ServeConfig(model_name="m"))) as client:
        for q, a in pairs.items():
            body = {"model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0}
            choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
            assert (choice["message"]["content"], choice["finish_reason"]) == (a, "stop")



# ----------------------------------------------------------------------------- on the shared Trainer


def diffusion_run(tiny_data, out, *, resume=False, steps=10, **train):
    cfg = TrainConfig(out_dir=str(out), max_steps=steps, ckpt_every=5, eval_every=0, log_every=1, warmup_steps=2,
                      progress=False, **{"dtype": "fp32", "compile": "off", **train})
    opts = PretrainOptions(data_dir=str(tiny_data), model="diffusion", preset="tiny", model_overrides={"dropout": 0.1},
                           batch_size=4, seq_len=24, eval_tokens=1024, resume=resume)
    return pretrain(opts, cfg)


def losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]


def test_interrupted_run_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """The diffusion times and masks are drawn from the RNG, so its state must resume too
    (conftest.check_exact_resume)."""
    straight, resumed = check_exact_resume(lambda out, resume=False: diffusion_run(tiny_data, out, resume=resume),
                                           tmp_path, monkeypatch)
    assert resumed["val_bpb_bound"] == straight["val_bpb_bound"]


def test_bf16_training_tracks_fp32(tiny_data, tmp_path):
    """The same run under bf16 autocast: the same random draws, losses within bf16's rounding."""
    diffusion_run(tiny_data, tmp_path / "fp32", steps=6)
    diffusion_run(tiny_data, tmp_path / "bf16", steps=6, dtype="bf16")
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "fp32"), rel=3e-2)


def test_compiled_training_matches_eager(tiny_data, tmp_path):
    """torch.compile'd training (the times and masks are drawn inside the compiled forward) equals eager
    training once inductor draws its random numbers as eager does."""
    import torch._inductor.config as inductor_config

    diffusion_run(tiny_data, tmp_path / "eager", steps=3)
    with inductor_config.patch(fallback_random=True):  # not monkeypatch: its undo deletes the config entry
        diffusion_run(tiny_data, tmp_path / "compiled", steps=3, compile="on")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)


def test_ddp_two_processes_keep_one_model_with_their_own_noise(tiny_data, tmp_path):
    """torchrun, 2 gloo processes: every rank ends with bit-identical weights (gradients averaged),
    each drew its own diffusion times (seeded per rank), and the checkpoint records both."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(REPO / "tests" / "ddp_diffusion_worker.py"), str(tiny_data), str(tmp_path)],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"weights{rank}.pt", weights_only=True) for rank in (0, 1))
    torch.manual_seed(1337)  # pretrain's default seed: the weights both ranks started from
    start = MaskedDiffusionLM(get_family("diffusion").config("tiny", vocab_size=268)).state_dict()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert any(not torch.equal(w0[k], start[k]) for k in w0)
    t0, t1 = (json.loads((tmp_path / f"times{rank}.json").read_text()) for rank in (0, 1))
    assert len(t0) == len(t1) >= 4 and t0 != t1
    state = json.loads((ckpt_io.resolve_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["world_size"] == 2 and state["model_family"] == "diffusion"
    assert len(losses(tmp_path / "run")) == 4 and all(math.isfinite(x) for x in losses(tmp_path / "run"))
