"""The curation report: what each step removed, why, a few of the removed documents, and the
distributions the thresholds cut (DIR/report.md with PNGs beside it, and DIR/summary.json)."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lmforge.common import atomic_write_bytes, atomic_write_json, new_figure, save_figure

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 200


def _task_folders(out: Path, n_tasks: int) -> list[Path]:
    return [out / "tasks" / f"{t:05d}" for t in range(n_tasks)]


def collect_stats(out: Path, n_tasks: int) -> tuple[dict, dict, int]:
    """(extraction counts summed over tasks, per-step counts summed, raw input bytes)."""
    from lmforge.curate.types import StepCount

    extract: Counter = Counter()
    steps: dict[str, StepCount] = {}
    input_bytes = 0
    for folder in _task_folders(out, n_tasks):
        stats = json.loads((folder / "stats.json").read_text())
        input_bytes += stats["input_bytes"]
        extract.update({k: v for k, v in stats["extract"].items() if isinstance(v, (int, float))})
        for name, c in stats["steps"].items():
            steps.setdefault(name, StepCount()).add(c)
    return dict(extract), {k: v.to_dict() for k, v in steps.items()}, input_bytes


def _examples(out: Path, n_tasks: int) -> dict[tuple[str, str], list[dict]]:
    found: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for folder in _task_folders(out, n_tasks):
        with open(folder / "removed.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                slot = found[(r["step"], r["reason"])]
                if len(slot) < EXAMPLES_PER_REASON:
                    slot.append(r)
    return found


def _features(out: Path, n_tasks: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for folder in _task_folders(out, n_tasks):
        with np.load(folder / "features.npz") as z:
            for k in z.files:
                parts[k].append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _short(text: str) -> str:
    text = " ".join(text.split())
    return (text[:EXAMPLE_CHARS] + "…") if len(text) > EXAMPLE_CHARS else text


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def _plot_funnel(rows: list[tuple[str, int, int]], path: Path) -> None:
    fig, ax = new_figure((7.5, 4))
    names = [r[0] for r in rows]
    ax.bar(names, [r[2] / 1e6 for r in rows], color="tab:blue")
    ax.set_ylabel("MB of text left after the step")
    ax.set_title("What each step keeps")
    ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path, legend=False)


def _plot_features(step: str, feats: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = sorted(feats)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = feats[name]
        values = values[np.isfinite(values)]
        ax.hist(values, bins=40, color="tab:gray")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{step}: measured features (every document the step saw)", fontsize=10)
    save_figure(fig, path, legend=False)


def _plot_hist(values, path: Path, title: str, xlabel: str, *, log: bool = False, bins=40) -> None:
    fig, ax = new_figure((6, 3.6))
    ax.hist(values, bins=bins, color="tab:green", log=log)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    save_figure(fig, path, legend=False)


def write_report(out: Path, n_tasks: int, cfg, global_counts: dict, global_examples: dict, dedup, scores: dict,
                 metrics: list, plots: bool = True) -> Path:
    """report.md and summary.json; with `plots`, the PNGs the report shows (most of its time)."""
    extract, steps, input_bytes = collect_stats(out, n_tasks)
    steps.update(global_counts)
    examples = _examples(out, n_tasks)
    for (step, reason), items in global_examples.items():
        examples[(step, reason)] = items[:EXAMPLES_PER_REASON]

    rows = [("extract", int(extract.get("documents", 0)), int(extract.get("bytes_out", 0)))]
    order = [s for s in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii", "dedup",
                         "quality_model") if s in steps]
    if order:  # the text extraction handed on is what the first step received
        rows[0] = ("extract", steps[order[0]]["docs_in"], steps[order[0]]["bytes_in"])
    for s in order:
        rows.append((s, steps[s]["docs_out"], steps[s]["bytes_out"]))

    lines = ["# Curation report", ""]
    lines += [f"{n_tasks} input file(s), {_mb(input_bytes)} MB raw. Final: {rows[-1][1]:,} documents, "
              f"{_mb(rows[-1][2])} MB of text "
              f"({100 * rows[-1][2] / max(input_bytes, 1):.1f}% of the raw bytes).", ""]
    lines += ["## Extraction", "", "| counter | value |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(extract.items())]
    lines += ["", "## Step by step", "", "![funnel](funnel.png)", "",
              "| step | docs in | docs out | removed | MB in | MB out | bytes kept |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in order:
        c = steps[s]
        lines.append(f"| {s} | {c['docs_in']:,} | {c['docs_out']:,} | {c['docs_in'] - c['docs_out']:,} | "
                     f"{_mb(c['bytes_in'])} | {_mb(c['bytes_out'])} | "
                     f"{100 * c['bytes_out'] / max(c['bytes_in'], 1):.1f}% |")
    lines += ["", "## Why documents were removed", "", "| step | reason | documents |", "|---|---|---:|"]
    for s in order:
        for reason, n in steps[s]["reasons"].items():
            lines.append(f"| {s} | {reason} | {n:,} |")
    if plots:
        _plot_funnel(rows, out / "funnel.png")

    feats = _features(out, n_tasks)
    by_step: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for key, values in feats.items():
        step, name = key.split(".", 1)
        if len(values):
            by_step[step][name] = values
    if by_step:
        lines += ["", "## Feature distributions", ""]
        for step, fs in by_step.items():
            if plots:
                _plot_features(step, fs, out / f"features-{step}.png")
            lines += [f"### {step}", "", f"![{step}](features-{step}.png)", ""]

    if dedup is not None:
        sizes = list(dedup.cluster_sizes)
        lines += ["", "## Duplicates", ""]
        lines += [f"{len(sizes):,} clusters of duplicates; {sum(s - 1 for s in sizes):,} documents removed "
                  f"(one kept per cluster)."]
        stats = getattr(dedup, "stats", None) or {}
        for k, v in stats.items():
            lines.append(f"- {k}: {v:,}" if isinstance(v, int) else f"- {k}: {v}")
        if sizes and plots:
            _plot_hist(sizes, out / "dedup-clusters.png", "Duplicate cluster sizes", "documents in the cluster",
                       log=True, bins=np.arange(1.5, max(sizes) + 1.5))
            lines += ["", "![clusters](dedup-clusters.png)"]
    if scores:
        lines += ["", "## Quality model", ""]
        for i, m in enumerate(metrics):
            lines.append(f"- fold {i}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in m.items()))
        if plots:
            _plot_hist(list(scores.values()), out / "quality-scores.png", "Quality score of each document",
                       "P(reference-like)")
        lines += ["", "![scores](quality-scores.png)"]

    lines += ["", "## Examples of removed documents", ""]
    for (step, reason), items in sorted(examples.items()):
        lines.append(f"**{step} / {reason}**")
        lines.append("")
        for r in items:
            name = r["source"] if r.get("id") in (None, r["source"]) else f"{r['source']} ({r['id']})"
            why = f" (duplicate of `{r['kept']}`, Jaccard {r['jaccard']:.2f})" if r.get("kept") else ""
            why += f" (score {r['quality_score']:.3f})" if "quality_score" in r else ""
            lines.append(f"- `{name}`{why}: {_short(r['snippet'])}")
        lines.append("")

    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "summary.json", {
        "input_bytes": input_bytes, "extract": extract, "steps": steps,
        "docs_out": rows[-1][1], "bytes_out": rows[-1][2],
        "dedup": None if dedup is None else {"clusters": len(list(dedup.cluster_sizes))},
        "quality_model": metrics, "config": cfg.to_dict(),
    })
    return path
