"""Retrieval-augmented generation: how retrieved passages enter a conversation, how a reply cites
them, the SQuAD "answer from the passages" fine-tuning data, and the SQuAD answer metrics.

The prompt format. For each user turn the system retrieves k passages for the user's text and shows
them to the model as the result of a tool it ran. With lmforge's own chat template (lmforge/chat.py)
they are a `tool` message right after the user's message, so the rendering is

    <|user_start|>Who won Super Bowl 50?<|user_end|><|tool_result_start|>[1] (nfl.md) The Denver
    Broncos defeated the Carolina Panthers 24-10 ...

    [2] (nfl.md) ...<|tool_result_end|><|assistant_start|>

Each passage is `[n] (source) text`, numbered from 1 in rank order, separated by a blank line (a
passage's own blank lines are closed up, so a blank line followed by `[n]` always starts a passage).
The turn markers are special-token ids, never text, so a passage that contains
"<|assistant_end|>" cannot end a turn or open one. A search that finds nothing shows `(no passages)`.

An imported model's tokenizer (a HubTokenizer, which has `chat_ids`) renders with the model's own
Jinja template, and many of those reject a tool message that answers no tool call; there the
passages go into the user's message as plain text (`INLINE_FORM`): an instruction, the numbered
passages, then `Question: <the user's text>`. Such templates turn special-token *text* into special
tokens, so the passages' copies of the tokenizer's markup-like added tokens (`<|im_end|>`) are
broken up with a zero-width space.

The reply cites passages by number, `[1]` or `[1, 3]`; `cited_numbers` reads them back and the
front ends map them to the passages' sources. A reply whose passages do not hold the answer is
`REFUSAL`. Passages retrieved for earlier turns stay in the history as the model saw them.

`fit_rag_turn` keeps the prompt inside the context window: it drops the oldest earlier turns, then
the lowest-ranked passages, then shortens the last passage left (its text ends with "…"), and never
drops the user's question.

Training data (`squad_rag_conversations`): each SQuAD question with k paragraphs (the gold one at a
random position among BM25 neighbours or random paragraphs of the same split), answered with the
first reference answer and the gold passage's number, `"Denver Broncos [2]"`; a share of the
questions (20% by default) is shown k distractors only and answered with REFUSAL. The rendering is
`rag_turn`, the same function the chat and the server use. The data comes from the `train` articles
of lmforge.retrieval.datasets.squad_split (the even-numbered ones, which the retrievers train on
too); evaluation asks the `heldout` ones (odd-numbered), never trained on by reader or retriever.

Metrics: SQuAD's exact match and F1 (the official v1.1 script's normalisation: lower case, strip
punctuation, drop the articles a/an/the, collapse white space; the best over the reference answers),
on the reply with its citation markers removed; `evaluate_answers` scores a model with no passages,
retrieved ones and the gold paragraph (`lmforge rag-eval`).

This file is long because it holds the one RAG contract end to end — the prompt format, its window
fitting, citations, and the SQuAD data and metrics that train and score the same format — so the
front ends (chat, serve, rag-eval, rag-sft-data) share one definition.
"""
from __future__ import annotations

import dataclasses
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.chat import render_messages
from lmforge.common import LmforgeError

REFUSAL = "The passages do not contain the answer."
NO_PASSAGES = "(no passages)"
INLINE_FORM = ("Answer the question from these passages and cite them by number, like [1]. If they do not "
               f'contain the answer, say "{REFUSAL}"\n\n{{passages}}\n\nQuestion: {{question}}')
TRUNCATED = "…"
ZERO_WIDTH_SPACE = "\u200b"
PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class Snippet:
    """A passage that does not come from a RagIndex (a SQuAD paragraph in the training data and the
    evaluation): the fields of `lmforge.retrieval.index.Passage`, which RAG reads by name."""

    text: str
    source: str
    doc_id: str = ""
    title: str = ""
    start: int = 0
    end: int = 0
    chunk: int = 0
    score: float = 0.0

    def cite(self) -> str:
        """"source:start-end" (as Passage.cite)."""
        where = self.source if self.doc_id in ("", self.source) else f"{self.source}#{self.doc_id}"
        return f"{where}:{self.start}-{self.end}"


