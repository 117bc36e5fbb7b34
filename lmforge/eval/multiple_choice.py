"""Multiple choice by log-likelihood: the model's probability of each answer picks its choice.

Metrics, named as in lm-evaluation-harness:
  acc        argmax of the summed log-likelihood of each continuation;
  acc_norm   argmax of log-likelihood / the choice's length in characters (removes the bias
             towards short answers, which have fewer tokens to pay for);
  acc_bytes  the same divided by the length in UTF-8 bytes.
Each comes with its standard error, and `chance` is the expected accuracy of random guessing
(the mean of 1 / number of choices), used to centre scores (0 = chance, 1 = perfect).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from lmforge.eval.harness import EvalModel, loglikelihoods
from lmforge.eval.tasks import MCItem

FEWSHOT_SEPARATOR = "\n\n"


def fewshot_prefix(items: list[MCItem], index: int, k: int, seed: int) -> str:
    """k solved examples drawn from the other items, fixed by (seed, index): an item gets the same
    shots whatever --limit is. (lm-eval draws shots from a training split; locally there is one
    split, so the item itself is excluded instead.)"""
    if k == 0:
        return ""
    rng = random.Random(seed * 1_000_003 + index)
    pool = [j for j in rng.sample(range(len(items)), min(len(items), k + 1)) if j != index][:k]
    return "".join(items[j].solved + FEWSHOT_SEPARATOR for j in pool)


@dataclass
class MCResult:
    metrics: dict[str, float]
    predictions: list[dict]  # per item: gold, log-likelihoods, picks


def evaluate_multiple_choice(lm: EvalModel, items: list[MCItem], *, fewshot: int = 0, seed: int = 1234,
                             batch_size: int = 16, progress: bool = False, desc: str = "multiple choice",
                             pool: list[MCItem] | None = None) -> MCResult:
    """Score every choice of every item (one flat, length-sorted batch of requests) and pick.
    `pool` supplies the few-shot examples (default: the items themselves)."""
    pool = items if pool is None else pool
    requests, spans = [], []
    for i, item in enumerate(items):
        prefix = fewshot_prefix(pool, i, fewshot, seed)
        spans.append((len(requests), len(item.contexts)))
        requests += [(prefix + c, t) for c, t in zip(item.contexts, item.continuations)]
    lls = loglikelihoods(lm, requests, batch_size=batch_size, progress=progress, desc=desc)
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    predictions, chance = [], []
    for item, (start, n) in zip(items, spans):
        ll = np.array([r.logprob for r in lls[start:start + n]])
        chars = np.array([max(len(c), 1) for c in item.choice_texts], dtype=float)
        nbytes = np.array([max(len(c.encode()), 1) for c in item.choice_texts], dtype=float)
        picks = {"acc": int(np.argmax(ll)), "acc_norm": int(np.argmax(ll / chars)),
                 "acc_bytes": int(np.argmax(ll / nbytes))}
        for k, p in picks.items():
            hits[k].append(float(p == item.gold))
        chance.append(1.0 / n)
        predictions.append({"gold": item.gold, "loglikelihoods": ll.tolist(),
                            **{f"pick_{k}": p for k, p in picks.items()}})
    metrics: dict[str, float] = {"n": len(items), "chance": float(np.mean(chance)) if chance else float("nan")}
    for k, v in hits.items():
        m = float(np.mean(v)) if v else float("nan")
        metrics[k] = m
        metrics[f"{k}_stderr"] = math.sqrt(m * (1 - m) / max(len(v) - 1, 1)) if v else float("nan")
    return MCResult(metrics, predictions)


def centred(acc: float, chance: float) -> float:
    """(acc - chance) / (1 - chance): 0 = random guessing, 1 = perfect (nanochat's CORE centring)."""
    return (acc - chance) / (1.0 - chance)
