"""Scaling laws on this machine: the `cpu` IsoFLOP sweep on the stdlib corpus, Chinchilla's three
fits, and the real test — a prediction made before a 4x larger run, against that run's loss.

Every step is an `lmforge` command, printed before it runs:
  1. a 512-id byte-level BPE and shards of the Python standard library (offline; 5% of the files
     validate). A small vocabulary keeps the output head from dominating the smallest models;
  2. `lmforge scaling sweep --preset cpu --jobs 2` (finished runs are skipped on a re-run, an
     interrupted one resumes);
  3. `lmforge scaling fit` (bootstrap intervals, plots in the sweep folder);
  4. `lmforge scaling predict --flops 4C` for 4x the sweep's largest budget: two sizes, approach 3's
     best and the one nearest the IsoFLOP frontier (approach 2), each with its predicted loss and 90%
     prediction interval, saved before its run starts;
  5. those runs, each trained as a one-point sweep in its own folder (so neither is in the fit), and
     the comparison: (predicted - measured) / measured (goal: within 2%) and whether the measured
     loss is inside the interval.

    python bench/scaling.py [--corpus stdlib|fairytales] [--out DIR] [--factor 4]

--corpus fairytales uses $LMFORGE_SHARED_DATA/gutenberg/fairytales.txt (52 MB of children's books,
the last 5% validating): enough text that no run, the held-out one included, reads a token twice.

About 40 minutes on the 2-core CPU (docs/benchmarks.md, "Scaling laws"); the plots are copied to
docs/img/scaling-*.png.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus_source(name: str) -> str:
    """What `lmforge tokenizer train` / `data prepare` read for a corpus name."""
    if name == "stdlib":
        return "stdlib"
    from lmforge.retrieval.datasets import shared_data

    path = shared_data() / "gutenberg" / "fairytales.txt"
    if not path.is_file():
        sys.exit(f"error: {path} not found (set LMFORGE_SHARED_DATA)")
    return str(path)


def lmforge(*argv, capture: bool = False) -> str:
    argv = [str(a) for a in argv]
    print("$ lmforge " + " ".join(argv), flush=True)
    r = subprocess.run([sys.executable, "-m", "lmforge", *argv], check=True, text=True,
                       stdout=subprocess.PIPE if capture else None)
    if capture:
        print(r.stdout, flush=True)
    return r.stdout or ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=("stdlib", "fairytales"), default="stdlib")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/out/scaling (stdlib), "
                    "bench/out/scaling-fairytales")
    ap.add_argument("--factor", type=float, default=4.0, help="the held-out run's budget over the sweep's largest")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out = args.out or REPO / "bench" / "out" / ("scaling" if args.corpus == "stdlib" else f"scaling-{args.corpus}")
    out.mkdir(parents=True, exist_ok=True)
    source = corpus_source(args.corpus)
    data, sweep = out / "data", out / "sweep"
    if not (data / "manifest.json").exists():
        lmforge("tokenizer", "train", "--data", source, "--vocab-size", 512, "--out", out / "tok512.json",
                "--max-chars", 20_000_000, "--no-progress")
        lmforge("data", "prepare", "--data", source, "--tokenizer", out / "tok512.json", "--out", data, "--workers", 2,
                "--no-progress")

    t0 = time.perf_counter()
    lmforge("scaling", "sweep", "--data-dir", data, "--out", sweep, "--preset", "cpu", "--jobs", args.jobs,
            "--no-progress")
    sweep_seconds = time.perf_counter() - t0
    lmforge("scaling", "fit", sweep)
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("runs/*/*/scaling.json"))]
    budget = args.factor * max(r["budget"] for r in runs)

    # Two held-out runs at `budget`, each predicted (and the prediction saved) before it starts: the
    # size approach 3 picks, and the size nearest the IsoFLOP frontier (approach 2's N_opt).
    picks = {"heldout": "best size of this sweep's dial", "heldout-frontier": "size nearest the IsoFLOP frontier"}
    results = {}
    for folder, marker in picks.items():
        prediction_file = out / f"{folder}_prediction.json"
        if not prediction_file.exists():  # made once, before the run; never rewritten after it
            text = lmforge("scaling", "predict", sweep, "--flops", f"{budget:.4g}", capture=True)
            chosen = text[text.index(marker):]
            depth = int(re.search(r"depth (\d+) \(", chosen).group(1))
            line = chosen.split("predicted val loss ")[1]
            lo, hi = (float(v) for v in line.split("[")[1].split("]")[0].split(","))
            prediction_file.write_text(json.dumps({"budget": budget, "depth": depth, "loss": float(line.split()[0]),
                                                   "lo": lo, "hi": hi, "made_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   "printed": text}, indent=1) + "\n")
        pred = json.loads(prediction_file.read_text())
        t0 = time.perf_counter()
        lmforge("scaling", "sweep", "--data-dir", data, "--out", out / folder, "--preset", "cpu", "--flops",
                f"{pred['budget']:.4g}", "--models", pred["depth"], "--no-progress")
        measured = json.loads(next((out / folder).glob("runs/*/*/scaling.json")).read_text())
        error = (pred["loss"] - measured["loss"]) / measured["loss"]
        results[folder] = {"prediction": pred, "measured": measured, "relative_error": error,
                           "inside_interval": pred["lo"] <= measured["loss"] <= pred["hi"],
                           "seconds": time.perf_counter() - t0}
    (out / "result.json").write_text(json.dumps({"sweep_runs": len(runs), "sweep_seconds": sweep_seconds,
                                                 **results}, indent=1) + "\n")

    img = REPO / "docs" / "img"
    tag = "" if args.corpus == "stdlib" else f"-{args.corpus}"
    for name in ("isoflop", "frontier", "parametric"):
        shutil.copy(sweep / f"{name}.png", img / f"scaling{tag}-{name}.png")
    print(f"\nsweep: {len(runs)} runs, {sweep_seconds / 60:.1f} min (this invocation; finished runs are skipped)")
    for folder, r in results.items():
        pred, measured = r["prediction"], r["measured"]
        print(f"{folder}: budget {pred['budget']:.3g} FLOPs, depth {pred['depth']} (N {measured['params']:,}, "
              f"{measured['tokens']:,} tokens), {measured['train_time']:.0f} s of training; predicted "
              f"{pred['loss']:.4f} [{pred['lo']:.4f}, {pred['hi']:.4f}] nats/token before it ran ({pred['made_at']}), "
              f"measured {measured['loss']:.4f}: error {100 * r['relative_error']:+.2f}% (goal: within 2%: "
              f"{'met' if abs(r['relative_error']) <= 0.02 else 'NOT met'}), inside the 90% interval: "
              f"{'yes' if r['inside_interval'] else 'NO'}")

if __name__ == "__main__":
    main()