def load_index(path, backend: str = "auto"):
    """The retrieval index at path (lmforge.retrieval.index.RagIndex); anything with
    `search(query, k) -> [Passage]` can stand in for it."""
    from lmforge.retrieval.index import RagIndex

    return RagIndex.load(path, backend=backend)


# ----------------------------------------------------------------------------- the prompt format


def passage_style(tokenizer) -> str:
    """"tool" for lmforge's chat template, "inline" for an imported model's own template."""
    return "inline" if hasattr(tokenizer, "chat_ids") else "tool"


def clean_text(text: str) -> str:
    """A passage's text on lines without blank ones between them (a blank line separates passages)."""
    return re.sub(r"\n\s*\n", "\n", text.strip())


def format_passages(passages) -> str:
    """`[1] (source) text`, blank line, `[2] ...`; NO_PASSAGES for none."""
    if not passages:
        return NO_PASSAGES
    return "\n\n".join(f"[{i}] ({p.source}) {clean_text(p.text)}" for i, p in enumerate(passages, 1))


def rag_turn(question: str, passages, style: str = "tool") -> list[dict]:
    """The messages of one user turn with its passages (see the module docstring)."""
    if style == "tool":
        return [{"role": "user", "content": question}, {"role": "tool", "content": format_passages(passages)}]
    if style == "inline":
        return [{"role": "user", "content": INLINE_FORM.format(passages=format_passages(passages), question=question)}]
    raise LmforgeError(f"passage style must be 'tool' or 'inline', got {style!r}")


def added_token_texts(tokenizer) -> list[str]:
    """The markup-like added tokens an imported tokenizer's chat rendering matches in text
    (`<|im_end|>`, `<tool_call>`: two or more characters, no white space; none for lmforge's)."""
    return sorted(t for t in getattr(tokenizer, "_added", {}).values()
                  if len(t) > 1 and not any(c.isspace() for c in t))


def defang(passages, tokens: list[str]):
    """The passages with each occurrence of a token text broken by a zero-width space, so a chat
    template that matches special tokens in text reads them as words."""
    if not tokens:
        return list(passages)
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    def broken(m):
        return m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:]

    return [dataclasses.replace(p, text=pattern.sub(broken, p.text)) for p in passages]


def _drop_oldest_turn(messages: list[dict]) -> list[dict]:
    """The messages without their first turn (up to the next user message)."""
    rest = messages[1:]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    return rest


def _shortened(passage, fits):
    """The passage with the longest prefix of its text that `fits`, or None when even none does."""
    text = passage.text
    lo, hi = 0, len(text)
    cut = lambda n: dataclasses.replace(passage, text=text[:n].rstrip() + TRUNCATED)  # noqa: E731
    if not fits(cut(0)):
        return None
    while lo < hi:  # the largest n with fits(cut(n))
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(cut(mid)) else (lo, mid - 1)
    return cut(lo)


def fit_rag_turn(tokenizer, before: list[dict], question: str, passages, budget: int | None, *,
                 after: list[dict] = (), drop_history: bool = True, tools=None) -> tuple[list[dict], list]:
    """(messages, passages shown): `before` + the user's turn with its passages + `after`, rendered
    within `budget` tokens (None: no limit). To fit, the oldest turns of `before` go first (never a
    leading system message; not at all without drop_history), then the lowest-ranked passages, then
    the end of the last passage left; the question always stays. If the question alone is too long,
    the result is over budget (the caller reports it)."""
    style = passage_style(tokenizer)
    if style == "inline":
        passages = defang(passages, added_token_texts(tokenizer))
    system = list(before[:1]) if before and before[0]["role"] == "system" else []
    rest, shown = list(before[len(system):]), list(passages)

    def build(rest, shown):
        return system + rest + rag_turn(question, shown, style) + list(after)

    def fits(rest, shown):
        return budget is None or len(render_messages(tokenizer, build(rest, shown), tools=tools)) <= budget

    while drop_history and rest and not fits(rest, shown):
        rest = _drop_oldest_turn(rest)
    while len(shown) > 1 and not fits(rest, shown):
        shown.pop()
    if shown and not fits(rest, shown):
        last = _shortened(shown[-1], lambda p: fits(rest, shown[:-1] + [p]))
        shown = shown[:-1] + [last] if last is not None else []
    return build(rest, shown), shown


# ----------------------------------------------------------------------------- citations

CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def cited_numbers(reply: str, n_passages: int | None = None) -> list[int]:
    """The passage numbers a reply cites (`[2]`, `[1, 3]`), each once, in order of first citation;
    numbers outside 1..n_passages are left out when n_passages is given."""
    out = []
    for m in CITATION.finditer(reply):
        for part in m.group(1).split(","):
            n = int(part)
            if n not in out and (n_passages is None or 1 <= n <= n_passages):
                out.append(n)
    return out


def strip_citations(reply: str) -> str:
    """The reply without its citation markers (what the answer metrics score)."""
    return re.sub(r"\s+", " ", CITATION.sub("", reply)).strip()


def passage_record(number: int, p) -> dict:
    """A passage as the server reports it (its number in the prompt, where it comes from, its text)."""
    return {"index": number, "source": p.source, "doc_id": p.doc_id, "title": p.title, "start": p.start,
            "end": p.end, "score": float(p.score), "text": p.text}


def source_line(number: int, p, cited: bool) -> str:
    """`*[1] path:start-end  title`: a passage's source for the terminal (* = cited by the reply)."""
    title = f"  {p.title}" if p.title else ""
    return f"{'*' if cited else ' '}[{number}] {p.cite()}{title}"


def format_sources(passages, reply: str) -> str:
    """The numbered sources shown after a reply: every passage the model saw, the cited ones marked."""
    if not passages:
        return "Sources: none retrieved"
    cited = set(cited_numbers(reply, len(passages)))
    head = "Sources (* = cited):" if cited else "Sources (retrieved; the reply cites none):"
    return "\n".join([head] + [source_line(i, p, i in cited) for i, p in enumerate(passages, 1)])


# ----------------------------------------------------------------------------- SQuAD answer metrics


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, references: list[str]) -> float:
    """Token-overlap F1 of the normalised texts, the best over the reference answers."""
    return max((_f1(prediction, r) for r in references), default=0.0)


# ----------------------------------------------------------------------------- SQuAD questions and the split


@dataclass(frozen=True)
class SquadQuestion:
    qid: str
    question: str
    answers: tuple[str, ...]
    gold: Snippet  # the paragraph it was asked about


def squad_answers(path) -> dict[str, list[str]]:
    """question id -> its reference answers, from SQuAD v1.1 JSON (.json or .json.gz)."""
    import json

    from lmforge.retrieval.datasets import _open_text

    try:
        with _open_text(Path(path)) as f:
            data = json.load(f)
        return {str(qa["id"]): [a["text"] for a in qa["answers"]]
                for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]}
    except (KeyError, TypeError) as e:
        raise LmforgeError(f"{path}: not SQuAD v1.1 JSON (a question without {e})") from None
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def paragraph_snippet(doc_id: str, doc) -> Snippet:
    """A SQuAD paragraph (a retrieval Document) as a passage whose source is its article's title."""
    title = doc.metadata.get("title", "")
    return Snippet(text=doc.text, source=title or doc_id, doc_id=doc_id, title=title, end=len(doc.text))


def load_squad_questions(path, split: str = "heldout"):
    """(questions of the split, every paragraph of the file as a Snippet by doc id). The split is by
    article, the one the retrievers train on (lmforge.retrieval.datasets.squad_split): "train" (the
    even-numbered articles), "heldout" (the odd-numbered ones) or "all"."""
    from lmforge.retrieval.datasets import load_squad, squad_split

    if split not in ("train", "heldout", "all"):
        raise LmforgeError(f"split must be train, heldout or all, got {split!r}")
    full = load_squad(path)
    chosen = squad_split(full, split)
    answers = squad_answers(path)
    paragraphs = {d: paragraph_snippet(d, doc) for d, doc in full.corpus.items()}
    questions = [SquadQuestion(qid, text, tuple(answers.get(qid, ())), paragraphs[next(iter(chosen.qrels[qid]))])
                 for qid, text in chosen.queries.items()]
    if not questions:
        raise LmforgeError(f"{path}: no questions in the {split} split")
    return questions, paragraphs


