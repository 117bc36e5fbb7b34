"""Benchmark data: where each set comes from and how an item becomes text.

This file is long because it is the one table of every benchmark: each task's local and hub
loaders and its item builder, side by side so the formats can be compared.

Every multiple-choice item becomes an `MCItem`: per choice a context and a continuation; the
model's log-likelihood of each continuation after its context ranks the choices. The prompt
formats are those of lm-evaluation-harness's task definitions (each item builder's docstring says
which), so accuracies compare with published numbers.

Every task has two sources:
  local  a file under the data root (`--data-root`, else $LMFORGE_SHARED_DATA, else
         `../shared/data` next to the repository), in the layout of this project's shared data;
  hub    the Hugging Face dataset lm-evaluation-harness reads (its real columns), through
         `datasets.load_dataset` (needs network or a filled HF cache). $LMFORGE_HUB_MIRROR (or
         `hub_mirror=`) points at a folder holding repos as the hub serves them
         (MIRROR/owner/name/README.md + parquet files), read by the same code.
`source="auto"` takes the local file when it is there, else the hub. When neither has the data,
the loader raises `DataUnavailable`, which says why and what gets the data; any other error (a
malformed file, a row without the expected column) is a real error and is raised as such.
"""
from __future__ import annotations

import bz2
import functools
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from lmforge.common import LmforgeError, json_lines

REPO = Path(__file__).resolve().parents[2]
HUB_MIRROR_ENV = "LMFORGE_HUB_MIRROR"


def default_data_root() -> Path:
    return Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


class DataUnavailable(LmforgeError):
    """A benchmark's data is neither in the data root nor reachable on the hub. Carries the task,
    the reason and what gets the data, so a caller that goes on without the task (the speedrun)
    can say all three."""

    def __init__(self, task: str, reason: str, how: str):
        self.task, self.reason, self.how = task, reason, how
        super().__init__(f"{task}: data not available ({reason}); to get it: {how}")


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
    with open(path, encoding="utf-8") as f:
        return [row for _, row in json_lines(f, path)]


def _parse_each(rows, parse: Callable[[dict], object], where: Callable[[int], str]) -> list:
    """parse(row) for every row; a row without an expected field is one error line, where(n) + the
    reason (n counts from 1), not a KeyError."""
    out = []
    for n, row in enumerate(rows, 1):
        try:
            out.append(parse(row))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise LmforgeError(f"{where(n)} ({type(e).__name__}: {e})") from None
    return out


def _rows(path: Path, parse: Callable[[dict], object]) -> list:
    """parse(row) for every row of a JSON-lines file, errors naming the file and item."""
    return _parse_each(_read_jsonl(path), parse, lambda n: f"{path}: item {n} does not have the expected fields")


# ----------------------------------------------------------------------------- the hub


def _hub_offline_env() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


@functools.cache
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached from here, or None. `datasets` retries an unreachable hub for
    about 25 s per dataset on this project's offline machine (minutes where connections time out
    instead of failing), so one quick TCP connection decides first, once per process. Behind a
    proxy the check cannot tell, and datasets is left to try."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    t0 = time.perf_counter()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return (f"the Hugging Face hub ({host}) is not reachable from this machine ({e}; checked in "
                f"{time.perf_counter() - t0:.1f} s; with a filled HF cache, set HF_HUB_OFFLINE=1)")


