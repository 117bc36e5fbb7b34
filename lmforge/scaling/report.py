"""A sweep folder's fit and what it predicts: `lmforge scaling fit` and `lmforge scaling predict`.

`fit` reads every finished run of DIR (runs/<budget>/d<depth>/scaling.json), fits the three
approaches (lmforge.scaling.fit), prints them, draws the plots and saves DIR/fit.json, which holds
the parametric fit with its bootstrap samples: `predict` and `pretrain --dry-run --scaling-fit DIR`
give a loss with its interval from it without fitting again.

For a compute budget `predict` answers two questions. The closed form (under C = 6ND) says how
many parameters and tokens are optimal in the abstract; the dial says which size of this sweep's
family to train: every depth trained for the whole steps the budget buys (the exact FLOPs rule),
its predicted loss, and the best one, with the `lmforge pretrain` command that trains it.
"""
from __future__ import annotations

import math
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json, read_json
from lmforge.scaling.options import SweepPreset
from lmforge.scaling.sweep import collect_runs, point_at

FIT_FORMAT = "lmforge-scaling-fit"


def fit_sweep(folder: str | Path, *, bootstrap: int | None = None, level: float = 0.9, seed: int = 0) -> list[str]:
    """Fit, plot and save; returns the lines to print."""
    from lmforge.scaling.fit import fit_all, plot_scaling, summary_lines

    folder = Path(folder)
    records = collect_runs(folder)
    if not records:
        raise LmforgeError(f"{folder} has no finished runs yet (run `lmforge scaling sweep --out {folder}`)")
    result = fit_all(records, bootstrap=bootstrap, level=level, seed=seed)
    lines = summary_lines(result)
    plots = plot_scaling(records, result, folder)
    test, test_lines = backtest(records, level=level, seed=seed)
    lines += test_lines
    saved = {"format": FIT_FORMAT, "version": 1, "level": level, "runs": records, "summary": lines,
             "bytes_per_token": bytes_per_token(records), "backtest": test,
             **{name: (result[name].to_dict() if result.get(name) is not None else None)
                for name in ("approach1", "approach2", "approach3")}}
    atomic_write_json(folder / "fit.json", saved)
    return lines + ["", f"wrote {folder / 'fit.json'} and " + ", ".join(str(p) for p in plots)]


def backtest(records: list[dict], *, level: float, seed: int = 0, bootstrap: int = 20) -> tuple[dict | None, list[str]]:
    """Approach 3 fitted without the sweep's largest budget, predicting that budget's runs: the check
    to make before spending more compute on an extrapolation. A fit that misses its own largest budget
    by more than the accuracy needed will miss a larger one too. (None, []) with too few runs."""
    from lmforge.scaling.fit import parametric

    budgets = sorted({r["budget"] for r in records})
    train = [r for r in records if r["budget"] < budgets[-1]]
    test = sorted((r for r in records if r["budget"] == budgets[-1]), key=lambda r: r["params"])
    if len(budgets) < 3 or len(train) < 8:
        return None, []
    fit = parametric(train, bootstrap=bootstrap, seed=seed, level=level)
    rows = []
    for r in test:
        p = fit.predict(r["params"], r["tokens"], level=level)
        rows.append({"name": r["name"], "params": r["params"], "tokens": r["tokens"], "loss": r["loss"],
                     "predicted": float(p.loss), "lo": float(p.lo), "hi": float(p.hi),
                     "error": float(p.loss) / r["loss"] - 1})
    pick = min(rows, key=lambda row: row["predicted"])
    best = min(rows, key=lambda row: row["loss"])
    lines = ["", f"backtest: approach 3 fitted on the budgets below {budgets[-1]:.3g} ({len(train)} runs) predicts the "
             f"{budgets[-1]:.3g} runs:"]
    for row in rows:
        lines.append(f"  {row['name']:14} N {row['params']:>10,} D/N {row['tokens'] / row['params']:7.1f}: measured "
                     f"{row['loss']:.4f}, predicted {row['predicted']:.4f} [{row['lo']:.4f}, {row['hi']:.4f}] "
                     f"({100 * row['error']:+.1f}%)")
    lines.append(f"  it would pick {pick['name']} (error {100 * pick['error']:+.1f}%); the measured best is "
                 f"{best['name']}")
    return {"budget": budgets[-1], "runs": rows, "pick": pick["name"], "best": best["name"]}, lines


def bytes_per_token(records: list[dict]) -> float:
    """UTF-8 bytes per validation token (the same split for every run): loss / ln 2 / bpb."""
    return sum(r["loss"] / math.log(2) / r["bpb"] for r in records) / len(records)


def load_fit(folder: str | Path):
    """(the parametric fit, the saved fit record, the sweep record) of a fitted sweep folder."""
    from lmforge.scaling.fit import ParametricFit

    folder = Path(folder)
    path = folder / "fit.json"
    if not path.exists():
        raise LmforgeError(f"{folder} has not been fitted yet: run `lmforge scaling fit {folder}` first")
    saved = read_json(path, "scaling fit", fmt=FIT_FORMAT)
    if saved.get("approach3") is None:
        raise LmforgeError(f"{path} has no parametric fit (approach 3), which predictions need")
    sweep = read_json(folder / "sweep.json", "sweep record")
    return ParametricFit.from_dict(saved["approach3"]), saved, sweep


