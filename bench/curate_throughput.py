"""Curation throughput: lmforge's pipeline beside datatrove's equivalent, same input, same run.

    LMFORGE_SHARED_DATA=../shared/data python bench/curate_throughput.py [--copies 8] [--workers 1,2]

Input: the 697 Common Crawl documents of web-raw/dolma-cc-text (boilerplate and duplicates left in),
written as `--copies` jsonl files, each copy with 3% of its words changed (seeded), so the corpus
is bigger and has realistic near-duplicates across files. One input file is one task in both tools.

Both run the same steps on text (no HTML extraction, no language identification: datatrove's
language filter downloads a fastText model, which this offline machine cannot): the Gopher repetition
and quality filters, the C4 filter, the FineWeb filter, PII scrubbing, and MinHash deduplication of
word 5-grams, each with its defaults (lmforge 64 bands x 2 rows = 128 hashes, which its recall goal
needs, see bench/curate_dedup.py; datatrove 14 x 8 = 112). datatrove runs as its documented
minhash recipe: a filtering pipeline that writes its output, then the four minhash stages
(signatures, buckets, clusters, filter). Throughput is MB of input per second of wall clock, for 1
and 2 worker processes.

datatrove logs every stage's statistics to stderr (its executor adds its own log handlers); the
results are the lines on stdout and the JSON file.

First, each step alone in this process on the original 697 documents (docs/s, best of 3): where the
time goes, and each of lmforge's steps against datatrove's.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def build_input(folder: Path, copies: int) -> int:
    import gzip

    src = sorted((DATA / "web-raw" / "dolma-cc-text").glob("*.jsonl.gz"))
    if not src:
        sys.exit(f"needs web-raw/dolma-cc-text under {DATA} (set LMFORGE_SHARED_DATA)")
    docs = []
    for p in src:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f if line.strip()]
    folder.mkdir(parents=True)
    total = 0
    for c in range(copies):
        rng = random.Random(c)
        path = folder / f"part-{c:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                words = d["text"].split(" ")
                for _ in range(len(words) * 3 // 100 if c else 0):
                    words[rng.randrange(len(words))] = rng.choice(("river", "stone", "market", "winter"))
                f.write(json.dumps({"id": f"{d['id']}-{c}", "text": " ".join(words)}) + "\n")
        total += path.stat().st_size
    return total


def run_lmforge(inputs: Path, out: Path, workers: int) -> dict:
    from lmforge.curate.config import CurateConfig
    from lmforge.curate.pipeline import curate

    cfg = CurateConfig()
    cfg.language.enabled = False
    start = time.perf_counter()
    s = curate([inputs], out, cfg, workers=workers, show_progress=False)
    return {"seconds": time.perf_counter() - start, "docs_out": s.docs_out}


def run_datatrove(inputs: Path, out: Path, workers: int, tasks: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    logs = out / "logs"

    def run(name, pipeline, n):
        LocalPipelineExecutor(pipeline, tasks=n, workers=min(workers, n), logging_dir=str(logs / name),
                              skip_completed=False, start_method="spawn").run()

    start = time.perf_counter()
    run("filter", [JsonlReader(str(inputs)), GopherRepetitionFilter(), GopherQualityFilter(),
                   C4QualityFilter(), FineWebQualityFilter(), PIIFormatter(),
                   JsonlWriter(str(out / "filtered"))], tasks)
    run("signatures", [JsonlReader(str(out / "filtered")), MinhashDedupSignature(str(out / "sigs"), config=mh)],
        tasks)
    run("buckets", [MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=mh)], mh.num_buckets)
    run("clusters", [MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=mh)], 1)
    run("filter_dups", [JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(out / "remove_ids")),
                        JsonlWriter(str(out / "deduped"))], tasks)
    seconds = time.perf_counter() - start
    docs_out = 0
    import gzip

    for p in (out / "deduped").glob("*"):
        with gzip.open(p, "rt") if p.suffix == ".gz" else open(p) as f:
            docs_out += sum(1 for _ in f)
    return {"seconds": seconds, "docs_out": docs_out}


def per_step(texts: list[str], reps: int = 3) -> list[dict]:
    """Each filter alone, lmforge's and datatrove's, on the same texts (one process, best of 3)."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter

    from lmforge.curate import filters, pii
    from lmforge.curate.dedup import DedupConfig, dedup_signature

    sig = MinhashDedupSignature(tempfile.mkdtemp(), config=MinhashConfig(n_grams=5, num_buckets=14,
                                                                        hashes_per_bucket=8))
    pii_dt = PIIFormatter()
    steps = {
        "gopher_repetition": (lambda t: filters.gopher_repetition(t, filters.GopherRepetitionConfig()),
                              GopherRepetitionFilter().filter),
        "gopher_quality": (lambda t: filters.gopher_quality(t, filters.GopherQualityConfig()),
                           GopherQualityFilter().filter),
        "c4": (lambda t: filters.c4_lines(t, filters.C4Config()), C4QualityFilter().filter),
        "fineweb": (lambda t: filters.fineweb(t, filters.FineWebConfig()), FineWebQualityFilter().filter),
        "pii": (lambda t: pii.scrub_pii(t, pii.PiiConfig()), lambda d: pii_dt.format(d.text)),
        "minhash signature": (lambda t: dedup_signature(t, DedupConfig()),
                              lambda d: (s := sig.get_shingles(d.text)).size and sig.get_signature(s)),
    }

    def clear():  # both libraries cache the last document's word split: time every split
        filters.split_words.cache_clear()
        from datatrove.utils.text import split_into_parts

        split_into_parts.cache_clear()

    rows = []
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    for name, (ours, theirs) in steps.items():
        ours(texts[0]), theirs(docs[0])  # warm-up: lazy tables, spaCy's tokenizer
        best = {}
        for tool, fn, items in (("lmforge", ours, texts), ("datatrove", theirs, docs)):
            times = []
            for _ in range(reps):
                clear()
                start = time.perf_counter()
                for x in items:
                    fn(x)
                times.append(time.perf_counter() - start)
            best[tool] = len(items) / min(times)
        rows.append({"step": name, "lmforge_docs_s": best["lmforge"], "datatrove_docs_s": best["datatrove"]})
        print(f"{name:18s} lmforge {best['lmforge']:8.0f} docs/s   datatrove {best['datatrove']:8.0f} docs/s   "
              f"{best['lmforge'] / best['datatrove']:5.1f}x", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reps", type=int, default=3, help="timings per step alone (the best counts)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "curate_throughput.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="curate-tp-"))
    try:
        mb = build_input(work / "input", args.copies) / 1e6
        with open(work / "input" / "part-000.jsonl", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        steps = per_step(texts, args.reps)
        print(f"\ninput: {args.copies} files, {mb:.1f} MB of jsonl")
        rows = []
        for w in (int(x) for x in args.workers.split(",")):
            for tool in ("lmforge", "datatrove"):  # alternate so both see the same machine load
                out = work / f"{tool}-{w}"
                r = run_lmforge(work / "input", out, w) if tool == "lmforge" else \
                    run_datatrove(work / "input", out, w, args.copies)
                r.update(tool=tool, workers=w, mb_per_s=mb / r["seconds"])
                rows.append(r)
                print(f"{tool:9s} workers={w}: {r['seconds']:6.1f} s  {r['mb_per_s']:5.2f} MB/s  "
                      f"{r['docs_out']} docs out", flush=True)
        print("\n| workers | lmforge MB/s | datatrove MB/s | ratio | docs out (lmforge / datatrove) |")
        print("|---:|---:|---:|---:|---|")
        for w in sorted({r["workers"] for r in rows}):
            a = next(r for r in rows if r["tool"] == "lmforge" and r["workers"] == w)
            b = next(r for r in rows if r["tool"] == "datatrove" and r["workers"] == w)
            print(f"| {w} | {a['mb_per_s']:.2f} | {b['mb_per_s']:.2f} | {a['mb_per_s'] / b['mb_per_s']:.2f}x | "
                  f"{a['docs_out']} / {b['docs_out']} |")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"input_mb": mb, "steps": steps, "rows": rows}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
