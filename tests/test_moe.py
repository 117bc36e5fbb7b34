"""Mixture of experts (lmforge/models/moe.py): routing against a token-by-token reference, capacity,
both balancing methods, what the Trainer sees (the loss, the logged loads, the plot, exact resume,
two DDP processes), the optimizer groups, the accounting, and decoding through the protocol."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import check_exact_resume, run_cli, torchrun

from lmforge.models.moe import MoE
from lmforge.models.protocol import check_param_groups
from lmforge.models.transformer import GPT, MLP, get_config
from lmforge.stages.pretrain import PretrainOptions, pretrain
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.logs import read_log
from lmforge.train.loop import TrainConfig
from lmforge.train.optim import Muon, build_optimizers

VOCAB = 268  # the byte-level tokenizer of the tiny_data fixture


def layer(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=VOCAB, n_experts=kw.pop("n_experts", 4), moe_hidden=32, **kw)
    moe = GPT(cfg).layers[0].mlp
    with torch.no_grad():  # a router that prefers different experts for different tokens
        moe.router.weight.normal_(0, 1.0)
    return moe


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: its own top-k experts, weighted by their scores (renormalised if asked)."""
    flat = x.reshape(-1, x.size(-1))
    out = torch.zeros_like(flat)
    for i, t in enumerate(flat):
        logits = moe.router.weight.float() @ t.float()
        scores = logits.softmax(-1) if moe.gate == "softmax" else logits.sigmoid()
        chosen = (scores + (moe.expert_bias if moe.balance == "bias" else 0)).topk(moe.top_k).indices
        w = scores[chosen] / (scores[chosen].sum() if moe.norm_topk else 1)
        out[i] = sum(w[j] * moe.experts[e](t[None])[0] for j, e in enumerate(chosen.tolist()))
        if moe.shared is not None:
            out[i] += moe.shared(t[None])[0]
    return out.reshape(x.shape)


@pytest.mark.parametrize("kw", [dict(), dict(moe_norm_topk=False), dict(moe_gate="sigmoid"),
                                dict(moe_shared=1, moe_top_k=1), dict(moe_balance="bias")])
def test_routing_matches_a_token_by_token_reference(kw):
    moe = layer(**kw).eval()
    if moe.balance == "bias":
        moe.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.2, 0.0]))  # chooses, never weights
    x = torch.randn(3, 7, moe.router.in_features)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(moe_capacity=0.6), dict(mlp="gelu", moe_top_k=1)])
def test_grouped_experts_match_the_loop_forward_and_backward(kw, monkeypatch):
    """One grouped product per projection (F.grouped_mm over padded blocks of rows) against each expert
    run on its own rows: the same outputs and the same gradients for the input, the router and every
    expert, dropped assignments included."""
    def run(moe, x):
        moe.zero_grad()
        x = x.clone().requires_grad_()
        (moe(x) * torch.linspace(-1, 1, x.size(-1))).sum().backward()
        return [x.grad] + [p.grad for p in moe.parameters()]

    moe = layer(**kw).train()
    x = torch.randn(3, 40, moe.router.in_features)  # 120 tokens: blocks padded to 4 rows
    ran = []
    kernel = MLP.grouped
    monkeypatch.setattr(MLP, "grouped", staticmethod(lambda *a: ran.append(kernel(*a)) or ran[-1]))
    grouped = run(moe, x)
    assert ran and ran[0] is not None
    monkeypatch.setattr(MLP, "grouped", staticmethod(lambda *a: None))
    looped = run(moe, x)
    for a, b in zip(grouped, looped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_capacity_drops_assignments_past_the_limit_in_token_order():
    moe = layer(moe_capacity=0.5).eval()  # 0.5 * 12 tokens * 2 / 4 experts = 3 assignments per expert
    x = torch.randn(1, 12, moe.router.in_features)
    _, _, chosen, weights = moe.route(x[0])
    with torch.no_grad():
        got = moe(x)[0]
    want = torch.zeros_like(got)
    taken = [0] * moe.n_experts
    for i in range(12):  # first come, first served
        for j, e in enumerate(chosen[i].tolist()):
            if taken[e] < 3:
                taken[e] += 1
                want[i] += weights[i, j] * moe.experts[e](x[0, i][None])[0]
    assert sum(taken) < 24  # something was dropped
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_aux_loss_is_the_switch_formula_over_valid_tokens_only():
    moe = layer(moe_aux_coef=0.1).train()
    x = torch.randn(2, 6, moe.router.in_features)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 3:] = False
    moe(x, valid)
    flat, m = x.reshape(-1, x.size(-1)), valid.reshape(-1)
    logits = flat @ moe.router.weight.t()
    probs = logits.softmax(-1)[m]
    chosen = probs.topk(2).indices
    share = torch.stack([(chosen == e).sum() for e in range(4)]).float() / (m.sum() * 2)
    want = 0.1 * 4 * (share * probs.mean(0)).sum()
    torch.testing.assert_close(moe.aux_loss, want)
    # a masked token changes nothing that balancing sees
    loss, stats = moe.aux_loss.item(), moe._step_stats.clone()
    moe._step_stats.zero_()
    x2 = x.clone()
    x2[1, 4] = torch.randn(x.size(-1)) * 5
    moe(x2, valid)
    assert moe.aux_loss.item() == pytest.approx(loss) and torch.equal(moe._step_stats, stats)


