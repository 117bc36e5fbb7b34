"""The IsoFLOP sweep (lmforge/scaling/sweep.py) and the scaling commands: the grid's FLOPs
bookkeeping, the choice of sizes per budget, a schedule that ends at the budget, resume, the sweep
folder's checks, and fit / predict / pretrain --dry-run --scaling-fit on a folder of runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from lmforge.common import LmforgeError
from lmforge.scaling import sweep as sw
from lmforge.scaling.options import SWEEP_PRESETS, SWEEP_TRAIN_DEFAULTS, SweepOptions
from lmforge.train.config import TrainConfig


def ok(result):
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def test_grid_spends_each_budget_within_one_step():
    """tokens x FLOPs per token = the budget within one optimizer step, with the FLOPs per token of the
    real model (not the meta one the grid is planned on), and N is every linear layer's weights."""
    from lmforge.models.transformer import GPT, get_config

    opts = SweepOptions()
    grid = sw.plan_sweep(opts, vocab_size=512)
    assert {p.budget for p in grid} == set(SWEEP_PRESETS["cpu"].flops)
    for p in grid:
        per_step = p.flops_per_token * p.tokens_per_step
        assert abs(p.flops - p.budget) <= per_step / 2 + 1e-6 * p.budget
        assert p.steps >= opts.min_steps
        cfg = get_config("cpu", vocab_size=512, **sw.model_overrides(SWEEP_PRESETS["cpu"], p.depth, 128))
        model = GPT(cfg)
        assert p.flops_per_token == model.flops_per_token(128)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert p.params == linear
        # 6N for the multiplies plus attention's 12 * layers * heads * head_dim * T
        assert p.flops_per_token == 6 * linear + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 128
        assert cfg.n_embd == 16 * p.depth and cfg.n_layer == p.depth


def test_each_budget_gets_consecutive_sizes_centred_on_the_prior():
    opts = SweepOptions(sizes=4, tokens_per_param=20.0, min_steps=25)
    grid = sw.plan_sweep(opts, vocab_size=512)
    preset = SWEEP_PRESETS["cpu"]
    for budget in preset.flops:
        depths = [p.depth for p in grid if p.budget == budget]
        assert len(depths) == 4 and depths == list(range(depths[0], depths[0] + 4))
        # brute force: of every window of 4 consecutive eligible depths, this one's middle (in log N) is
        # nearest the size that sees 20 tokens per parameter
        eligible = [sw.point_at(preset, budget, d, vocab_size=512, batch_size=8, seq_len=128) for d in preset.depths]
        eligible = [p for p in eligible if p.steps >= 25]
        guess = math.log(math.sqrt(budget / 120.0))

        def miss(w, guess=guess):
            return abs((math.log(w[0].params) + math.log(w[-1].params)) / 2 - guess)

        best = min((eligible[i:i + 4] for i in range(len(eligible) - 3)), key=miss)
        assert depths == [p.depth for p in best]
    fixed = sw.plan_sweep(opts, vocab_size=512, flops=[1e12], depths=[2, 5])
    assert [p.depth for p in fixed] == [2, 5]
    with pytest.raises(LmforgeError, match="depth 6 would train 19 steps, fewer than --min-steps 25"):
        sw.plan_sweep(opts, vocab_size=512, flops=[1e11], depths=[2, 6])
    with pytest.raises(LmforgeError, match="too small"):
        sw.plan_sweep(opts, vocab_size=512, flops=[1e8])


TINY = dict(flops=[2e9, 4e9], depths=[1, 2])


def vocab_of(data_dir) -> int:
    from lmforge.stages.pretrain import load_data_tokenizer

    return load_data_tokenizer(data_dir)[0].vocab_size


def tiny_config(**kw):
    return TrainConfig(**{**SWEEP_TRAIN_DEFAULTS, "progress": False, **kw})


