"""Curation benchmark 0: extraction quality and speed of every extractor lmforge/curate/extract.py offers.

    flock /tmp/lmforge-cpu.lock python bench/curate_extract.py [--rows traf traf-precision ...] [--limit N]
                                                                [--out bench/out/curate-extract]

Data: web-raw/trafilatura/pages.jsonl.gz under $LMFORGE_SHARED_DATA (default ../shared/data): 442 real
pages, each with gold snippets that must survive extraction ("with") and snippets of boilerplate
that must not ("without"). Every row runs `extract_html` with an `ExtractConfig` (lmforge's
defaults: tables kept, reader comments dropped), one process, one page at a time.

A snippet counts as present when it is a substring of the extracted text after both are put in
Unicode NFC form and every run of whitespace (non-breaking spaces included) is made one space;
matching is case-sensitive. Columns:
- kept: fraction of must-keep snippets present;   dropped: fraction of must-drop snippets absent;
- F1: of precision = kept / (kept + must-drop present) and recall = kept fraction (counting snippets,
  the way trafilatura's own evaluation scores extractors);
- empty: pages whose extraction is empty (or raised);
- pages/s: pages / seconds spent inside extract_html (the HTML is already decoded text).
Writes results.json and table.md to --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
import unicodedata
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
PAGES = "web-raw/trafilatura/pages.jsonl.gz"

from lmforge.curate.extract import ExtractConfig, extract_html  # noqa: E402

ROWS = {
    "traf": ("trafilatura (lmforge default)", dict(extractor="trafilatura")),
    "traf-precision": ("trafilatura, favor precision", dict(extractor="trafilatura", favor="precision")),
    "traf-recall": ("trafilatura, favor recall", dict(extractor="trafilatura", favor="recall")),
    "traf-fast": ("trafilatura, fast (no fallback)", dict(extractor="trafilatura", fast=True)),
    "resiliparse": ("resiliparse main content", dict(extractor="resiliparse")),
    "plain": ("baseline: all visible text", dict(extractor="plain")),
}


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def load_pages(limit: int | None) -> list[dict]:
    path = DATA / PAGES
    if not path.is_file():
        sys.exit(f"needs {PAGES} under {DATA} (set LMFORGE_SHARED_DATA)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        pages = [json.loads(line) for line in f if line.strip()]
    return pages[:limit] if limit else pages


def run_row(pages: list[dict], cfg: ExtractConfig) -> dict:
    keep_total = keep_hit = drop_total = drop_hit = empty = 0
    seconds = 0.0
    extract_html(pages[0]["html"], cfg)  # imports and first-call setup are not per-page cost
    for p in pages:
        t0 = time.perf_counter()
        try:
            text = extract_html(p["html"], cfg, url=p.get("url"))
        except Exception:  # an extractor failure scores as an empty extraction
            text = ""
        seconds += time.perf_counter() - t0
        empty += not text.strip()
        text = normalise(text)
        for s in p["with"]:
            keep_total += 1
            keep_hit += normalise(s) in text
        for s in p["without"]:
            drop_total += 1
            drop_hit += normalise(s) not in text
    leaked = drop_total - drop_hit
    precision = keep_hit / max(1, keep_hit + leaked)
    recall = keep_hit / max(1, keep_total)
    return {"kept": keep_hit / keep_total, "dropped": drop_hit / drop_total,
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-12, precision + recall),
            "empty": empty, "seconds": seconds, "pages_per_s": len(pages) / seconds,
            "must_keep": keep_total, "must_drop": drop_total}


def table(results: dict) -> str:
    lines = ["| extractor | kept | dropped | F1 | empty | pages/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in results.values():
        lines.append(f"| {r['label']} | {r['kept']:.3f} | {r['dropped']:.3f} | {r['f1']:.3f} | {r['empty']} "
                     f"| {r['pages_per_s']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--limit", type=int, default=None, help="only the first N pages (a quick look)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "curate-extract")
    args = ap.parse_args()
    pages = load_pages(args.limit)
    n_keep = sum(len(p["with"]) for p in pages)
    n_drop = sum(len(p["without"]) for p in pages)
    print(f"{len(pages)} pages, {n_keep} must-keep and {n_drop} must-drop snippets", flush=True)
    results = {}
    for key in args.rows:
        label, options = ROWS[key]
        results[key] = {"label": label, "config": options, **run_row(pages, ExtractConfig(**options))}
        r = results[key]
        print(f"{label}: kept {r['kept']:.3f}, dropped {r['dropped']:.3f}, {r['pages_per_s']:.1f} pages/s", flush=True)
    md = table(results)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           **{pkg: version(pkg) for pkg in ("trafilatura", "resiliparse")}}
    (args.out / "results.json").write_text(json.dumps(
        {"pages": len(pages), "must_keep": n_keep, "must_drop": n_drop, "env": env, "rows": results}, indent=2) + "\n")
    (args.out / "table.md").write_text(md + "\n")
    print(f"\nwrote {args.out / 'results.json'} and table.md")


if __name__ == "__main__":
    main()
