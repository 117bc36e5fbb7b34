"""Benchmark data: where each set comes from and how an item becomes text.

Every multiple-choice item becomes an `MCItem`: per choice a context and a continuation; the
model's log-likelihood of each continuation after its context ranks the choices. The prompt
formats follow lm-evaluation-harness's task definitions (each loader's docstring says which), so
accuracies compare with published numbers.

Data comes from local files under the shared data folder (`LMFORGE_SHARED_DATA`, else
`../shared/data` next to the repository, or `--data-root`), or, with `source="hub"` (or when no
local file exists), from the Hugging Face hub by name through `datasets` (needs network).
"""
from __future__ import annotations

import bz2
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.common import LmforgeError

REPO = Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    return Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class MCItem:
    """One question. Most tasks share one context across choices; partial scoring (WinoGrande)
    has one context per choice and a shared continuation. `choice_texts` are the strings whose
    length normalises the log-likelihood (lm-eval's doc_to_choice)."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    choice_texts: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise LmforgeError("a multiple-choice item needs at least two (context, continuation) pairs")
        if not 0 <= self.gold < len(self.contexts):
            raise LmforgeError(f"gold index {self.gold} out of range for {len(self.contexts)} choices")
        if not self.choice_texts:
            self.choice_texts = [c.strip() for c in self.continuations]

    @property
    def solved(self) -> str:
        """The item with its right answer, as a few-shot example."""
        return self.contexts[self.gold] + self.continuations[self.gold]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path} (set LMFORGE_SHARED_DATA or --data-root)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path}:{n} is not valid JSON: {e}") from None
    return rows


def _hub(name: str, config: str | None, split: str):
    """A split of a dataset on the Hugging Face hub (needs network, or a local HF cache)."""
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...: one clear line instead of a traceback
        raise LmforgeError(f"cannot load {name}{'/' + config if config else ''} ({split}) from the "
                           f"Hugging Face hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


# ----------------------------------------------------------------------------- HellaSwag


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text: WikiHow items carry markup like "[header]" and
    " [title]"; titles become sentence breaks, other bracketed tags are dropped."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(activity_label: str, ctx_a: str, ctx_b: str, endings: list[str], label: int) -> MCItem:
    """lm-eval's HellaSwag: context = preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()); choices = preprocess(ending), each scored as " " + ending; acc_norm
    divides by the ending's length in characters."""
    query = hellaswag_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    choices = [hellaswag_preprocess(e) for e in endings]
    return MCItem([query] * len(choices), [" " + c for c in choices], int(label), choices)


def _capitalize_last_fragment(ctx: str) -> str:
    """The local file joins ctx_a and ctx_b without lm-eval's ctx_b.capitalize(). In ActivityNet
    items ctx_b is the lowercase start of the last sentence ("... on a roof. he"): capitalise the
    first letter after the last sentence end when it is lowercase, which restores the convention."""
    m = re.search(r"^(.*[.!?]\s+)([a-z])([^.!?]*)$", ctx)
    return m.group(1) + m.group(2).upper() + m.group(3) if m else ctx


def load_hellaswag(root: Path, source: str = "local") -> list[MCItem]:
    """HellaSwag validation (10042 items). Local file: hellaswag/hellaswag_val_full.txt.bz2, six
    lines per item (activity label + ": " + context / gold index / four endings), already cleaned
    of WikiHow markup; the hub: Rowan/hellaswag, validation split."""
    if source == "hub":
        return [hellaswag_item(d["activity_label"], d["ctx_a"], d["ctx_b"], d["endings"], int(d["label"]))
                for d in _hub("Rowan/hellaswag", None, "validation")]
    path = root / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path} (set LMFORGE_SHARED_DATA or --data-root)")
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise LmforgeError(f"{path}: expected 6 lines per item, got {len(lines)} lines")
    items = []
    for i in range(0, len(lines), 6):
        ctx = _capitalize_last_fragment(hellaswag_preprocess(lines[i]))
        choices = [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]]
        items.append(MCItem([ctx] * 4, [" " + c for c in choices], int(lines[i + 1]), choices))
    return items


# ----------------------------------------------------------------------------- ARC, MMLU, others


def arc_item(question: str, choices: list[str], gold: int) -> MCItem:
    """lm-eval's ARC: "Question: {question}\\nAnswer:" then " " + the answer text."""
    ctx = f"Question: {question}\nAnswer:"
    return MCItem([ctx] * len(choices), [" " + c for c in choices], gold, list(choices))


def load_arc(root: Path, level: str, source: str = "local") -> list[MCItem]:
    """ARC-Easy (2376 test questions) / ARC-Challenge (1172). Local: eval/llm-foundry/arc_*.jsonl
    (MosaicML's format, query "Question: ..."); the hub: allenai/ai2_arc, test split."""
    if source == "hub":
        ds = _hub("allenai/ai2_arc", "ARC-Easy" if level == "easy" else "ARC-Challenge", "test")
        return [arc_item(d["question"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))
                for d in ds]
    rows = _read_jsonl(root / "eval" / "llm-foundry" / f"arc_{level}.jsonl")
    return [arc_item(r["query"].removeprefix("Question:").strip(), r["choices"], int(r["gold"])) for r in rows]


def mmlu_item(question: str, choices: list[str], answer: int) -> MCItem:
    """lm-eval's default MMLU: question, the options lettered "A. ..", then "Answer:"; the choices
    are the letters, scored as " A" .. " D"."""
    letters = "ABCDEFGHIJ"[:len(choices)]
    ctx = question.strip() + "\n" + "".join(f"{l}. {c}\n" for l, c in zip(letters, choices)) + "Answer:"
    return MCItem([ctx] * len(choices), [" " + l for l in letters], int(answer), list(letters))


