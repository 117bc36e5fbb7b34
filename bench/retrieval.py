"""Benchmark: retrievers on one table — recall@1/5/20, MRR@10, nDCG@10, queries/s, index build time.

Two test collections, each loaded once and shared by every row:
  * SQuAD v1.1 dev as paragraph retrieval: all 2,067 paragraphs are the corpus, a question's one
    relevant document is its own paragraph; a deterministic sample of --squad-queries questions
    (by a hash of the ids; default 2,000 of the 10,570);
  * BEIR SciFact, test split: 5,183 abstracts, 300 claims, BEIR's qrels (graded as BEIR gives them).
Rows, all from this one run on this machine: BM25 (bm25s, Snowball stemmer, English stop words) and
all-MiniLM-L6-v2 (sentence-transformers, exact inner-product search); with --models (a folder
written by bench/retrieval_models.py) also lmforge's bi-encoder of that collection, and each of the
three first stages with its top --rerank-depth re-ordered by lmforge's cross-encoder of that
collection. SQuAD questions come from the held-out articles (--squad-split heldout: the odd-numbered
ones, which lmforge's models never trained on), searched among all 2,067 paragraphs. BEIR's
published nDCG@10 of all-MiniLM-L6-v2 on SciFact is 0.645: this run measures it rather than quoting
it. Every metric is also computed by ranx on the same run; the largest absolute difference is
printed per row.
Index build time = the wall clock of indexing the corpus (for the dense model: embedding it);
queries/s = queries / the wall clock of searching them (query embedding included), batches of 256.
Data: $LMFORGE_SHARED_DATA or ../shared/data. Writes results.json and a markdown table to --out.

    python bench/retrieval.py [--squad-queries 2000] [--rows bm25 minilm] [--models DIR [--rerank-depth 10]]
                              [--out bench/out/retrieval]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.retrieval.datasets import load_dataset, subsample  # noqa: E402
from lmforge.retrieval.evaluate import evaluate_retriever, make_retriever, ranx_metrics  # noqa: E402
from lmforge.retrieval.metrics import default_metrics  # noqa: E402

ROWS = {"bm25": "BM25", "minilm": "all-MiniLM-L6-v2"}


def retrievers(dataset: str, rows: list[str], models: Path | None, depth: int):
    """The rows' retrievers, then with --models this collection's lmforge bi-encoder, and every first
    stage again with its top `depth` re-ranked by lmforge's cross-encoder (the first stage's index is
    reused: RerankedRetriever does not index the same documents twice)."""
    from lmforge.retrieval.biencoder import RerankedRetriever, Reranker

    firsts = [make_retriever(row, show_progress=True) for row in rows]
    if models is None:
        return firsts
    bi = make_retriever(f"biencoder:{models / f'biencoder-{dataset}'}", show_progress=True)
    bi.name = "lmforge bi-encoder"
    firsts.append(bi)
    reranker = Reranker(models / f"reranker-{dataset}")
    reranker.name = "lmforge re-ranker"
    return firsts + [RerankedRetriever(first, reranker, depth) for first in firsts]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--squad-queries", type=int, default=2000, help="questions sampled from SQuAD dev (0 = all)")
    p.add_argument("--squad-split", default="heldout", help="SQuAD questions: heldout (odd-numbered articles, "
                   "never trained on) or all")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--models", type=Path, default=None, help="a bench/retrieval_models.py folder: adds lmforge's "
                   "bi-encoder and re-ranked rows")
    p.add_argument("--rerank-depth", type=int, default=10, help="documents re-ranked per query (default 10)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "retrieval"))
    args = p.parse_args()
    metrics = default_metrics()
    squad = load_dataset("squad", args.squad_split)
    datasets = [("squad", subsample(squad, args.squad_queries or None)), ("scifact", load_dataset("scifact", "test"))]
    results = []
    t_start = time.perf_counter()
    for key, ds in datasets:
        print(ds.summary(), flush=True)
        for retriever in retrievers(key, args.rows, args.models, args.rerank_depth):
            r = evaluate_retriever(retriever, ds, metrics, show_progress=True)
            reference = ranx_metrics(r["run"], ds.qrels, metrics)
            r["ranx"] = reference
            r["ranx_max_abs_diff"] = max(abs(reference[m] - r["metrics"][m]) for m in metrics)
            del r["run"]
            results.append(r)
            print(f"  {r['description']}: " + ", ".join(f"{m} {r['metrics'][m]:.4f}" for m in metrics)
                  + f"; {r['queries_per_second']:.1f} queries/s, index {r['index_seconds']:.1f} s; "
                  f"max |ours - ranx| {r['ranx_max_abs_diff']:.1e}", flush=True)
    total = time.perf_counter() - t_start

    head = ["collection", "retriever", *metrics, "queries/s", "index build (s)", "max abs diff vs ranx"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([r["dataset"], r["retriever"], *(f"{r['metrics'][m]:.3f}" for m in metrics),
                                        f"{r['queries_per_second']:.0f}", f"{r['index_seconds']:.1f}",
                                        f"{r['ranx_max_abs_diff']:.0e}"]) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\ntotal {total:.0f} s on {platform.processor() or platform.machine()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"metrics": metrics, "results": results, "seconds": total},
                                                 indent=1) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out}/results.json and table.md")


if __name__ == "__main__":
    main()