def loss_line(fit, saved: dict, params: float, tokens: float, level: float) -> str:
    p = fit.predict(params, tokens, level=level)
    bpt = saved["bytes_per_token"]
    per_byte = 1.0 / math.log(2) / bpt
    return (f"predicted val loss {p.loss:.4f} nats/token [{p.lo:.4f}, {p.hi:.4f}] ({round(100 * level)}% "
            f"prediction interval) = {p.loss * per_byte:.4f} bits/byte [{p.lo * per_byte:.4f}, {p.hi * per_byte:.4f}]")


def dial_choices(fit, sweep: dict, budget: float, depths=range(1, 65)) -> list[tuple]:
    """(depth, point, predicted loss) of every size of the sweep's dial that trains at least one
    step at `budget`, best first."""
    preset = SweepPreset(**{**sweep["preset_fields"], "depths": tuple(sweep["preset_fields"]["depths"]),
                            "flops": tuple(sweep["preset_fields"]["flops"])})
    out = []
    for d in depths:
        p = point_at(preset, budget, d, vocab_size=sweep["vocab_size"], batch_size=sweep["batch_size"],
                     seq_len=sweep["seq_len"])
        if budget / p.flops_per_token >= p.tokens_per_step:
            out.append((d, p, float(fit.loss(p.params, p.tokens))))
    return sorted(out, key=lambda t: t[2])


def point_text(p) -> str:
    return (f"N = {p.params:,}, {p.tokens:,} tokens = {p.steps:,} steps of {p.tokens_per_step:,}, "
            f"D/N = {p.tokens / p.params:.1f}, FLOPs {p.flops:.3g}")


def train_command(sweep: dict, depth: int, p) -> str:
    """The `lmforge pretrain` command that trains one size of the sweep's dial as the sweep did."""
    from lmforge.scaling.sweep import model_overrides

    o = model_overrides(SweepPreset(**sweep["preset_fields"]), depth, sweep["seq_len"])
    return (f"train it: lmforge pretrain --data-dir {sweep['data_dir']} --model {sweep['preset_fields']['base']} "
            f"--n-layer {o['n_layer']} --n-embd {o['n_embd']} --n-head {o['n_head']} --n-kv-head {o['n_kv_head']} "
            f"--block-size {o['block_size']} --batch-size {sweep['batch_size']} --seq-len {sweep['seq_len']} "
            f"--max-steps {p.steps} --eval-every 0 --out RUN")


def frontier_size(saved: dict, budget: float, choices: list[tuple]):
    """The dial size nearest (in log N) the IsoFLOP frontier's N_opt at `budget` (approach 2's power
    law, else approach 1's), with the law's name and N_opt; None without either. Shown beside
    approach 3's own pick because the approaches can disagree on the size (in this project's CPU
    sweeps approach 3 picked one a step too small; docs/benchmarks.md): `scaling fit`'s backtest says
    which to trust."""
    for name, label in (("approach2", "approach 2"), ("approach1", "approach 1")):
        law = saved.get(name)
        if law is not None:
            n_front = law["k_n"] * budget ** law["a"]
            return min(choices, key=lambda c: abs(math.log(c[1].params / n_front))), label, n_front
    return None


def predict_lines(folder: str | Path, *, flops: float | None = None, params: float | None = None,
                  tokens: float | None = None, level: float = 0.9) -> list[str]:
    fit, saved, sweep = load_fit(folder)
    largest = max(r["flops"] for r in saved["runs"])
    if params is not None:
        lines = [f"N = {params:,.0f} parameters, D = {tokens:,.0f} tokens (D/N = {tokens / params:.1f}, "
                 f"C = 6ND = {6 * params * tokens:.3g} FLOPs)", loss_line(fit, saved, params, tokens, level)]
        reach = 6 * params * tokens / largest
    else:
        n_opt, d_opt = fit.optimal(flops)
        ratio = fit.tokens_per_param(flops, level)
        lines = [f"budget C = {flops:.3g} FLOPs", f"compute-optimal under C = 6ND (approach 3): N = {n_opt:,.0f} "
                 f"parameters, D = {d_opt:,.0f} tokens, D/N = {ratio}",
                 loss_line(fit, saved, n_opt, d_opt, level)]
        choices = dial_choices(fit, sweep, flops)
        if choices:
            d, p, _ = choices[0]
            lines += [f"best size of this sweep's dial at this budget (approach 3): depth {d} ({point_text(p)})",
                      loss_line(fit, saved, p.params, p.tokens, level), train_command(sweep, d, p)]
            frontier = frontier_size(saved, flops, choices)
            if frontier is not None:
                (d, p, _), label, n_front = frontier
                lines += [f"size nearest the IsoFLOP frontier ({label}: N_opt = {n_front:,.0f}): depth {d} "
                          f"({point_text(p)})", loss_line(fit, saved, p.params, p.tokens, level),
                          train_command(sweep, d, p)]
        reach = flops / largest
    if reach > 1:
        lines.append(f"this is {reach:.1f}x the largest run of the sweep: an extrapolation")
    return lines