def hub_rows(task: str, repo: str, config: str | None, split: str, mirror: str | Path | None = None) -> list[dict]:
    """The rows of one split of a hub dataset, as dicts with the hub's columns. With a mirror
    (argument or $LMFORGE_HUB_MIRROR) the dataset is read from MIRROR/repo, laid out as on the hub.
    Not being able to get the rows (offline, not in the cache or mirror, no `datasets`, a hub
    repo that no longer reads as expected) raises DataUnavailable; a mirror folder that does not
    read as a dataset is an LmforgeError."""
    spec = f"{repo}{' ' + config if config else ''} ({split})"
    how = f"go online for the Hugging Face hub ({spec})"
    mirror = mirror if mirror is not None else os.environ.get(HUB_MIRROR_ENV) or None
    try:
        import datasets
    except ImportError:
        raise DataUnavailable(task, "the `datasets` package is not installed",
                              f"pip install datasets, then {how}") from None
    if mirror is not None:
        target = Path(mirror) / repo
        if not target.is_dir():
            raise DataUnavailable(task, f"{target} is not there (hub mirror from {HUB_MIRROR_ENV})",
                                  f"put {repo} in the mirror, or unset {HUB_MIRROR_ENV} and {how}")
        target = str(target)
    else:
        target = repo
        if not _hub_offline_env():
            reason = hub_unreachable()
            if reason:
                raise DataUnavailable(task, reason, how)
    try:
        if mirror is None:
            try:
                ds = datasets.load_dataset(target, config, split=split)
            except RuntimeError as e:
                if "scripts are no longer supported" not in str(e):
                    raise
                # a repo still built by a loading script (datasets >= 4 runs none): the hub's
                # parquet export of it, which is what the script produced
                ds = datasets.load_dataset(target, config, split=split, revision="refs/convert/parquet")
        else:  # datasets caches a local folder's split under its name and file patterns, not its
            # content: a fresh cache per read keeps a changed mirror from being served stale
            import tempfile

            with tempfile.TemporaryDirectory(prefix="lmforge-hub-mirror-") as cache:
                return [dict(r) for r in datasets.load_dataset(target, config, split=split, cache_dir=cache)]
    except OSError as e:  # ConnectionError, not in the offline cache, no such repo: not here
        first = str(e).splitlines()[0][:200] if str(e) else ""
        why = "HF_HUB_OFFLINE is set and it is not in the HF cache: " if _hub_offline_env() else ""
        raise DataUnavailable(task, f"cannot load {spec}: {why}{type(e).__name__}: {first}", how) from None
    except Exception as e:  # the repo answered, but not as expected (no such config or split...)
        message = f"{spec} could not be read: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if mirror is not None:  # a folder on this machine: its layout is wrong, say so and stop
            raise LmforgeError(f"{task}: {message}") from None
        # the hub is a service that changes under us: a run goes on without the task, and says why
        raise DataUnavailable(task, f"the hub's {message}",
                              f"use the local file, or {how} once it reads again") from None
    return [dict(r) for r in ds]


def _from_hub_rows(task: str, spec: tuple[str, str | None, str], item: Callable[[dict], object],
                   mirror=None) -> list:
    return _parse_each(hub_rows(task, *spec, mirror=mirror), item,
                       lambda n: f"{task}: hub row {n - 1} of {spec[0]} does not have the expected columns")


# ----------------------------------------------------------------------------- item builders (lm-eval's formats)


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


def arc_item(question: str, choices: list[str], gold: int) -> MCItem:
    """lm-eval's ARC (and PIQA): "Question: {question}\\nAnswer:" then " " + the answer text."""
    ctx = f"Question: {question}\nAnswer:"
    return MCItem([ctx] * len(choices), [" " + c for c in choices], gold, list(choices))


def mmlu_item(question: str, choices: list[str], answer: int) -> MCItem:
    """lm-eval's default MMLU: question, the options lettered "A. ..", then "Answer:"; the choices
    are the letters, scored as " A" .. " D"."""
    letters = "ABCDEFGHIJ"[:len(choices)]
    ctx = question.strip() + "\n" + "".join(f"{k}. {c}\n" for k, c in zip(letters, choices)) + "Answer:"
    return MCItem([ctx] * len(choices), [" " + k for k in letters], int(answer), list(letters))


def query_item(query: str, choices: list[str], gold: int) -> MCItem:
    """A shared context and " " + each choice (lm-eval's default target delimiter): OpenBookQA's
    question_stem, BoolQ, and MosaicML's {query, choices, gold} files."""
    return MCItem([query] * len(choices), [" " + c for c in choices], int(gold), list(choices))


def copa_item(context: str, choices: list[str], gold: int) -> MCItem:
    """lm-eval's COPA: context = premise without its final period + " because" / " therefore";
    each choice with its first letter lowercased. lm-eval's doc_to_choice already starts each
    choice with a space and its target delimiter adds another, so the scored continuation is
    two spaces + the choice (kept, so the numbers compare); acc_norm's length is that of
    " " + choice, as in lm-eval."""
    texts = [" " + c[0].lower() + c[1:] for c in choices]
    return MCItem([context] * len(texts), [" " + t for t in texts], int(gold), texts)


def copa_hub_item(d: dict) -> MCItem:
    connector = {"cause": "because", "effect": "therefore"}[d["question"]]
    return copa_item(d["premise"].strip()[:-1] + " " + connector, [d["choice1"], d["choice2"]], int(d["label"]))


