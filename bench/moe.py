"""Benchmark: a mixture of experts against the dense model of the same active size, at equal time.

On bench/families.py's tinyshakespeare setup (nanoGPT's split, a 1024-id BPE trained on the training
text, batch 8, residual dropout 0.2 and weight decay 0.2, validation on the whole split), or with
--corpus stdlib its Python standard library setup (5% of the files validate, a 4096-id BPE), one run of
--budget seconds each:
  * the dense `cpu` preset (4 layers, width 256, SwiGLU MLP of 704 units; compiled: its default);
  * the same model with every MLP replaced by 8 experts of 352 units, top-2 — the same active
    parameters per token (plus the routers), 2.9x the parameters — balanced by the Switch auxiliary
    loss (coefficient 0.01), and again balanced by DeepSeek-V3's loss-free routing biases (rate 1e-3,
    DeepSeek-V3's, and 1e-2 for a run of a few hundred steps).
    Every row compiled (`--compile auto`: see lmforge/train/precision.py).
Reported per row: validation bits per character, tokens/s, steps, parameters (total / active) and,
for the MoE rows, the max violation (max expert load / mean - 1) at the end, worst layer and mean
over layers. Plot: validation against seconds, and max violation against tokens.

    python bench/moe.py [--budget 300] [--corpus shakespeare|stdlib] [--only TEXT]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from families import VOCAB_SIZE, curve, prepare_corpus  # noqa: E402

from lmforge.stages.pretrain import PretrainOptions, pretrain  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.logs import read_log  # noqa: E402

MOE = dict(n_experts=8, moe_top_k=2, moe_hidden=352)
ROWS = [  # label, model overrides
    ("dense cpu preset", {}),
    ("MoE 8x352 top-2, aux loss", {**MOE, "moe_balance": "aux", "moe_aux_coef": 0.01}),
    ("MoE 8x352 top-2, loss-free biases at 1e-3", {**MOE, "moe_balance": "bias", "moe_bias_rate": 1e-3}),
    # DeepSeek-V3's rate is for runs of ~10^5 steps; a few hundred steps need the biases to move faster.
    ("MoE 8x352 top-2, loss-free biases at 1e-2", {**MOE, "moe_balance": "bias", "moe_bias_rate": 1e-2}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--corpus", choices=("shakespeare", "stdlib"), default="shakespeare",
                    help="bench/families.py's corpora: tinyshakespeare (1 MB, seen many times in the budget) or "
                         "the Python standard library's source (11 MB, seen less than once)")
    ap.add_argument("--out", default=None, help="default bench/out/moe (moe_stdlib for the standard library)")
    ap.add_argument("--plot", default=None, help="default docs/img/moe.png (moe_stdlib.png)")
    ap.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    args = ap.parse_args()
    suffix = "" if args.corpus == "shakespeare" else "_" + args.corpus
    out = Path(args.out or REPO / "bench" / "out" / f"moe{suffix}")
    args.plot = args.plot or str(REPO / "docs" / "img" / f"moe{suffix}.png")
    out.mkdir(parents=True, exist_ok=True)
    _, data, _, unit = prepare_corpus(args.corpus, VOCAB_SIZE[args.corpus], 10**9, out)
    rows = {}
    for label, over in ROWS:
        if args.only and args.only not in label:
            continue
        run = out / ("run_" + label.split(",")[-1].strip().replace(" ", "_"))
        if run.exists():
            shutil.rmtree(run)
        print(f"== {label}: {args.budget:.0f} s", flush=True)
        every = max(1, round((50 if not over else 30) * args.budget / 300))
        cfg = TrainConfig(out_dir=str(run), max_steps=10**9, time_budget=args.budget, eval_every=every, ckpt_every=0,
                          log_every=10, progress=False, weight_decay=0.2)
        res = pretrain(PretrainOptions(data_dir=str(data["bpe"]), preset="cpu", batch_size=8, eval_tokens=10**9,
                                       model_overrides={"dropout": 0.2, **over}), cfg)
        model = res["model"]
        log = [r for r in read_log(run / "log.jsonl") if "loss" in r]
        last = [r for r in log if "moe_max_violation" in r][-5:]
        rows[label] = {"val_bpb": res["val_bpb"], "seconds": res["train_time"], "steps": res["step"],
                       "tokens": res["tokens"], "tokens_per_s": res["tokens"] / res["train_time"],
                       "params": model.num_params(), "active_params": model.num_params(active=True),
                       "curve": curve(run),
                       "violation": [(r["tokens"], r["moe_max_violation"], r["moe_mean_violation"]) for r in log
                                     if "moe_max_violation" in r]}
        if last:
            rows[label]["max_violation_end"] = sum(r["moe_max_violation"] for r in last) / len(last)
            rows[label]["mean_violation_end"] = sum(r["moe_mean_violation"] for r in last) / len(last)
        print(f"  {res['val_bpb']:.4f} {unit}, {rows[label]['tokens_per_s']:,.0f} tok/s, {res['step']} steps",
              flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")

    print(f"\n| row | val {unit} | tokens/s | steps | params total / active "
          "| max violation at the end (worst layer / mean) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        vio = (f"{r['max_violation_end']:.3f} / {r['mean_violation_end']:.3f}" if "max_violation_end" in r else "—")
        print(f"| {label} | {r['val_bpb']:.4f} | {r['tokens_per_s']:,.0f} | {r['steps']} "
              f"| {r['params'] / 1e6:.2f}M / {r['active_params'] / 1e6:.2f}M | {vio} |")
    title = {"shakespeare": "tinyshakespeare", "stdlib": "Python standard library"}[args.corpus]
    plot(rows, unit, Path(args.plot) if not args.only else out / "only.png", title)  # the documented plot: every row


def plot(rows: dict, unit: str, path: Path, title: str) -> None:
    from lmforge.common import new_figure, save_figure

    fig, ax = new_figure((11, 4.2))
    ax.remove()
    val_ax, vio_ax = fig.subplots(1, 2)
    for i, (label, r) in enumerate(rows.items()):
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        val_ax.plot(xs, ys, "o-", ms=3, color=f"C{i}", label=f"{label}: {r['val_bpb']:.3f}")
        if r["violation"]:
            toks, worst, mean = zip(*r["violation"])
            vio_ax.plot(toks, worst, color=f"C{i}", lw=1.2, label=f"{label}: worst layer")
            vio_ax.plot(toks, mean, color=f"C{i}", lw=0.8, ls="--", label=f"{label}: mean over layers")
    val_ax.set_xlabel("training seconds")
    val_ax.set_ylabel(f"validation {unit}")
    val_ax.set_title(f"{title}, equal time and active parameters")
    vio_ax.set_xlabel("tokens seen")
    vio_ax.set_ylabel("max violation (max load / mean - 1)")
    vio_ax.set_yscale("symlog", linthresh=0.1)
    val_ax.legend(fontsize=7)
    vio_ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, legend=False)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
