"""A run's log (log.jsonl, one JSON record per line), its loss-curve plot and, for a mixture of
experts, its routing plot."""
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
    suffix = ""
    if not val:  # a model whose likelihood is a bound (masked diffusion) logs val_loss_bound: labelled as one
        val = log_series(log_path, "loss", "val_loss_bound")[1]
        bound = bool(val)
        suffix = "_bound" if bound else ""
    if not val:  # an encoder logs val_mlm_loss: the masked tokens' cross-entropy
        val = log_series(log_path, "loss", "val_mlm_loss")[1]
        suffix = "_mlm" if val else ""
    masked = suffix == "_mlm"
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
        key = "val_mlm_loss" if masked else "val_loss" + suffix
        ax.plot([r["tokens"] for r in val], [r[key] for r in val], "o-", color="C1",
                label="val loss (upper bound)" if bound else "val loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("diffusion loss, a bound (nats/token)" if bound else
                  "masked-token cross-entropy (nats/token)" if masked else "cross-entropy (nats/token)")
    if val and masked:
        ax.set_title(f"final val: {val[-1]['val_mlm_loss']:.3f} nats per masked token, "
                     f"accuracy {val[-1]['val_mlm_accuracy']:.1%}")
    elif val and "val_bpb" + suffix in val[-1]:
        last = val[-1]
        ax.set_title(f"final val: ≤ {last['val_loss_bound']:.3f} nats/token, ≤ {last['val_bpb_bound']:.3f} "
                     f"± {last['val_bpb_bound_stderr']:.3f} bits/byte" if bound else
                     f"final val: {last['val_loss']:.3f} nats/token, {last['val_bpb']:.3f} bits/byte")
    return save_figure(fig, png_path)


def plot_expert_loads(log_path: str | Path, png_path: str | Path) -> Path | None:
    """A mixture of experts' routing over training: each expert's share of the routed tokens (mean over
    layers) and the max violation (max load / mean load - 1; worst layer and mean over layers) against
    tokens seen. A balanced auxiliary loss with collapsed routing shows here, not in the loss curve."""
    train = [r for r in read_log(log_path) if "moe_max_violation" in r]
    if not train:
        return None
    from lmforge.common import new_figure, save_figure

    fig, share_ax = new_figure((11, 4.2))
    share_ax.remove()
    share_ax, vio_ax = fig.subplots(1, 2)
    xs = [r["tokens"] for r in train]
    experts = sorted((k for k in train[-1] if k.startswith("moe_share_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    for k in experts:
        share_ax.plot(xs, [r[k] for r in train], lw=1.0, label=f"expert {k.rsplit('_', 1)[1]}")
    share_ax.axhline(1 / max(len(experts), 1), color="k", lw=0.8, ls="--", label="balanced")
    share_ax.set_xlabel("tokens seen")
    share_ax.set_ylabel("share of routed tokens (mean over layers)")
    share_ax.legend(fontsize=7, ncol=2)
    vio_ax.plot(xs, [r["moe_max_violation"] for r in train], color="C3", label="max violation, worst layer")
    vio_ax.plot(xs, [r["moe_mean_violation"] for r in train], color="C1", label="max violation, mean over layers")
    vio_ax.set_xlabel("tokens seen")
    vio_ax.set_ylabel("max load / mean load - 1")
    vio_ax.set_yscale("symlog", linthresh=0.1)
    return save_figure(fig, png_path)