def winogrande_item(sentence: str, option1: str, option2: str, answer: str) -> MCItem:
    """lm-eval's WinoGrande (partial scoring): one context per option, sentence up to the blank
    with the option filled in; the rest of the sentence after the blank is the shared
    continuation, whose log-likelihood is compared; acc_norm's lengths are the contexts'."""
    blank = sentence.index("_")
    contexts = [sentence[:blank] + o for o in (option1, option2)]
    rest = " " + sentence[blank + 1:].strip()
    return MCItem(contexts, [rest, rest], {"1": 0, "2": 1}[str(answer)], list(contexts))


def boolq_item(passage: str, question: str, label: int) -> MCItem:
    """lm-eval's BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:" then " no" / " yes"."""
    return query_item(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], int(label))


def siqa_item(context: str, question: str, answers: list[str], label: str) -> MCItem:
    """lm-eval's Social IQa: "Q: {context} {question}\\nA:" then " " + each of the three answers;
    the hub's label is "1".."3"."""
    return query_item(f"Q: {context} {question}\nA:", answers, int(label) - 1)


def commonsense_qa_item(question: str, choices: list[str], answer_key: str) -> MCItem:
    """lm-eval's CommonsenseQA: "Question: {question}\\nA. ..\\n..E. ..\\nAnswer:", the choices
    are the letters " A" .. " E"."""
    letters = "ABCDE"[:len(choices)]
    ctx = f"Question: {question.strip()}\n" + "".join(f"{k}. {c}\n" for k, c in zip(letters, choices)) + "Answer:"
    return MCItem([ctx] * len(choices), [" " + k for k in letters], letters.index(answer_key), list(letters))


def foundry_item(r: dict) -> MCItem:
    """MosaicML's ICL formats: {query, choices, gold} is scored as query + " " + choice;
    {context_options, continuation, gold} (WinoGrande) as option + " " + continuation, with the
    continuation's log-likelihood compared across options (lm-eval's partial scoring)."""
    if "context_options" in r:
        opts = r["context_options"]
        return MCItem(list(opts), [" " + r["continuation"]] * len(opts), int(r["gold"]), list(opts))
    return query_item(r["query"].rstrip(), r["choices"], r["gold"])


# ----------------------------------------------------------------------------- local files


def _hellaswag_local(path: Path) -> list[MCItem]:
    """klosax's text file: six lines per item (activity label + ": " + context / gold index / four
    endings), already cleaned of WikiHow markup."""
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise LmforgeError(f"{path}: expected 6 lines per item, got {len(lines)} lines")
    items = []
    for i in range(0, len(lines), 6):
        ctx = _capitalize_last_fragment(hellaswag_preprocess(lines[i]))
        choices = [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]]
        try:
            gold = int(lines[i + 1])
        except ValueError:
            raise LmforgeError(f"{path}:{i + 2}: expected the gold index, got {lines[i + 1][:40]!r}") from None
        items.append(MCItem([ctx] * 4, [" " + c for c in choices], gold, choices))
    return items


def _question_local(r: dict) -> MCItem:
    """MosaicML's ARC / PIQA rows: query "Question: ...", rendered as lm-eval's ARC."""
    return arc_item(r["query"].removeprefix("Question:").strip(), r["choices"], int(r["gold"]))


def _copa_local(r: dict) -> MCItem:
    """MosaicML's COPA writes "premise, therefore": lm-eval has no comma."""
    return copa_item(re.sub(r", (because|therefore)$", r" \1", r["query"]), r["choices"], r["gold"])