def test_bias_balancing_evens_out_a_collapsed_router():
    """Every token prefers expert 0 (a router collapsed onto it); bias updates alone, no gradient, move
    the loads toward the mean; the weights of the chosen experts stay the unbiased scores."""
    moe = layer(moe_balance="bias", moe_bias_rate=0.02, moe_top_k=1).train()
    x = torch.randn(4, 32, moe.router.in_features)
    x[..., 0] = 1.0  # a constant feature, through which expert 0 gets +4 on every token
    with torch.no_grad():
        moe.router.weight.mul_(0.1)  # the rest: token-dependent logits of std ~0.8
        moe.router.weight[:, 0] = 0.0
        moe.router.weight[0, 0] = 4.0
    violations = []
    for _ in range(150):
        moe(x)
        moe.after_step()
        violations.append(moe.pop_stats()["max_violation"])
    assert violations[0] > 2.0 and violations[-1] < 0.5, (violations[0], violations[-1])
    assert moe.expert_bias[0] < moe.expert_bias[1:].min() - 0.5  # it had to offset expert 0's lead


def test_model_loss_groups_accounting_and_decoding():
    cfg = get_config("tiny", vocab_size=VOCAB, n_experts=4, moe_top_k=2, moe_hidden=32)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randint(0, VOCAB, (2, 16))
    y = torch.randint(0, VOCAB, (2, 16))
    loss = model(x, y)
    lm = torch.nn.functional.cross_entropy(model(x).view(-1, VOCAB), y.view(-1))
    assert loss.item() == pytest.approx(lm.item() + sum(m.aux_loss.item() for m in model.moe_layers()), rel=1e-5)
    model.after_step()
    metrics = model.train_metrics()
    assert {"lm_loss", "moe_aux_loss", "moe_max_violation"} <= set(metrics)
    assert sum(metrics[f"moe_share_{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-5)
    model.eval()
    assert model(x, y).item() == pytest.approx(torch.nn.functional.cross_entropy(
        model(x).view(-1, VOCAB), y.view(-1)).item())  # validation is the LM loss alone

    groups = model.param_groups()
    check_param_groups(model, groups)
    routers = {id(m.router.weight) for m in model.moe_layers()}
    assert routers <= {id(p) for p in groups["embedding"]}
    experts = [p for m in model.moe_layers() for e in m.experts for p in e.parameters()]
    assert {id(p) for p in experts} <= {id(p) for p in groups["matrix"]} and all(p.ndim == 2 for p in experts)
    adamw, muon = build_optimizers(model, name="muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                   muon_lr=0.02, muon_momentum=0.95)
    assert isinstance(muon, Muon) and {id(p) for p in experts} <= {id(p) for g in muon.param_groups
                                                                    for p in g["params"]}

    per_expert = sum(p.numel() for p in model.moe_layers()[0].experts[0].parameters())
    assert model.num_params() - model.num_params(active=True) == per_expert * 2 * cfg.n_layer
    dense = GPT(get_config("tiny", vocab_size=VOCAB, mlp_hidden=64))  # one MLP as wide as two experts
    router = sum(m.router.weight.numel() for m in model.moe_layers())
    assert model.flops_per_token() == dense.flops_per_token() + 6 * router

    from lmforge.inference.engine import Engine
    engine = Engine(model)
    cached = engine.generate(x[:, :8].tolist(), 12, temperature=0)
    plain = engine.generate(x[:, :8].tolist(), 12, temperature=0, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in plain]


def moe_run(tiny_data, out, *, resume=False, balance="bias", steps=10, compile="off", capacity=None):
    cfg = TrainConfig(out_dir=str(out), max_steps=steps, ckpt_every=5, eval_every=0, log_every=1, warmup_steps=2,
                      dtype="fp32", compile=compile, progress=False)
    opts = PretrainOptions(data_dir=str(tiny_data), preset="tiny", batch_size=4, seq_len=32, eval_tokens=1024,
                           resume=resume, model_overrides={"n_experts": 4, "moe_hidden": 32, "moe_balance": balance,
                                                           "moe_bias_rate": 0.01, "moe_capacity": capacity})
    return pretrain(opts, cfg)


def test_trainer_logs_loads_plots_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """The routing biases are state: a resumed run continues the same balancing, bit for bit."""
    straight, resumed = check_exact_resume(lambda out, resume=False: moe_run(tiny_data, out, resume=resume),
                                           tmp_path, monkeypatch)
    log = [r for r in read_log(tmp_path / "straight" / "log.jsonl") if "loss" in r]
    assert all({"lm_loss", "moe_max_violation", "moe_share_0"} <= set(r) for r in log)
    assert (tmp_path / "straight" / "experts.png").stat().st_size > 10_000
    model, _ = ckpt_io.load_model(tmp_path / "straight")
    assert any(m.expert_bias.abs().sum() > 0 for m in model.moe_layers())  # the biases moved and were saved


@pytest.mark.parametrize("capacity", [None, 0.6])
def test_compiled_training_matches_eager_and_compiles_once(tiny_data, tmp_path, capacity):
    """Every shape in the layer is fixed by the batch (the loads change every step, the row buffer does
    not) and the statistics are tensors, so the first step's graph serves every later one."""
    eager = moe_run(tiny_data, tmp_path / "eager", balance="aux", steps=3, capacity=capacity)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = moe_run(tiny_data, tmp_path / "compiled", balance="aux", steps=3, compile="on", capacity=capacity)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    log = [r for r in read_log(tmp_path / "compiled" / "log.jsonl") if "loss" in r]
    assert all("moe_aux_loss" in r for r in log)


def test_ddp_two_processes_share_the_loads(tiny_data, tmp_path):
    """torchrun with 2 gloo processes of 2 rows == one process of 4 rows: the same losses and the same
    routing biases, which each rank moves from the loads of both (all-reduced in after_step)."""
    argv = ["pretrain", "--model", "tiny", "--data-dir", str(tiny_data), "--seq-len", "32", "--max-steps", "4",
            "--eval-every", "0", "--ckpt-every", "0", "--eval-tokens", "1024", "--log-every", "1",
            "--warmup-steps", "1", "--optimizer", "adamw", "--dtype", "fp32", "--compile", "off", "--device", "cpu",
            "--no-progress", "--set", "n_experts=4", "--set", "moe_hidden=32", "--set", "moe_balance=bias",
            "--set", "moe_bias_rate=0.01"]
    code, _, err = run_cli(*argv, "--batch-size", "4", "--out", tmp_path / "one")
    assert code == 0, err
    torchrun("-m", "lmforge.cli", *argv, "--batch-size", "2", "--out", tmp_path / "two")

    def records(out):
        return [r for r in read_log(out / "log.jsonl") if "loss" in r]

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4, abs=1e-5)
    assert [r["moe_max_violation"] for r in two] == pytest.approx([r["moe_max_violation"] for r in one], abs=1e-4)
    a, b = (ckpt_io.load_model(tmp_path / x)[0] for x in ("one", "two"))
    for m1, m2 in zip(a.moe_layers(), b.moe_layers()):
        assert torch.equal(m1.expert_bias, m2.expert_bias) and m1.expert_bias.abs().sum() > 0


def test_cli_reports_active_parameters_and_export_refuses_routing_biases(tiny_data, tmp_path):
    code, out, err = run_cli("pretrain", "--model", "tiny", "--data-dir", tiny_data, "--out", tmp_path / "run",
                             "--max-steps", "2", "--eval-tokens", "1024", "--compile", "off", "--no-progress",
                             "--set", "n_experts=4", "--set", "moe_balance=bias", "--set", "qk_norm=true")
    assert code == 0, err
    model, _ = ckpt_io.load_model(tmp_path / "run")
    assert f"{model.num_params(active=True) / 1e6:.2f}M active" in out + err
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "run", tmp_path / "hf")
    assert code == 2 and "routing biases" in err


def test_bad_moe_settings_are_one_error():
    from lmforge.common import LmforgeError

    for kw, match in ((dict(n_experts=4, moe_top_k=5), "moe_top_k"), (dict(n_experts=4, moe_gate="relu"), "moe_gate"),
                      (dict(n_experts=4, moe_capacity=0.0), "moe_capacity")):
        with pytest.raises(LmforgeError, match=match):
            get_config("tiny", **kw)
    assert isinstance(GPT(get_config("tiny", n_experts=2, moe_top_k=1)).layers[0].mlp.experts[0], MLP)
    cfg = get_config("tiny", n_experts=2, moe_balance="none")
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_served_and_evaluated_through_the_protocol(tmp_path):
    """The scheduler, the server and the eval harness need nothing new for a mixture of experts."""
    from fastapi.testclient import TestClient

    from lmforge.eval.harness import LmforgeModel
    from lmforge.eval.lm import evaluate_text
    from lmforge.inference.engine import Engine
    from lmforge.serve.app import ServeConfig, create_app
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, n_experts=4, moe_hidden=32)).eval()
    with TestClient(create_app(model, tok, ServeConfig(model_name="m"))) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "def ", "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200, r.text
    [ref] = Engine(model, tok).generate([[tok.bos_id] + tok.encode("def ")], 10, temperature=0)
    assert r.json()["choices"][0]["text"] == ref.text
    metrics = evaluate_text(LmforgeModel(model, tok), "import os\nprint(os.getcwd())\n")
    assert 0 < metrics["bits_per_byte"] < 16
