"""Text-overlap metrics for generated text, from the libraries everyone reports with.

BLEU is sacrebleu's corpus BLEU (its default 13a tokenisation, so scores compare across papers);
ROUGE-1/2/L are Google's `rouge-score` F-measures with Porter stemming, averaged over examples.
"""
from __future__ import annotations

from collections.abc import Sequence

from lmforge.common import LmforgeError


def _check(hyps: Sequence[str], refs: Sequence) -> list[list[str]]:
    if len(hyps) != len(refs):
        raise LmforgeError(f"{len(hyps)} outputs but {len(refs)} references: they must pair up")
    if not hyps:
        raise LmforgeError("no outputs to score")
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100). Each reference entry is one string or a list of alternatives."""
    import sacrebleu

    per_item = _check(hyps, refs)
    n_refs = max(len(r) for r in per_item)
    # sacrebleu wants one stream per reference position; items with fewer references pad with None.
    streams = [[r[k] if k < len(r) else None for r in per_item] for k in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def rouge(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1); with several references, the best per item."""
    from rouge_score import rouge_scorer

    per_item = _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, rs in zip(hyps, per_item):
        scores = scorer.score_multi(rs, h)
        for k in totals:
            totals[k] += scores[k].fmeasure
    return {k: v / len(hyps) for k, v in totals.items()}


def overlap_metrics(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    return {"bleu": bleu(hyps, refs), **rouge(hyps, refs)}