def _boolq_local(r: dict) -> MCItem:
    """MosaicML's BoolQ query is "Passage: {passage}\\nQuestion: {question}?"."""
    passage, question = r["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
    return boolq_item(passage, question.removesuffix("?"), ["no", "yes"].index(r["choices"][r["gold"]]))


def _jsonl(parse: Callable[[dict], MCItem]) -> Callable[[Path], list[MCItem]]:
    return lambda path: _rows(path, parse)


@dataclass(frozen=True)
class MCTask:
    """One multiple-choice benchmark: its local file (relative to the data root) and how a row of
    it becomes an item; the hub dataset lm-eval reads (repo, config, split) and how a hub row
    becomes an item. `same_items` says whether the two sources hold the same items in the same
    rendering (True where the local file keeps everything lm-eval's format needs)."""

    description: str
    local_file: str
    read_local: Callable[[Path], list[MCItem]]
    hub: tuple[str, str | None, str]
    hub_item: Callable[[dict], MCItem]
    same_items: bool = True


FOUNDRY = "eval/llm-foundry"
MC_TASKS: dict[str, MCTask] = {
    "hellaswag": MCTask(
        "HellaSwag validation, 4 endings", "hellaswag/hellaswag_val_full.txt.bz2", _hellaswag_local,
        ("Rowan/hellaswag", None, "validation"),
        lambda d: hellaswag_item(d["activity_label"], d["ctx_a"], d["ctx_b"], d["endings"], int(d["label"]))),
    "arc_easy": MCTask(
        "ARC-Easy test", f"{FOUNDRY}/arc_easy.jsonl", _jsonl(_question_local), ("allenai/ai2_arc", "ARC-Easy", "test"),
        lambda d: arc_item(d["question"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))),
    "arc_challenge": MCTask(
        "ARC-Challenge test", f"{FOUNDRY}/arc_challenge.jsonl", _jsonl(_question_local),
        ("allenai/ai2_arc", "ARC-Challenge", "test"),
        lambda d: arc_item(d["question"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))),
    "mmlu": MCTask(
        "MMLU test (local: 18 STEM subjects, 3018 questions; hub: all 57, 14042)",
        "eval/qwen-math/mmlu_stem/test.jsonl", _jsonl(lambda r: mmlu_item(r["question"], r["choices"], r["answer"])),
        ("cais/mmlu", "all", "test"), lambda d: mmlu_item(d["question"], d["choices"], d["answer"])),
    "piqa": MCTask(
        "PIQA validation", f"{FOUNDRY}/piqa.jsonl", _jsonl(_question_local), ("baber/piqa", None, "validation"),
        lambda d: arc_item(d["goal"], [d["sol1"], d["sol2"]], int(d["label"]))),
    "openbookqa": MCTask(
        "OpenBookQA test", f"{FOUNDRY}/openbook_qa.jsonl", _jsonl(foundry_item), ("allenai/openbookqa", "main", "test"),
        lambda d: query_item(d["question_stem"], d["choices"]["text"],
                             d["choices"]["label"].index(d["answerKey"].lstrip()))),
    "copa": MCTask(
        "COPA validation", f"{FOUNDRY}/copa.jsonl", _jsonl(_copa_local), ("aps/super_glue", "copa", "validation"),
        copa_hub_item),
    "winogrande": MCTask(
        "WinoGrande validation (partial scoring)", f"{FOUNDRY}/winogrande.jsonl", _jsonl(foundry_item),
        ("allenai/winogrande", "winogrande_xl", "validation"),
        lambda d: winogrande_item(d["sentence"], d["option1"], d["option2"], d["answer"])),
    "siqa": MCTask(
        "Social IQa validation (local: MosaicML's 2 lettered choices; hub: lm-eval's 3 answers)",
        f"{FOUNDRY}/siqa.jsonl", _jsonl(foundry_item), ("lighteval/siqa", None, "validation"),
        lambda d: siqa_item(d["context"], d["question"], [d["answerA"], d["answerB"], d["answerC"]], d["label"]),
        same_items=False),
    "commonsense_qa": MCTask(
        "CommonsenseQA validation (local: MosaicML's 4 lettered choices; hub: lm-eval's 5)",
        f"{FOUNDRY}/commonsense_qa.jsonl", _jsonl(foundry_item), ("tau/commonsense_qa", None, "validation"),
        lambda d: commonsense_qa_item(d["question"], d["choices"]["text"], d["answerKey"]), same_items=False),
    "boolq": MCTask(
        "BoolQ validation (no/yes)", f"{FOUNDRY}/boolq.jsonl", _jsonl(_boolq_local),
        ("aps/super_glue", "boolq", "validation"), lambda d: boolq_item(d["passage"], d["question"], d["label"])),
}


def how_to_get(task: str) -> str:
    """The settings that get a task's data, for messages and the report card."""
    if task == "gsm8k":
        local, (repo, config, _) = "gsm8k/test.jsonl", GSM8K_HUB
    else:
        local, (repo, config, _) = MC_TASKS[task].local_file, MC_TASKS[task].hub
    return (f"set LMFORGE_SHARED_DATA / --data-root to a folder with {local}, or go online for the "
            f"Hugging Face hub ({repo}{' ' + config if config else ''})")


def now_available(names) -> list[str]:
    """Those of these multiple-choice tasks whose data can be loaded now (e.g. the ones a finished
    speedrun could not run: if one has data since, its eval stage is worth running again)."""
    found = []
    for name in names:
        try:
            load_mc_task(name)
            found.append(name)
        except DataUnavailable:
            pass
    return found


def load_mc_task(name: str, root: str | Path | None = None, source: str = "auto", *,
                 hub_mirror: str | Path | None = None) -> list[MCItem]:
    """Items of a multiple-choice task. source: "local", "hub", or "auto" (the local file if it is
    there, else the hub). Raises DataUnavailable when the chosen source(s) do not have the data."""
    if name not in MC_TASKS:
        raise LmforgeError(f"unknown multiple-choice task {name!r}; known: {', '.join(MC_TASKS)}")
    if source not in ("local", "hub", "auto"):
        raise LmforgeError(f"data source must be local, hub or auto, got {source!r}")
    task = MC_TASKS[name]
    path = (Path(root) if root is not None else default_data_root()) / task.local_file
    if source != "hub" and path.is_file():
        return task.read_local(path)
    if source == "local":
        raise DataUnavailable(name, f"{path} not found", how_to_get(name))
    try:
        return _from_hub_rows(name, task.hub, task.hub_item, hub_mirror)
    except DataUnavailable as e:
        if source == "auto":  # say that both places were looked at
            raise DataUnavailable(name, f"{path} not found, and {e.reason}", how_to_get(name)) from None
        raise


# ----------------------------------------------------------------------------- GSM8K


@dataclass
class GSM8KItem:
    question: str
    solution: str  # worked solution ending in "#### answer"

    def __post_init__(self):
        if not isinstance(self.question, str) or not isinstance(self.solution, str) or "####" not in self.solution:
            raise ValueError("expected a question and a worked solution with the answer after '####'")

    @property
    def answer(self) -> str:
        """The reference number, canonical (see lmforge.answers): "1,000" -> "1000"."""
        from lmforge.answers import extract_number

        return extract_number(self.solution) or self.solution.split("####")[-1].strip()


def read_gsm8k_file(path: str | Path) -> list[GSM8KItem]:
    """A GSM8K-style JSON-lines file ({"question", "answer"}, the final answer after "####"): the
    one reader for evaluation (`lmforge eval --tasks gsm8k`) and RL prompts (`--task gsm8k:PATH`)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"GSM8K file not found: {path}")
    items = _rows(path, lambda d: GSM8KItem(d["question"], d["answer"]))
    if not items:
        raise LmforgeError(f"{path}: no problems")
    return items


GSM8K_HUB = ("openai/gsm8k", "main", "test")


def load_gsm8k(root: str | Path | None = None, source: str = "auto", split: str = "test", *,
               hub_mirror: str | Path | None = None) -> list[GSM8KItem]:
    """GSM8K (test 1319, train 7473). Local: gsm8k/{split}.jsonl (OpenAI's files); the hub:
    openai/gsm8k "main" (same columns: question, answer)."""
    if source not in ("local", "hub", "auto"):
        raise LmforgeError(f"data source must be local, hub or auto, got {source!r}")
    path = (Path(root) if root is not None else default_data_root()) / "gsm8k" / f"{split}.jsonl"

    def item(d):
        return GSM8KItem(d["question"], d["answer"])

    if source != "hub" and path.is_file():
        return read_gsm8k_file(path)
    if source == "local":
        raise DataUnavailable("gsm8k", f"{path} not found", how_to_get("gsm8k"))
    try:
        return _from_hub_rows("gsm8k", (GSM8K_HUB[0], GSM8K_HUB[1], split), item, hub_mirror)
    except DataUnavailable as e:
        if source == "auto":
            raise DataUnavailable("gsm8k", f"{path} not found, and {e.reason}", how_to_get("gsm8k")) from None
        raise


def iter_limit(items: list, limit: int | None) -> list:
    """The first `limit` items (all when None): --limit evaluates a deterministic prefix."""
    if limit is not None and limit <= 0:
        raise LmforgeError(f"limit must be positive, got {limit}")
    return items if limit is None else items[:limit]
