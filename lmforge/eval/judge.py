"""LLM-as-a-judge: pairwise comparison of two models' answers by a third model.

A judge sees a question and two answers labelled A and B and says which is better (or a tie).
Judges prefer whichever answer comes first (or second) more often than they should, so every pair
is judged twice, once in each order; each order gives model 1 a point for a win and half a
point for a tie, and the two orders together decide: more than one point is a win, exactly one a
tie, less a loss. Two orders that disagree are a self-contradiction, and their rate measures how
much the judge's verdicts depend on position rather than content. Judges also tend to prefer
longer answers, so the report gives both models' mean answer length and how often the longer
answer won.

Backends: `ModelJudge` (an lmforge checkpoint or a Hugging Face folder: compares the
log-likelihoods of the verdicts " A", " B" and " tie" after the prompt, so even a small base model
gives a well-defined verdict) and `EndpointJudge` (any OpenAI-compatible chat endpoint: the reply
must contain [[A]], [[B]] or [[C]] for a tie).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from lmforge.common import LmforgeError, json_lines

VERDICTS = ("A", "B", "tie")

JUDGE_INSTRUCTIONS = (
    "You are an impartial judge. Compare two assistants' answers to the user's question. Judge "
    "helpfulness, correctness and relevance; do not let the order of the answers, their length or "
    "the assistants' names sway you."
)
ENDPOINT_FORMAT = ("After a short explanation, give your verdict as [[A]] if A is better, [[B]] if B is better, "
                   "or [[C]] for a tie.")


def judge_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return (f"{JUDGE_INSTRUCTIONS}\n\n[Question]\n{question}\n\n[Answer A]\n{answer_a}\n\n"
            f"[Answer B]\n{answer_b}\n\n")


class JudgeBackend(Protocol):
    def verdict(self, question: str, answer_a: str, answer_b: str) -> str:
        """"A", "B" or "tie"."""
        ...


class ModelJudge:
    """A local model as judge: the verdict with the highest log-likelihood after
    "...Which answer is better: A, B or tie?\\nVerdict:"."""

    def __init__(self, lm):
        self.lm = lm

    def verdict(self, question: str, answer_a: str, answer_b: str) -> str:
        from lmforge.eval.harness import loglikelihoods

        ctx = judge_prompt(question, answer_a, answer_b) + "Which answer is better: A, B or tie?\nVerdict:"
        lls = loglikelihoods(self.lm, [(ctx, " " + v) for v in VERDICTS])
        return VERDICTS[max(range(3), key=lambda i: lls[i].logprob)]


def parse_endpoint_verdict(text: str) -> str | None:
    """The last [[A]] / [[B]] / [[C]] in a judge's reply ("tie" for C); None if there is none."""
    found = re.findall(r"\[\[\s*(A|B|C|tie)\s*\]\]", text, flags=re.IGNORECASE)
    if not found:
        return None
    v = found[-1].upper()
    return {"A": "A", "B": "B"}.get(v, "tie")


