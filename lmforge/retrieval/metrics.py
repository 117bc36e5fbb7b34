"""Ranking metrics of a retrieval run against relevance judgements, written out by hand.

    run   = {query_id: {doc_id: score}}      what a retriever returned (higher score = better)
    qrels = {query_id: {doc_id: relevance}}  the judgements (BEIR's qrels: an integer grade per pair)

Conventions (those of BEIR, whose numbers come from pytrec_eval/trec_eval, and of `ranx`):

* **Order.** A query's documents are ranked by score, highest first; equal scores are ordered by
  doc id (string order, ascending), so the same run always gives the same numbers. (trec_eval
  breaks ties by doc id descending and ranx by its own sort; a run without tied scores, like every
  real one here, gets the same ranking from all three.)
* **Relevant** means a judged relevance > 0. A judgement of 0 (or below) is "judged, not relevant"
  and counts exactly like an unjudged document.
* **Which queries are averaged.** Every query of the qrels, each with equal weight. A query of the
  qrels that the run does not have scores 0 on every metric (its ranking is empty). A query of the
  run that the qrels do not have is ignored (it cannot be scored). A query of the qrels with no
  relevant document at all (only grades <= 0) scores 0 on every metric and still counts in the mean:
  that is what ranx and pytrec_eval return for it (its ideal DCG is 0, which we define as nDCG 0).
  BEIR's qrels have no such query; drop them from the qrels first if you want them left out.

Metrics at cut-off k (the first k documents of the ranking):

* recall@k  = |relevant among the first k| / |relevant|
* MRR@k     = 1 / rank of the first relevant document among the first k, 0 if none (reciprocal rank)
* nDCG@k    = DCG@k / IDCG@k with DCG@k = sum over ranks i = 1..k of rel_i / log2(i + 1): graded
  relevance used as the gain itself (trec_eval's and ranx's `ndcg`, Jarvelin & Kekalainen; not the
  2^rel - 1 gain of Burges et al.), rel_i = the qrels grade of the document at rank i (0 if unjudged
  or <= 0), and IDCG@k the DCG@k of the qrels' own grades sorted from highest: the best ranking the
  judgements allow.
"""
from __future__ import annotations

import math
import re

from lmforge.common import LmforgeError

METRICS = ("recall", "mrr", "ndcg")


def ranking(scores: dict[str, float]) -> list[str]:
    """Doc ids by score, highest first; ties by doc id ascending (the module's tie rule)."""
    return [d for d, _ in sorted(scores.items(), key=lambda item: (-float(item[1]), str(item[0])))]


def _relevant(judged: dict[str, float]) -> dict[str, float]:
    return {d: float(r) for d, r in judged.items() if float(r) > 0}


def recall_at(ranked: list[str], relevant: dict[str, float], k: int) -> float:
    if not relevant:
        return 0.0
    return sum(1 for d in ranked[:k] if d in relevant) / len(relevant)


def mrr_at(ranked: list[str], relevant: dict[str, float], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if d in relevant:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at(ranked: list[str], relevant: dict[str, float], k: int) -> float:
    dcg = sum(relevant.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


_FUNCTIONS = {"recall": recall_at, "mrr": mrr_at, "ndcg": ndcg_at}


def parse_metric(name: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10); a one-line LmforgeError for anything else."""
    m = re.fullmatch(r"(recall|mrr|ndcg)@([1-9][0-9]*)", name.strip().lower())
    if not m:
        raise LmforgeError(f"unknown metric {name!r}: expected recall@K, mrr@K or ndcg@K with K >= 1")
    return m.group(1), int(m.group(2))


def per_query(run: dict, qrels: dict, metrics: list[str]) -> dict[str, dict[str, float]]:
    """{metric: {query_id: value}} over every query of the qrels (see the module's conventions)."""
    parsed = [(m, *parse_metric(m)) for m in metrics]
    out = {m: {} for m, _, _ in parsed}
    for qid, judged in qrels.items():
        relevant = _relevant(judged)
        ranked = ranking(run.get(qid, {}))
        for m, fn, k in parsed:
            out[m][qid] = _FUNCTIONS[fn](ranked, relevant, k)
    return out


def evaluate_run(run: dict, qrels: dict, metrics: list[str]) -> dict[str, float]:
    """{metric: mean over the queries of the qrels}, e.g. metrics=["recall@5", "mrr@10", "ndcg@10"]."""
    if not qrels:
        raise LmforgeError("no judged queries (the qrels are empty): nothing to evaluate")
    table = per_query(run, qrels, metrics)
    return {m: sum(values.values()) / len(values) for m, values in table.items()}


def default_metrics(ks=(1, 5, 20), ndcg_k: int = 10, mrr_k: int = 10) -> list[str]:
    """The issue's set: recall@1/5/20, MRR@10, nDCG@10."""
    return [f"recall@{k}" for k in ks] + [f"mrr@{mrr_k}", f"ndcg@{ndcg_k}"]
