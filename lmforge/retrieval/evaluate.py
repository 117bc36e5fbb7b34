"""Run a retriever over a test collection: the run, its metrics, queries per second, index build time.

A retriever is anything with
    index(doc_ids: list[str], texts: list[str]) -> seconds
    search(queries: list[str], k: int) -> [[(doc_id, score), ...] per query], best first
    describe() -> str  and  name: str
(BM25Retriever and DenseRetriever here). Index build time is the wall-clock time of index() (for a
dense retriever: embedding the whole corpus). Queries per second is the number of queries over the
wall-clock time of all search() calls, query embedding included, searched in batches of
`batch_size` queries on this machine's CPU threads.
"""
from __future__ import annotations

import time

from lmforge.retrieval.datasets import RetrievalDataset
from lmforge.retrieval.metrics import default_metrics, evaluate_run, parse_metric


def make_retriever(name: str, backend: str = "auto", show_progress: bool = False, batch_size: int = 64):
    """`bm25`, `minilm` (all-MiniLM-L6-v2 through sentence-transformers) or `biencoder:RUN` (a
    `lmforge retrieval train-biencoder` run)."""
    from lmforge.common import LmforgeError

    if name == "bm25":
        from lmforge.retrieval.bm25 import BM25Retriever

        return BM25Retriever(show_progress=show_progress)
    if name == "minilm":
        from lmforge.retrieval.dense import DenseRetriever, MiniLMEncoder

        return DenseRetriever(MiniLMEncoder(batch_size=batch_size, show_progress=show_progress), backend=backend)
    if name.startswith("biencoder:"):
        from lmforge.retrieval.biencoder import BiEncoderEmbedder
        from lmforge.retrieval.dense import DenseRetriever

        return DenseRetriever(BiEncoderEmbedder(name.split(":", 1)[1]), backend=backend)
    raise LmforgeError(f"unknown retriever {name!r}: expected bm25, minilm or biencoder:RUN")


def retrieve(retriever, dataset: RetrievalDataset, depth: int, batch_size: int = 256,
             show_progress: bool = False) -> tuple[dict, float]:
    """({query_id: {doc_id: score}} with the top `depth` documents per query, seconds spent searching)."""
    from tqdm.auto import tqdm

    qids = list(dataset.queries)
    run: dict[str, dict[str, float]] = {}
    seconds = 0.0
    with tqdm(total=len(qids), desc=f"search {retriever.name}", unit="query", disable=not show_progress,
              leave=False) as bar:
        for start in range(0, len(qids), batch_size):
            chunk = qids[start:start + batch_size]
            t0 = time.perf_counter()
            results = retriever.search([dataset.queries[q] for q in chunk], depth)
            seconds += time.perf_counter() - t0
            for q, hits in zip(chunk, results):
                run[q] = {d: s for d, s in hits}
            bar.update(len(chunk))
    return run, seconds


def evaluate_retriever(retriever, dataset: RetrievalDataset, metrics: list[str] | None = None,
                       depth: int | None = None, batch_size: int = 256, show_progress: bool = False) -> dict:
    """Index the corpus, search every query, score the run. Returns a dict with the run, the metrics,
    queries_per_second, index_seconds and what was run."""
    metrics = metrics or default_metrics()
    depth = depth or max(parse_metric(m)[1] for m in metrics)
    doc_ids = list(dataset.corpus)
    index_seconds = retriever.index(doc_ids, [dataset.corpus[d].full_text() for d in doc_ids])
    run, search_seconds = retrieve(retriever, dataset, depth, batch_size, show_progress)
    return {
        "dataset": dataset.name,
        "retriever": retriever.name,
        "description": retriever.describe(),
        "documents": len(doc_ids),
        "queries": len(dataset.queries),
        "depth": depth,
        "metrics": evaluate_run(run, dataset.qrels, metrics),
        "index_seconds": index_seconds,
        "search_seconds": search_seconds,
        "queries_per_second": len(dataset.queries) / search_seconds if search_seconds > 0 else float("inf"),
        "run": run,
    }


def ranx_metrics(run: dict, qrels: dict, metrics: list[str]) -> dict[str, float]:
    """The same metrics computed by `ranx` (the reference our code is checked against), with the
    conventions of lmforge.retrieval.metrics: every query of the qrels counts, a missing one as an
    empty ranking; queries the qrels do not have are dropped."""
    from ranx import Qrels, Run, evaluate

    full_run = {q: dict(run.get(q, {})) for q in qrels}
    empty = [q for q, docs in full_run.items() if not docs]
    for q in empty:  # ranx cannot hold an empty ranking: a document no qrels judge, scored lowest
        full_run[q] = {"\x00no-result": -1e30}
    values = evaluate(Qrels({q: {d: int(r) for d, r in j.items()} for q, j in qrels.items()}), Run(full_run),
                      list(metrics), return_mean=True, make_comparable=True)
    if isinstance(values, float):
        values = {metrics[0]: values}
    return {m: float(values[m]) for m in metrics}


def markdown_table(results: list[dict], metrics: list[str]) -> str:
    """One row per result of evaluate_retriever."""
    head = ["dataset", "retriever", "docs", "queries", *metrics, "queries/s", "index build (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["dataset"], r["retriever"], str(r["documents"]), str(r["queries"]),
                 *(f"{r['metrics'][m]:.4f}" for m in metrics), f"{r['queries_per_second']:.1f}",
                 f"{r['index_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