class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, lmforge serve, the
    OpenAI API...). base_url is e.g. http://localhost:8000/v1. A reply without a verdict counts as a
    tie and is counted in `unparsed`."""

    def __init__(self, base_url: str, model: str = "judge", api_key: str | None = None, max_tokens: int = 512,
                 timeout: float = 120.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=1)
        self.model, self.max_tokens = model, max_tokens
        self.unparsed = 0

    def verdict(self, question: str, answer_a: str, answer_b: str) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model, temperature=0.0, max_tokens=self.max_tokens,
                messages=[{"role": "system", "content": JUDGE_INSTRUCTIONS},
                          {"role": "user", "content": judge_prompt(question, answer_a, answer_b) + ENDPOINT_FORMAT}])
        except openai.OpenAIError as e:
            raise LmforgeError(f"judge endpoint {self.client.base_url} failed: {type(e).__name__}: {e}") from None
        v = parse_endpoint_verdict(reply.choices[0].message.content or "")
        if v is None:
            self.unparsed += 1
            return "tie"
        return v


def load_judge(spec: str, device: str = "cpu", model_name: str = "judge", api_key: str | None = None) -> JudgeBackend:
    """An http(s) URL -> EndpointJudge; a folder -> ModelJudge over an lmforge checkpoint or HF model."""
    if spec.startswith(("http://", "https://")):
        return EndpointJudge(spec, model=model_name, api_key=api_key)
    from lmforge.eval.harness import load_eval_model

    return ModelJudge(load_eval_model(spec, device=device))


@dataclass
class PairJudgement:
    question: str
    answer_1: str
    answer_2: str
    first_order: str  # verdict with model 1 as A
    swapped_order: str  # verdict with model 1 as B
    outcome: str  # for model 1: "win", "tie" or "loss"
    contradiction: bool


@dataclass
class JudgeReport:
    wins: int
    ties: int
    losses: int
    contradiction_rate: float  # the two orders disagree
    flip_rate: float  # both orders decisive and for opposite models
    first_position_rate: float  # share of decisive verdicts that chose answer A
    mean_length_1: float  # characters
    mean_length_2: float
    longer_wins_rate: float | None  # among decided pairs with different lengths, share the longer won
    pairs: list[PairJudgement] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / max(self.n, 1)

    def summary(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "pairs"}
        return {"n": self.n, "win_rate": self.win_rate, **d}


def _points(v: str, model1_is: str) -> float:
    return 0.5 if v == "tie" else float(v == model1_is)


def compare(judge: JudgeBackend, questions: list[str], answers_1: list[str], answers_2: list[str], *,
            progress: bool = False) -> JudgeReport:
    """Judge every pair in both orders and tally from model 1's side."""
    from tqdm import tqdm

    if not (len(questions) == len(answers_1) == len(answers_2)):
        raise LmforgeError(f"{len(questions)} questions, {len(answers_1)} and {len(answers_2)} answers: "
                           "every question needs one answer from each model")
    if not questions:
        raise LmforgeError("no questions to judge")
    pairs, first_pos, decisive = [], 0, 0
    for q, a1, a2 in tqdm(list(zip(questions, answers_1, answers_2)), desc="judging", disable=not progress):
        v1, v2 = judge.verdict(q, a1, a2), judge.verdict(q, a2, a1)
        for v in (v1, v2):
            if v not in VERDICTS:
                raise LmforgeError(f"judge returned {v!r}, expected one of {VERDICTS}")
            if v != "tie":
                decisive += 1
                first_pos += v == "A"
        pts = _points(v1, "A") + _points(v2, "B")
        outcome = "win" if pts > 1 else "loss" if pts < 1 else "tie"
        pairs.append(PairJudgement(q, a1, a2, v1, v2, outcome, _points(v1, "A") != _points(v2, "B")))
    flips = sum(p.first_order != "tie" and p.swapped_order != "tie" and p.contradiction for p in pairs)
    decided = [p for p in pairs if p.outcome != "tie" and len(p.answer_1) != len(p.answer_2)]
    longer_won = sum((p.outcome == "win") == (len(p.answer_1) > len(p.answer_2)) for p in decided)
    n = len(pairs)
    return JudgeReport(
        wins=sum(p.outcome == "win" for p in pairs), ties=sum(p.outcome == "tie" for p in pairs),
        losses=sum(p.outcome == "loss" for p in pairs),
        contradiction_rate=sum(p.contradiction for p in pairs) / n, flip_rate=flips / n,
        first_position_rate=first_pos / decisive if decisive else float("nan"),
        mean_length_1=sum(map(len, answers_1)) / n, mean_length_2=sum(map(len, answers_2)) / n,
        longer_wins_rate=longer_won / len(decided) if decided else None, pairs=pairs)


def load_mt_bench_questions(root, limit: int | None = None) -> list[str]:
    """First turns of the 80 MT-bench questions (eval/mt_bench/question.jsonl)."""
    from pathlib import Path

    from lmforge.eval.tasks import _rows, iter_limit

    return iter_limit(_rows(Path(root) / "eval" / "mt_bench" / "question.jsonl", lambda r: r["turns"][0]), limit)


def load_questions_file(path, limit: int | None = None) -> list[str]:
    """Questions from a JSON-lines file: one {"question": "..."} object (or a bare JSON string)
    per line. A line that is neither is one error naming the file and line."""
    from pathlib import Path

    from lmforge.eval.tasks import iter_limit

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"questions file not found: {path}")
    questions = []
    for n, row in json_lines(path.read_text(encoding="utf-8").splitlines(), path):
        q = row.get("question") if isinstance(row, dict) else row
        if not isinstance(q, str) or not q.strip():
            raise LmforgeError(f'{path}:{n}: expected {{"question": "..."}} or a JSON string, got {str(row)[:80]}')
        questions.append(q)
    if not questions:
        raise LmforgeError(f"{path} holds no questions")
    return iter_limit(questions, limit)