class SquadBM25:
    """BM25 (lmforge.retrieval.bm25) over SQuAD paragraphs with the index's search interface:
    search(query, k) -> [Snippet] with their scores, best first."""

    def __init__(self, paragraphs: dict[str, Snippet]):
        from lmforge.retrieval.bm25 import BM25Retriever

        self.paragraphs = paragraphs
        self.bm25 = BM25Retriever()
        self.bm25.index(list(paragraphs), [p.text for p in paragraphs.values()])

    def search_many(self, queries: list[str], k: int) -> list[list[Snippet]]:
        return [[dataclasses.replace(self.paragraphs[d], score=s) for d, s in hits]
                for hits in self.bm25.search(queries, k)]

    def search(self, query: str, k: int = 5) -> list[Snippet]:
        return self.search_many([query], k)[0]


# ----------------------------------------------------------------------------- SFT data


def _holds_answer(p: Snippet, q: SquadQuestion) -> bool:
    text = f" {normalize_answer(p.text)} "
    return any(f" {a} " in text for a in map(normalize_answer, q.answers) if a)


def _distractors(q: SquadQuestion, neighbours: list[Snippet], pool: list[Snippet], n: int,
                 rng: random.Random) -> list[Snippet]:
    """n paragraphs other than q's gold one that do not hold its answer (so a refusal is right and a
    citation unambiguous): its retrieval neighbours first, then random ones."""
    out, taken = [], {q.gold.doc_id}
    for p in neighbours + rng.sample(pool, min(len(pool), 4 * n + 8)):
        if len(out) == n:
            break
        if p.doc_id not in taken and not _holds_answer(p, q):
            out.append(p)
            taken.add(p.doc_id)
    return out


def squad_rag_conversations(path, *, split: str = "train", k: int = 4, refusal_share: float = 0.2,
                            distractors: str = "bm25", style: str = "tool", seed: int = 0,
                            max_examples: int | None = None, fit=None) -> list[list[dict]]:
    """Conversations teaching "answer from the passages, cite them, say when they do not contain the
    answer" (see the module docstring), deterministic by seed. Distractors come from the split's own
    paragraphs ("bm25": the question's BM25 neighbours, "random": random paragraphs).

    fit = (tokenizer, window): each conversation is fitted to the window as at inference
    (fit_rag_turn, room kept for the answer): without it, fine-tuning cuts a long one at its end,
    where the answer is. An answered question whose cited passage would lose the answer is left out."""
    if k < 1 or not 0 <= refusal_share <= 1:
        raise LmforgeError(f"need k >= 1 and 0 <= refusal share <= 1 (got k={k}, {refusal_share})")
    if distractors not in ("bm25", "random"):
        raise LmforgeError(f"distractors must be bm25 or random, got {distractors!r}")
    questions = [q for q in load_squad_questions(path, split)[0] if q.answers]
    rng = random.Random(f"rag-sft-{seed}")
    pool = sorted({q.gold.doc_id: q.gold for q in questions}.values(), key=lambda p: p.doc_id)  # the split's
    rng.shuffle(questions)
    questions = questions[:max_examples] if max_examples else questions
    if distractors == "bm25":
        neighbours = SquadBM25({p.doc_id: p for p in pool}).search_many([q.question for q in questions], k + 8)
    else:
        neighbours = [[] for _ in questions]
    out = []
    for q, near in zip(questions, neighbours):
        refuse = rng.random() < refusal_share
        shown = _distractors(q, near, pool, k if refuse else k - 1, rng)
        if refuse:
            answer = REFUSAL
        else:
            at = rng.randrange(len(shown) + 1)
            shown.insert(at, q.gold)
            answer = f"{q.answers[0]} [{at + 1}]"
        if fit is None:
            out.append(rag_turn(q.question, shown, style) + [{"role": "assistant", "content": answer}])
            continue
        tokenizer, window = fit
        budget = window - len(tokenizer.encode(answer)) - 1  # the answer and its end of turn
        messages, kept = fit_rag_turn(tokenizer, [], q.question, shown, budget)
        if refuse or (len(kept) > at and _holds_answer(kept[at], q)):
            out.append(messages + [{"role": "assistant", "content": answer}])
    return out


# ----------------------------------------------------------------------------- answer evaluation

MODES = ("none", "retrieval", "gold")


def sample_questions(questions: list[SquadQuestion], n: int | None) -> list[SquadQuestion]:
    """n questions chosen by a hash of their ids (lmforge.retrieval.datasets.subsample's rule: the
    same on every run, a smaller sample part of a larger one); all when n is None."""
    from lmforge.retrieval.datasets import _hash_key

    return questions if n is None else sorted(questions, key=lambda q: _hash_key(q.qid))[:n]


