"""A run's log (log.jsonl, one JSON record per line) and its loss-curve plot."""
from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def log_series(log_path: str | Path, train_key: str, val_key: str) -> tuple[list[dict], list[dict]]:
    """(training records holding train_key, evaluation records holding val_key) of a run's log."""
    records = read_log(log_path)
    return [r for r in records if train_key in r], [r for r in records if val_key in r]


def plot_loss_curve(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss (and validation loss / bits per byte when logged) against tokens seen."""
    train, val = log_series(log_path, "loss", "val_loss")
    bound = False
    if not val:  # a model whose likelihood is a bound (masked diffusion) logs val_loss_bound: labelled as one
        val = log_series(log_path, "loss", "val_loss_bound")[1]
        bound = bool(val)
    suffix = "_bound" if bound else ""
    if not train:
        return None
    from lmforge.common import new_figure, save_figure

    fig, ax = new_figure()
    xs, ys = [r["tokens"] for r in train], [r["loss"] for r in train]
    ax.plot(xs, ys, lw=0.8, alpha=0.35, color="C0")
    smooth, ema = [], 0.0
    for i, y in enumerate(ys, 1):  # bias-corrected moving average: the trend under batch noise
        ema = 0.9 * ema + 0.1 * y
        smooth.append(ema / (1 - 0.9**i))
    ax.plot(xs, smooth, lw=1.6, color="C0", label="train loss (smoothed)")
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss" + suffix] for r in val], "o-", color="C1",
                label="val loss (upper bound)" if bound else "val loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("diffusion loss, a bound (nats/token)" if bound else "cross-entropy (nats/token)")
    if val and "val_bpb" + suffix in val[-1]:
        last = val[-1]
        ax.set_title(f"final val: ≤ {last['val_loss_bound']:.3f} nats/token, ≤ {last['val_bpb_bound']:.3f} "
                     f"± {last['val_bpb_bound_stderr']:.3f} bits/byte" if bound else
                     f"final val: {last['val_loss']:.3f} nats/token, {last['val_bpb']:.3f} bits/byte")
    return save_figure(fig, png_path)