def load_mmlu(root: Path, source: str = "local") -> list[MCItem]:
    """MMLU. Local: eval/qwen-math/mmlu_stem/test.jsonl (18 STEM subjects, 3018 questions: the full
    57 subjects are not available offline); the hub: cais/mmlu "all", test split (14042)."""
    if source == "hub":
        return [mmlu_item(d["question"], d["choices"], d["answer"]) for d in _hub("cais/mmlu", "all", "test")]
    return [mmlu_item(r["question"], r["choices"], r["answer"])
            for r in _read_jsonl(root / "eval" / "qwen-math" / "mmlu_stem" / "test.jsonl")]


def foundry_item(r: dict) -> MCItem:
    """MosaicML's ICL formats: {query, choices, gold} is scored as query + " " + choice;
    {context_options, continuation, gold} (WinoGrande) as option + " " + continuation, with the
    continuation's log-likelihood compared across options (lm-eval's partial scoring)."""
    if "context_options" in r:
        opts = r["context_options"]
        return MCItem(list(opts), [" " + r["continuation"]] * len(opts), int(r["gold"]), list(opts))
    query = r["query"].rstrip()
    return MCItem([query] * len(r["choices"]), [" " + c for c in r["choices"]], int(r["gold"]), list(r["choices"]))


def load_foundry(root: Path, file: str) -> list[MCItem]:
    return [foundry_item(r) for r in _read_jsonl(root / "eval" / "llm-foundry" / file)]


def _piqa_item(r: dict) -> MCItem:
    """lm-eval's PIQA: "Question: {goal}\\nAnswer:" then " " + the solution."""
    return arc_item(r["query"].removeprefix("Question:").strip(), r["choices"], int(r["gold"]))


# name -> (loader(root, source), what it is)
MC_TASKS: dict[str, tuple[Callable[[Path, str], list[MCItem]], str]] = {
    "hellaswag": (load_hellaswag, "HellaSwag validation, 4 endings"),
    "arc_easy": (lambda root, src: load_arc(root, "easy", src), "ARC-Easy test"),
    "arc_challenge": (lambda root, src: load_arc(root, "challenge", src), "ARC-Challenge test"),
    "mmlu": (load_mmlu, "MMLU (local: 18 STEM subjects)"),
    "piqa": (lambda root, src: [_piqa_item(r) for r in _read_jsonl(root / "eval/llm-foundry/piqa.jsonl")],
             "PIQA validation"),
    "openbookqa": (lambda root, src: load_foundry(root, "openbook_qa.jsonl"), "OpenBookQA test"),
    "copa": (lambda root, src: load_foundry(root, "copa.jsonl"), "COPA"),
    "winogrande": (lambda root, src: load_foundry(root, "winogrande.jsonl"), "WinoGrande (partial scoring)"),
    "siqa": (lambda root, src: load_foundry(root, "siqa.jsonl"), "Social IQa (lettered)"),
    "commonsense_qa": (lambda root, src: load_foundry(root, "commonsense_qa.jsonl"), "CommonsenseQA (lettered)"),
    "boolq": (lambda root, src: load_foundry(root, "boolq.jsonl"), "BoolQ (no/yes)"),
}
HUB_TASKS = {"hellaswag", "arc_easy", "arc_challenge", "mmlu"}


def load_mc_task(name: str, root: str | Path | None = None, source: str = "auto") -> list[MCItem]:
    """Items of a multiple-choice task. source: "local", "hub", or "auto" (local if the file is
    there, else the hub)."""
    if name not in MC_TASKS:
        raise LmforgeError(f"unknown multiple-choice task {name!r}; known: {', '.join(MC_TASKS)}")
    if source not in ("local", "hub", "auto"):
        raise LmforgeError(f"data source must be local, hub or auto, got {source!r}")
    root = Path(root) if root is not None else default_data_root()
    loader = MC_TASKS[name][0]
    if source == "hub" and name not in HUB_TASKS:
        raise LmforgeError(f"{name} loads from local files only (hub tasks: {', '.join(sorted(HUB_TASKS))})")
    if source == "auto":
        try:
            return loader(root, "local")
        except LmforgeError:
            if name not in HUB_TASKS:
                raise
            return loader(root, "hub")
    return loader(root, source)


# ----------------------------------------------------------------------------- GSM8K


@dataclass
class GSM8KItem:
    question: str
    solution: str  # worked solution ending in "#### answer"

    @property
    def answer(self) -> str:
        return self.solution.split("####")[-1].strip().replace(",", "")


def load_gsm8k(root: str | Path | None = None, source: str = "auto", split: str = "test") -> list[GSM8KItem]:
    """GSM8K (test 1319, train 7473). Local: gsm8k/{split}.jsonl (OpenAI's files); the hub:
    openai/gsm8k "main"."""
    root = Path(root) if root is not None else default_data_root()
    path = root / "gsm8k" / f"{split}.jsonl"
    if source == "hub" or (source == "auto" and not path.is_file()):
        return [GSM8KItem(d["question"], d["answer"]) for d in _hub("openai/gsm8k", "main", split)]
    return [GSM8KItem(r["question"], r["answer"]) for r in _read_jsonl(path)]


def iter_limit(items: list, limit: int | None) -> list:
    """The first `limit` items (all when None): --limit evaluates a deterministic prefix."""
    if limit is not None and limit <= 0:
        raise LmforgeError(f"limit must be positive, got {limit}")
    return items if limit is None else items[:limit]