def test_sweep_trains_every_point_to_its_budget_and_resumes(tiny_data, tmp_path, monkeypatch):
    """A sweep's runs: exactly the planned tokens, the learning-rate decay ending with the last step. A run cut
    short resumes from its checkpoint to the loss an uninterrupted sweep reaches, and finished runs
    are skipped."""
    from lmforge.stages.pretrain import NextTokenTask
    from lmforge.train.logs import read_log

    opts = SweepOptions(eval_tokens=4096, min_steps=1)
    grid = sw.plan_sweep(opts, vocab_size=vocab_of(tiny_data), **TINY)
    straight = sw.run_sweep(grid, opts, tiny_config(), str(tiny_data), tmp_path / "straight")
    for rec, p in zip(straight, grid):
        assert rec["tokens"] == p.tokens and rec["flops"] == p.flops and rec["loss"] > 0
        log = [r for r in read_log(tmp_path / "straight" / "runs" / p.name / "log.jsonl") if "lr_mult" in r]
        # the linear decay's horizon is this run's last step: its update is the last one before zero
        decay = TrainConfig().decay_frac
        assert log[-1]["step"] == p.steps and log[-1]["lr_mult"] == pytest.approx(1 / (decay * p.steps), abs=1e-5)

    calls, real_loss = [], NextTokenTask.loss
    cut_at = grid[-1].steps * 3 // 4 + 2  # after its third checkpoint (every steps // 4)

    def crash(self, model, batch):
        calls.append(1)
        if len(calls) == sum(p.steps for p in grid[:-1]) + cut_at:
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    monkeypatch.setattr(NextTokenTask, "loss", crash)
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(grid, opts, tiny_config(), str(tiny_data), tmp_path / "cut")
    monkeypatch.setattr(NextTokenTask, "loss", real_loss)
    last = tmp_path / "cut" / "runs" / grid[-1].name
    assert not (last / sw.RESULT_FILE).exists() and (last / "checkpoints").exists()

    resumed = sw.run_sweep(grid, opts, tiny_config(), str(tiny_data), tmp_path / "cut")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_finished_runs_are_not_trained_again(tiny_data, tmp_path, monkeypatch):
    opts = SweepOptions(eval_tokens=4096, min_steps=1)
    grid = sw.plan_sweep(opts, vocab_size=vocab_of(tiny_data), **TINY)
    out = tmp_path / "s"
    out.mkdir()
    sw.check_sweep_folder(out, sw.sweep_record(opts, str(tiny_data), "fp", 259))
    first = sw.run_sweep(grid, opts, tiny_config(), str(tiny_data), out)

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("lmforge.stages.pretrain.pretrain", no_training)
    assert sw.run_sweep(grid, opts, tiny_config(), str(tiny_data), out) == first
    assert sorted(r["name"] for r in sw.collect_runs(out)) == sorted(p.name for p in grid)


def test_sweep_folder_refuses_another_experiment(tiny_data, tmp_path):
    opts = SweepOptions()
    sw.check_sweep_folder(tmp_path, sw.sweep_record(opts, str(tiny_data), "abc", 259))
    sw.check_sweep_folder(tmp_path, sw.sweep_record(opts, str(tiny_data), "abc", 259))  # same: fine
    with pytest.raises(LmforgeError, match="tokenizer_fingerprint"):
        sw.check_sweep_folder(tmp_path, sw.sweep_record(opts, str(tiny_data), "other", 259))
    with pytest.raises(LmforgeError, match="batch_size"):
        sw.check_sweep_folder(tmp_path, sw.sweep_record(SweepOptions(batch_size=4), str(tiny_data), "abc", 259))


# ----------------------------------------------------------------------------- the commands


def law(n, d):
    """A known loss surface (nats per token) the fake sweep's runs follow."""
    return 1.9 + 300.0 / n ** 0.34 + 500.0 / d ** 0.3


@pytest.fixture(scope="module")
def fitted_sweep(tmp_path_factory, tiny_data):
    """A sweep folder whose run records follow `law` exactly, fitted by `lmforge scaling fit`."""
    out = tmp_path_factory.mktemp("fake_sweep")
    opts = SweepOptions(min_steps=1)
    sw.check_sweep_folder(out, sw.sweep_record(opts, str(tiny_data), "fp", vocab_of(tiny_data)))
    for p in sw.plan_sweep(opts, vocab_size=vocab_of(tiny_data), flops=[1e11, 3e11, 1e12, 3e12],
                           depths=[1, 2, 3, 4, 5, 6]):
        loss = law(p.params, p.tokens)
        rec = {**p.__dict__, "name": p.name, "tokens": p.tokens, "flops": p.flops, "loss": loss,
               "bpb": loss / math.log(2) / 1.0, "train_time": 1.0}
        (out / "runs" / p.name).mkdir(parents=True)
        (out / "runs" / p.name / sw.RESULT_FILE).write_text(json.dumps(rec))
    printed = ok(run_cli("scaling", "fit", out, "--bootstrap", "20"))
    return out, printed


