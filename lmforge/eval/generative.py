"""Generative tasks: the model writes an answer, a rule grades it.

GSM8K follows the common few-shot chain-of-thought setup (lm-eval's `gsm8k` task): K solved
training problems as "Question: ...\\nAnswer: <worked solution> #### <number>", then the test
question; generation is greedy and stops at the next "Question:" or a blank line. The answer is
the number after "####" if the model wrote one, else the last number in its text (lm-eval's
"flexible extract"); it scores when it equals the reference number by value (lmforge.answers: the
rule every RL reward uses too).

Generation goes through the adapter: lmforge checkpoints use the batched, KV-cached `Engine` with
stop strings; Hugging Face folders a plain greedy loop.
"""
from __future__ import annotations

import math
import random
import re

from lmforge.answers import extract_number
from lmforge.eval.harness import EvalModel
from lmforge.eval.tasks import GSM8KItem

GSM8K_STOP = ("Question:", "\n\n")


def score_gsm8k_reply(output: str, solution: str) -> bool:
    """Whether a generated answer matches a worked solution's final number: lmforge.answers' rule,
    the same one the RL rewards and the synthetic tasks use."""
    gold = extract_number(solution)
    return gold is not None and extract_number(output) == gold


def gsm8k_prompt(item: GSM8KItem, shots: list[GSM8KItem]) -> str:
    def solved(x: GSM8KItem) -> str:
        # "<<48/2=24>>" calculator annotations are dropped from the shown solutions.
        return f"Question: {x.question}\nAnswer: {re.sub(r'<<.*?>>', '', x.solution)}\n\n"

    return "".join(solved(s) for s in shots) + f"Question: {item.question}\nAnswer:"


def evaluate_gsm8k(lm: EvalModel, items: list[GSM8KItem], shots_pool: list[GSM8KItem], *, fewshot: int = 5,
                   seed: int = 1234, max_new_tokens: int = 256, batch_size: int = 16,
                   progress: bool = False) -> dict:
    """Exact-match accuracy. The K shots (from shots_pool, normally the training split) are the
    same for every question, fixed by the seed."""
    from tqdm import tqdm

    shots = random.Random(seed).sample(shots_pool, min(fewshot, len(shots_pool))) if fewshot else []
    prompts = [gsm8k_prompt(it, shots) for it in items]
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="gsm8k", disable=not progress, unit="batch"):
        outputs += lm.generate(prompts[start:start + batch_size], max_new_tokens, stop=GSM8K_STOP)
    rows, hits = [], []
    for it, out in zip(items, outputs):
        pred, gold = extract_number(out), it.answer
        hits.append(float(score_gsm8k_reply(out, it.solution)))
        rows.append({"question": it.question, "output": out, "prediction": pred, "gold": gold})
    acc = sum(hits) / len(hits) if hits else float("nan")
    stderr = math.sqrt(acc * (1 - acc) / max(len(hits) - 1, 1)) if hits else float("nan")
    return {"metrics": {"n": len(items), "exact_match": acc, "exact_match_stderr": stderr, "chance": 0.0},
            "predictions": rows}


def load_mt_bench_references(root) -> tuple[list[str], list[str]]:
    """First-turn MT-bench questions that have a GPT-4 reference answer (math, reasoning, coding),
    and those answers: eval/mt_bench/question.jsonl and reference_answer gpt-4.jsonl."""
    from pathlib import Path

    from lmforge.eval.tasks import _read_jsonl

    root = Path(root)
    questions = {r["question_id"]: r["turns"][0] for r in _read_jsonl(root / "eval" / "mt_bench" / "question.jsonl")}
    refs = {r["question_id"]: r["choices"][0]["turns"][0]
            for r in _read_jsonl(root / "eval" / "mt_bench" / "gpt-4.jsonl")}
    ids = sorted(set(questions) & set(refs))
    return [questions[i] for i in ids], [refs[i] for i in ids]


def evaluate_reference_generation(lm: EvalModel, prompts: list[str], references: list[str], *,
                                  max_new_tokens: int = 128, batch_size: int = 16, progress: bool = False) -> dict:
    """Answer each prompt ("Question: ...\\nAnswer:", greedy, until a blank line) and score the
    answers against the references with BLEU and ROUGE."""
    from tqdm import tqdm

    from lmforge.eval.metrics import overlap_metrics

    texts = [f"Question: {p}\nAnswer:" for p in prompts]
    outputs: list[str] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="generating", disable=not progress, unit="batch"):
        outputs += [o.strip() for o in lm.generate(texts[start:start + batch_size], max_new_tokens,
                                                   stop=("\n\nQuestion:",))]
    # An empty output is a real (bad) answer: BLEU/ROUGE score it 0 rather than crash on it.
    metrics = overlap_metrics([o or " " for o in outputs], references)
    return {"metrics": {"n": len(prompts), **metrics},
            "predictions": [{"prompt": p, "output": o, "reference": r}
                            for p, o, r in zip(prompts, outputs, references)]}