def is_gold(passage, q: SquadQuestion) -> bool:
    """Whether a retrieved passage is (a chunk of) the question's paragraph: the same doc id, or its
    text, white space aside, inside the paragraph's."""
    text = " ".join(passage.text.split())
    return passage.doc_id == q.gold.doc_id or (len(text) > 0 and text in " ".join(q.gold.text.split()))


def mode_messages(tokenizer, q: SquadQuestion, mode: str, retrieved, budget: int | None) -> list[dict]:
    """The conversation that asks q in a mode: the bare question ("none"), with the retrieved
    passages ("retrieval"), or with its gold paragraph alone ("gold", the ceiling)."""
    if mode == "none":
        return [{"role": "user", "content": q.question}]
    return fit_rag_turn(tokenizer, [], q.question, retrieved if mode == "retrieval" else [q.gold], budget)[0]


def score_replies(questions: list[SquadQuestion], replies: list[str]) -> dict:
    """Mean exact match and F1 (x100, SQuAD's convention) of the replies without their citations,
    and the share of replies that refuse."""
    n = max(len(questions), 1)
    answers = [strip_citations(r) for r in replies]
    return {"questions": len(questions),
            "exact_match": 100 * sum(exact_match(a, q.answers) for a, q in zip(answers, questions)) / n,
            "f1": 100 * sum(f1_score(a, q.answers) for a, q in zip(answers, questions)) / n,
            "refused": sum(normalize_answer(REFUSAL) in normalize_answer(r) for r in replies) / n}


def evaluate_answers(model, tokenizer, questions: list[SquadQuestion], *, modes=MODES, retriever=None, k: int = 5,
                     max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False,
                     examples: int = 3) -> dict:
    """Greedy answers to the questions in each mode (see mode_messages), scored by score_replies;
    mode "retrieval" also reports the share of questions whose paragraph was among the k retrieved
    (gold_recall). A prompt that does not fit the window gets an empty answer (counted: too_long)."""
    from tqdm import tqdm

    from lmforge.inference.engine import Engine

    if "retrieval" in modes and retriever is None:
        raise LmforgeError("mode 'retrieval' needs a retriever (an index)")
    engine = Engine(model, tokenizer)
    window = model.context_limit
    budget = None if window is None else window - max_new_tokens
    retrieved = [[]] * len(questions)
    if "retrieval" in modes:
        many = getattr(retriever, "search_many", None)  # one batch (a dense index embeds the queries together)
        queries = [q.question for q in questions]
        retrieved = many(queries, k) if many else [retriever.search(t, k) for t in queries]
    out = {}
    for mode in modes:
        prompts = [render_messages(tokenizer, mode_messages(tokenizer, q, mode, r, budget))
                   for q, r in zip(questions, retrieved)]
        fits = [i for i, p in enumerate(prompts) if window is None or len(p) < window]
        replies = [""] * len(prompts)
        for start in tqdm(range(0, len(fits), batch_size), desc=f"rag-eval {mode}", unit="batch", disable=not progress):
            rows = fits[start:start + batch_size]
            for i, c in zip(rows, engine.generate([prompts[i] for i in rows], max_new_tokens, temperature=0.0)):
                replies[i] = c.text
        out[mode] = {**score_replies(questions, replies), "too_long": len(prompts) - len(fits)}
        if mode == "retrieval":
            out[mode]["gold_recall"] = sum(any(is_gold(p, q) for p in r)
                                           for q, r in zip(questions, retrieved)) / max(len(questions), 1)
        out[mode]["examples"] = [{"question": q.question, "answers": list(q.answers), "reply": r}
                                 for q, r in zip(questions[:examples], replies)]
    return out


def results_table(results: dict) -> str:
    """A markdown table of evaluate_answers' results, one row per mode."""
    rows = ["| mode | questions | EM | F1 | refused | gold paragraph retrieved |", "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        recall = f"{100 * r['gold_recall']:.1f}%" if "gold_recall" in r else "–"
        rows.append(f"| {mode} | {r['questions']} | {r['exact_match']:.1f} | {r['f1']:.1f} | "
                    f"{100 * r['refused']:.1f}% | {recall} |")
    return "\n".join(rows)
