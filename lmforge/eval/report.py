"""The report card: one markdown page summarising a run and its evaluation, with plots.

    write_report_card(run_dir, results_json, out_dir)

reads the run's newest checkpoint (model config, tokens seen), its log.jsonl (loss curve) and an
`lmforge eval` results JSON, and writes report.md, loss.png and tasks.png. The aggregate is the
mean centred score over the tasks, (score - chance) / (1 - chance): 0 means random guessing and 1
perfect, so tasks with 2 and 4 choices count alike (nanochat's CORE metric centres the same way).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.common import LmforgeError, read_json
from lmforge.eval.multiple_choice import centred

# The metric each kind of task is ranked by: lm-eval's acc_norm for multiple choice (length
# normalised), exact match for GSM8K.
PRIMARY = ("acc_norm", "exact_match")


def primary_metric(metrics: dict) -> tuple[str, float] | None:
    for k in PRIMARY:
        if k in metrics:
            return k, float(metrics[k])
    return None


def centred_scores(results: dict) -> dict[str, float]:
    """Per task with a chance level: its centred primary score."""
    out = {}
    for name, r in results.get("tasks", {}).items():
        m = r.get("metrics", r)
        p = primary_metric(m)
        if p is not None and "chance" in m and m["chance"] < 1:
            out[name] = centred(p[1], float(m["chance"]))
    return out


def _run_facts(run_dir: Path | None) -> dict:
    """Model size, tokens seen and training compute from a run's newest checkpoint."""
    if run_dir is None:
        return {}
    from lmforge.train.checkpoint import checkpoint_shapes

    ckpt, state, model = checkpoint_shapes(run_dir)
    cfg = model.config
    tokens = int(state.get("tokens_seen", 0))
    seq_len = state.get("seq_len") or model.context_limit
    fpt = model.flops_per_token(seq_len)
    return {"checkpoint": str(ckpt), "step": state.get("step"), "params": model.num_params(),
            "params_non_embedding": model.num_params(non_embedding=True), "tokens_seen": tokens,
            "flops_per_token": fpt, "train_flops": fpt * tokens, "train_time_s": state.get("train_time"),
            "config": cfg.to_dict()}


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def plot_task_bars(scores: dict[str, float], png: Path) -> Path | None:
    if not scores:
        return None
    from lmforge.common import new_figure, save_figure

    names = list(scores)
    fig, ax = new_figure((max(4.5, 0.8 * len(names) + 2), 3.8))
    vals = [scores[n] for n in names]
    ax.bar(names, vals, color=["C2" if v >= 0 else "C3" for v in vals])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("centred score (0 = chance, 1 = perfect)")
    ax.set_title(f"aggregate {sum(vals) / len(vals):.3f}")
    ax.tick_params(axis="x", rotation=30)
    return save_figure(fig, png, legend=False)


def write_report_card(run_dir: str | Path | None, results: str | Path | dict, out_dir: str | Path) -> Path:
    """Write out_dir/report.md (+ loss.png from run_dir/log.jsonl, tasks.png); returns report.md."""
    from lmforge.train.logs import plot_loss_curve

    res = results if isinstance(results, dict) else read_json(results, "eval results")
    if not isinstance(res, dict) or "tasks" not in res:
        raise LmforgeError("eval results must be the JSON written by `lmforge eval` (an object with 'tasks')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(run_dir) if run_dir is not None else None
    facts = _run_facts(run)
    lines = [f"# Report card: {res.get('model', run or '?')}", ""]
    if facts:
        lines += ["| | |", "|---|---|",
                  f"| checkpoint | `{facts['checkpoint']}` (step {facts['step']}) |",
                  f"| parameters | {facts['params']:,} ({facts['params_non_embedding']:,} non-embedding) |",
                  f"| tokens seen | {facts['tokens_seen']:,} |",
                  f"| training compute | {facts['train_flops']:.3g} FLOPs ({facts['flops_per_token']:.3g} per token) |"]
        if facts.get("train_time_s"):
            lines.append(f"| training time | {facts['train_time_s']:.0f} s |")
        lines.append("")
    elif res.get("params"):
        lines += [f"parameters: {res['params']:,}", ""]
    scores = centred_scores(res)
    rows = []
    for name, r in res["tasks"].items():
        m = r.get("metrics", r)
        shown = {k: v for k, v in m.items() if not k.endswith("_stderr") and k not in ("n", "seconds")}
        for k, v in shown.items():
            err = m.get(f"{k}_stderr")
            rows.append(f"| {name} | {m.get('n', '')} | {k} | {_fmt(v)}" + (f" ± {err:.4f}" if err else "") + " |")
    lines += ["## Metrics", "", "| task | n | metric | value |", "|---|---|---|---|", *rows, ""]
    if scores:
        agg = sum(scores.values()) / len(scores)
        lines += ["## Centred aggregate", "",
                  "Per task (score - chance) / (1 - chance) of its primary metric (acc_norm; exact match for "
                  "GSM8K), so 0 = random guessing and 1 = perfect.", "",
                  "| task | centred |", "|---|---|", *[f"| {k} | {v:.4f} |" for k, v in scores.items()],
                  f"| **aggregate** | **{agg:.4f}** |", ""]
    if run is not None and plot_loss_curve(run / "log.jsonl", out / "loss.png"):
        lines += ["## Loss curve", "", "![loss curve](loss.png)", ""]
    if plot_task_bars(scores, out / "tasks.png"):
        lines += ["## Tasks", "", "![centred scores per task](tasks.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"run": facts, "centred": scores,
                                                 "aggregate": sum(scores.values()) / len(scores) if scores else None,
                                                 "results": res}, indent=2, default=str) + "\n")
    return report