def test_fit_prints_exponents_and_writes_plots(fitted_sweep):
    out, printed = fitted_sweep
    assert "approach 3" in printed and "tokens per parameter" in printed
    for name in ("isoflop.png", "frontier.png", "parametric.png", "fit.json"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "fit.json").read_text())
    # the backtest refits without the largest budget: on runs that follow one law exactly it predicts
    # that budget's runs almost exactly, and picks the size the law prefers
    assert "backtest:" in printed and saved["backtest"]["budget"] == 3e12
    assert len(saved["backtest"]["runs"]) == 6
    assert all(abs(row["error"]) < 0.005 for row in saved["backtest"]["runs"])
    assert saved["backtest"]["pick"] == saved["backtest"]["best"]
    assert saved["approach3"]["alpha"] == pytest.approx(0.34, abs=0.02)
    assert saved["approach3"]["beta"] == pytest.approx(0.30, abs=0.02)


def test_predict_gives_the_law_for_a_size_and_the_best_size_for_a_budget(fitted_sweep, tiny_data):
    out, _ = fitted_sweep
    printed = ok(run_cli("scaling", "predict", out, "--params", "2e6", "--tokens", "4e7"))
    value = float(printed.split("predicted val loss ")[1].split()[0])
    assert value == pytest.approx(law(2e6, 4e7), rel=0.01)
    assert "extrapolation" in printed
    printed = ok(run_cli("scaling", "predict", out, "--flops", "1.2e13"))
    assert "best size of this sweep's dial" in printed and "lmforge pretrain" in printed
    # the dial's best depth is the one whose (N, D) the known law likes best
    preset = SWEEP_PRESETS["cpu"]
    truth = min(range(1, 65), key=lambda d: law(*(lambda p: (p.params, p.tokens))(
        sw.point_at(preset, 1.2e13, d, vocab_size=vocab_of(tiny_data), batch_size=8, seq_len=128))))
    pick = printed.split("best size of this sweep's dial at this budget (approach 3): depth ")[1]
    assert int(pick.split()[0]) == truth
    assert "size nearest the IsoFLOP frontier (approach 2" in printed


def test_pretrain_dry_run_prints_the_prediction(fitted_sweep, tiny_data):
    out, _ = fitted_sweep
    printed = ok(run_cli("pretrain", "--data-dir", tiny_data, "--out", "unused", "--dry-run", "--scaling-fit", out,
                         "--model", "cpu", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "2",
                         "--block-size", "128", "--seq-len", "128", "--batch-size", "8", "--max-steps", "3000"))
    n = sw.point_at(SWEEP_PRESETS["cpu"], 1e12, 2, vocab_size=vocab_of(tiny_data), batch_size=8, seq_len=128).params
    value = float(printed.split("predicted val loss ")[1].split()[0])
    assert value == pytest.approx(law(n, 3000 * 8 * 128), rel=0.01)


def test_clear_errors(tmp_path, tiny_data):
    code, _, err = run_cli("scaling", "predict", tmp_path, "--flops", "1e12")
    assert code == 2 and err.startswith("error:") and "not been fitted" in err
    code, _, err = run_cli("scaling", "predict", tmp_path, "--params", "1e6")
    assert code == 2 and "--params and --tokens go together" in err
    code, _, err = run_cli("scaling", "sweep", "--data-dir", tiny_data, "--out", tmp_path / "x", "--flops", "abc")
    assert code == 2 and "comma-separated numbers" in err
    code, _, err = run_cli("scaling", "fit", tmp_path)
    assert code == 2 and "not a sweep folder" in err
    code, _, err = run_cli("scaling", "sweep", "--data-dir", tiny_data, "--out", tmp_path / "x", "--flops", "1e12,nan")
    assert code == 2 and "expected positive numbers" in err
    code, _, err = run_cli("scaling", "fit", tmp_path, "--level", "95")
    assert code == 2 and "interval coverage in (0, 1)" in err


def test_dry_run_prints_the_grid_and_an_estimate(tiny_data):
    printed = ok(run_cli("scaling", "sweep", "--data-dir", tiny_data, "--out", "unused", "--dry-run",
                         "--flops", "1e10,3e10", "--models", "1,2"))
    assert "6 N + 12 n_layer n_head head_dim T" in printed
    assert "4 runs over 2 budgets" in printed and "estimated" in printed and "min of training" in printed


def test_sweep_refuses_to_run_under_torchrun(monkeypatch, tiny_data, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # every rank would train every run into the same folders
    code, _, err = run_cli("scaling", "sweep", "--data-dir", tiny_data, "--out", tmp_path / "s")
    assert code == 2 and "without torchrun" in err and not (tmp_path / "s").exists()
