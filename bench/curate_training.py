"""What curation buys: the same model trained on raw extracted web text and on curated web text.

    LMFORGE_SHARED_DATA=../shared/data python bench/curate_training.py [--steps one-pass|N] [--seeds 0,1,2]

The raw web data of ../shared/data/web-raw (442 HTML pages, three WARC excerpts, 697 Common Crawl
text documents) goes through `lmforge data curate` three times: (a) extraction only, every other
step off: the raw extracted text; (b) the default pipeline (language, Gopher, C4, FineWeb, PII,
dedup); (c) (b) plus the quality model trained against `--reference` text (default: Gutenberg
classics, neither web text nor the evaluation text), keeping the better-scored half. One tokenizer,
trained on (a), serves all three. The `cpu` model preset then trains the same number of steps (same
tokens, same wall clock within noise) on each, for each seed, and is scored in bits per byte on
clean held-out text that no corpus contains: WikiText-2's validation split. The seed-to-seed spread
of each arm is the run-to-run noise the differences are compared with.

The development data is small (5 MB of extracted text, 0.7 MB after curation), so the budget
matters: `--steps one-pass` (the default) trains on as many tokens as the smallest arm has, so no
arm reads a document twice (how curation is compared at scale, e.g. FineWeb's ablations); a fixed
`--steps N` past that makes the curated arms repeat their text while the raw arm does not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENS_PER_STEP = 8 * 256  # `lmforge pretrain --model cpu` defaults: 8 sequences of the model's 256-token context
WEB = ("web-raw/trafilatura/pages.jsonl.gz", "web-raw/dolma-cc-text", "web-raw/warc")


def lmforge(*args, cwd=None):
    cmd = [sys.executable, "-m", "lmforge", *map(str, args)]
    print("$ lmforge " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def corpus_stats(folder: Path) -> dict:
    docs = chars = 0
    for p in folder.glob("*.jsonl"):
        for line in p.read_text().split("\n"):  # not splitlines(): U+2028 may sit inside a JSON string
            if line.strip():
                docs += 1
                chars += len(json.loads(line)["text"])
    return {"docs": docs, "chars": chars}


def plot(by_arm: dict, stats: dict, steps: int, path: Path) -> None:
    """Bits per byte of each arm: one dot per seed, a bar at the mean."""
    from lmforge.common import new_figure, save_figure

    fig, ax = new_figure((6, 3.8))
    for i, values in enumerate(by_arm.values()):
        ax.bar(i, sum(values) / len(values), color="tab:blue", alpha=0.35)
        ax.plot([i] * len(values), values, "o", color="tab:blue")
    ax.set_xticks(range(len(by_arm)), [f"{a}\n{stats[a]['chars'] / 1e6:.2f} MB" for a in by_arm])
    lo = min(min(v) for v in by_arm.values())
    ax.set_ylim(lo - 0.3, max(max(v) for v in by_arm.values()) + 0.1)
    ax.set_ylabel("bits/byte on WikiText-2 valid (lower is better)")
    ax.set_title(f"cpu model, {steps} steps ({steps * TOKENS_PER_STEP / 1e3:.0f}k tokens), one dot per seed")
    save_figure(fig, path, legend=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/curate-training")
    ap.add_argument("--steps", default="one-pass", help="'one-pass' or a number of optimizer steps")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--reference", nargs="*", default=["gutenberg/classics-sample-000.jsonl.gz",
                                                       "gutenberg/classics-sample-001.jsonl.gz"])
    ap.add_argument("--keep-fraction", type=float, default=0.5, help="of the quality model's arm")
    ap.add_argument("--eval-text", default="eval/wikitext-2/valid.txt")
    ap.add_argument("--out", default=None, help="default: bench/out/curate_training-<steps>steps.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = [DATA / w for w in WEB]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        sys.exit(f"needs {missing[0]} (set LMFORGE_SHARED_DATA)")

    # (a) extraction only
    off = "".join(f"[{s}]\nenabled = false\n" for s in
                  ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii", "dedup"))
    (work / "raw.toml").write_text(off)
    lmforge("data", "curate", *inputs, "--out", work / "raw", "--config", work / "raw.toml", "--no-progress")
    # (b) the default pipeline (heuristic filters and dedup)
    lmforge("data", "curate", *inputs, "--out", work / "curated", "--no-progress")
    arms = {"raw": work / "raw" / "curated", "curated": work / "curated" / "curated"}
    # (c) the same plus the quality model, keeping the better-scored half
    if args.reference:
        refs = ", ".join(json.dumps(str(DATA / r)) for r in args.reference)
        (work / "quality.toml").write_text(f"[quality_model]\nenabled = true\nreference = [{refs}]\n"
                                           f"keep_fraction = {args.keep_fraction}\n")
        lmforge("data", "curate", *inputs, "--out", work / "quality", "--config", work / "quality.toml",
                "--no-progress")
        arms["curated+quality"] = work / "quality" / "curated"
    stats = {k: corpus_stats(v) for k, v in arms.items()}
    print(json.dumps(stats))

    tok = work / "tok.json"
    if not tok.exists():
        lmforge("tokenizer", "train", "--data", arms["raw"], "--vocab-size", 4096, "--out", tok, "--no-progress")
    for arm, folder in arms.items():
        if not (work / f"data-{arm}" / "manifest.json").exists():
            lmforge("data", "prepare", "--data", folder, "--tokenizer", tok, "--out", work / f"data-{arm}",
                    "--no-progress")

    if args.steps == "one-pass":  # the smallest arm's training tokens, in whole steps
        tokens = min(json.loads((work / f"data-{a}" / "manifest.json").read_text())["splits"]["train"]["tokens"]
                     for a in arms)
        steps = tokens // TOKENS_PER_STEP
        print(f"one pass over the smallest arm: {tokens:,} tokens = {steps} steps of {TOKENS_PER_STEP}")
    else:
        steps = int(args.steps)

    from lmforge.eval.harness import load_eval_model
    from lmforge.eval.lm import evaluate_text_file

    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in arms:
            run = work / f"run-{arm}-{steps}steps-s{seed}"
            if not (run / "bench_done").exists():
                lmforge("pretrain", "--data-dir", work / f"data-{arm}", "--out", run, "--model", "cpu",
                        "--max-steps", steps, "--seed", seed, "--eval-every", 0, "--no-progress")
                (run / "bench_done").write_text("")
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().split("\n") if line.strip()]
            seconds = max(r.get("time", 0) for r in log)  # training time, as the Trainer logs it
            lm = load_eval_model(run)
            m = evaluate_text_file(lm, DATA / args.eval_text)
            results.append({"arm": arm, "seed": seed, "bpb": m["bits_per_byte"], "train_seconds": seconds})
            print(f"{arm:8s} seed {seed}: {m['bits_per_byte']:.4f} bits/byte on {args.eval_text} "
                  f"({seconds:.0f} s)", flush=True)
    by_arm = {a: [r["bpb"] for r in results if r["arm"] == a] for a in arms}
    mean = {a: sum(v) / len(v) for a, v in by_arm.items()}
    noise = max(max(v) - min(v) for v in by_arm.values())
    print("\n| corpus | docs | MB | bits/byte per seed | mean |\n|---|---:|---:|---|---:|")
    for a in arms:
        print(f"| {a} | {stats[a]['docs']:,} | {stats[a]['chars'] / 1e6:.2f} | "
              f"{', '.join(f'{x:.4f}' for x in by_arm[a])} | {mean[a]:.4f} |")
    gain = {a: mean["raw"] - mean[a] for a in arms if a != "raw"}
    for a, g in gain.items():
        print(f"{a} - raw: {-g:+.4f} bits/byte")
    print(f"seed-to-seed spread (largest over the arms): {noise:.4f}")
    plot(by_arm, stats, steps, REPO / "docs" / "img" / f"curate-training-{steps}steps.png")
    out = Path(args.out or REPO / "bench" / "out" / f"curate_training-{steps}steps.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpora": stats, "runs": results, "mean": mean, "gain": gain,
                                          "noise": noise, "steps": steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
