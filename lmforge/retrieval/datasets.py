"""Retrieval test collections: a corpus of documents, queries, and relevance judgements (qrels).

Two formats are read, gzip or not, straight from the files (no unpacking step):

* **SQuAD v1.1** (`dev-v1.1.json[.gz]`, the official JSON): every paragraph of every article is a
  document, every question a query, and the one relevant document of a question is the paragraph it
  was asked about (relevance 1). On the dev set that is 2,067 documents and 10,570 queries. A
  document's id is `ARTICLE-PARAGRAPH` (0-based indices in file order, e.g. `0-3`); its text is the
  paragraph alone, and its metadata the article title and both indices.
* **BEIR layout** (a folder): `corpus.jsonl[.gz]` (`{"_id", "title", "text", ...}` per line),
  `queries.jsonl[.gz]` (`{"_id", "text"}`), `qrels/<split>.tsv` (header line, then
  `query-id<TAB>corpus-id<TAB>score`). Only the queries judged in the split are kept (SciFact test:
  300 of its 1,109 claims). A document's text for retrieval is `title + " " + text` (BEIR's own
  dense-retrieval convention; the title alone when the text is empty, and so on).

SQuAD has one split here (dev), so questions are split by article for training and testing retrievers
and readers: split `train` keeps the questions of the even-numbered articles (0, 2, 4, ...; 24 of 48)
and only those articles' paragraphs as the corpus (hard negatives are never mined from held-out
articles); `heldout` keeps the questions of the odd-numbered articles with the whole corpus (every
paragraph is a candidate, as for `test`/`all`, which keep every question).

`subsample(dataset, n)` keeps n queries chosen by a hash of their ids: the same n queries on every
machine and every run, and a smaller sample is always part of a larger one.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common import LmforgeError


@dataclass
class Document:
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)

    def full_text(self) -> str:
        """What a retriever reads: the title and the text, separated by a space (either may be empty)."""
        return f"{self.title} {self.text}".strip()


@dataclass
class RetrievalDataset:
    name: str
    corpus: dict[str, Document]  # doc_id -> document, in file order
    queries: dict[str, str]  # query_id -> text, in file order
    qrels: dict[str, dict[str, int]]  # query_id -> {doc_id: relevance}

    def summary(self) -> str:
        judgements = sum(len(v) for v in self.qrels.values())
        return (f"{self.name}: {len(self.corpus)} documents, {len(self.queries)} queries, "
                f"{judgements} judgements")


def _open_text(path: Path):
    """A text stream of path, gunzipping when the file starts with gzip's magic bytes."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise LmforgeError(f"{folder} has no {name} (or {name}.gz): not a BEIR-layout folder")


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or any(k not in row for k in required):
                    raise LmforgeError(f"{path}:{n}: expected an object with fields {', '.join(required)}")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """A BEIR qrels TSV: an optional header line, then query-id, corpus-id, score per line."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        with _open_text(path) as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if not row or not "".join(row).strip():
                    continue
                if n == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                    continue  # header
                if len(row) < 3:
                    raise LmforgeError(f"{path}:{n}: expected query-id<TAB>corpus-id<TAB>score")
                try:
                    score = int(float(row[2]))
                except ValueError:
                    raise LmforgeError(f"{path}:{n}: relevance {row[2]!r} is not a number") from None
                qrels.setdefault(row[0].strip(), {})[row[1].strip()] = score
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    return qrels


def load_beir(folder: str | Path, split: str = "test", name: str | None = None) -> RetrievalDataset:
    """A BEIR-layout folder (see the module docstring); queries restricted to those judged in `split`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"{folder}: no such folder (expected a BEIR-layout folder with corpus.jsonl, "
                           "queries.jsonl, qrels/)")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise LmforgeError(f"{folder} has no qrels/{split}.tsv (the judgements of split {split!r})")
    corpus = {}
    for row in _read_jsonl(_find(folder, "corpus.jsonl"), ("_id", "text")):
        corpus[str(row["_id"])] = Document(text=str(row.get("text") or ""), title=str(row.get("title") or ""),
                                           metadata=row.get("metadata") or {})
    all_queries = {str(r["_id"]): str(r["text"]) for r in _read_jsonl(_find(folder, "queries.jsonl"), ("_id", "text"))}
    qrels = read_qrels(qrels_path)
    if not qrels:
        raise LmforgeError(f"{qrels_path}: no judgements")
    unknown_q = [q for q in qrels if q not in all_queries]
    if unknown_q:
        raise LmforgeError(f"{qrels_path}: {len(unknown_q)} judged queries are not in queries.jsonl "
                           f"(first: {unknown_q[0]!r})")
    unknown_d = sorted({d for judged in qrels.values() for d in judged if d not in corpus})
    if unknown_d:
        raise LmforgeError(f"{qrels_path}: {len(unknown_d)} judged documents are not in the corpus "
                           f"(first: {unknown_d[0]!r})")
    queries = {q: t for q, t in all_queries.items() if q in qrels}
    return RetrievalDataset(name or f"{folder.name} ({split})", corpus, queries, qrels)


def load_squad(path: str | Path, name: str | None = None) -> RetrievalDataset:
    """SQuAD v1.1 JSON (see the module docstring): paragraphs are the corpus, questions the queries."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file (expected SQuAD v1.1 JSON, e.g. dev-v1.1.json.gz)")
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise LmforgeError(f"{path}: not SQuAD JSON (expected an object with a list 'data' of articles)")
    corpus, queries, qrels = {}, {}, {}
    try:
        for a, article in enumerate(articles):
            for p, paragraph in enumerate(article["paragraphs"]):
                doc_id = f"{a}-{p}"
                corpus[doc_id] = Document(text=paragraph["context"],
                                          metadata={"title": article.get("title", ""), "article": a, "index": p})
                for qa in paragraph["qas"]:
                    qid = str(qa["id"])
                    if qid in queries:
                        raise LmforgeError(f"{path}: question id {qid!r} appears twice")
                    queries[qid] = qa["question"]
                    qrels[qid] = {doc_id: 1}
    except (KeyError, TypeError) as e:
        raise LmforgeError(f"{path}: not SQuAD v1.1 JSON (article/paragraph without {e})") from None
    if not queries:
        raise LmforgeError(f"{path}: no questions")
    return RetrievalDataset(name or path.name.split(".")[0], corpus, queries, qrels)


SQUAD_SPLITS = ("test", "all", "train", "heldout")


def squad_split(dataset: RetrievalDataset, split: str) -> RetrievalDataset:
    """The SQuAD questions of a split by article (see the module docstring)."""
    if split in ("test", "all"):
        return dataset
    if split not in SQUAD_SPLITS:
        raise LmforgeError(f"SQuAD has no split {split!r}: expected one of {', '.join(SQUAD_SPLITS)} "
                           "(train: even-numbered articles, heldout: odd-numbered ones)")
    parity = 0 if split == "train" else 1

    def article(doc_id: str) -> int:
        return int(dataset.corpus[doc_id].metadata["article"])

    keep = {q for q, judged in dataset.qrels.items() if all(article(d) % 2 == parity for d in judged)}
    corpus = dataset.corpus if split == "heldout" else {
        d: doc for d, doc in dataset.corpus.items() if article(d) % 2 == parity}
    return RetrievalDataset(f"{dataset.name} ({split} articles)", corpus,
                            {q: t for q, t in dataset.queries.items() if q in keep},
                            {q: r for q, r in dataset.qrels.items() if q in keep})


def _hash_key(qid: str) -> str:
    return hashlib.sha1(qid.encode("utf-8")).hexdigest()


def subsample(dataset: RetrievalDataset, n: int | None) -> RetrievalDataset:
    """The dataset with n of its queries (by a hash of the id: deterministic and nested); all if n is
    None or >= the number of queries. The corpus is kept whole."""
    if n is None or n >= len(dataset.queries):
        return dataset
    if n < 1:
        raise LmforgeError(f"cannot keep {n} queries: expected at least 1")
    keep = set(sorted(dataset.queries, key=_hash_key)[:n])
    return RetrievalDataset(f"{dataset.name}, {n} of {len(dataset.queries)} queries", dataset.corpus,
                            {q: t for q, t in dataset.queries.items() if q in keep},
                            {q: r for q, r in dataset.qrels.items() if q in keep})


def shared_data() -> Path:
    """The development data folder: $LMFORGE_SHARED_DATA, or ../shared/data beside the repository."""
    import os

    env = os.environ.get("LMFORGE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


NAMED = {"squad": "squad/dev-v1.1.json.gz", "scifact": "beir/scifact"}


def load_dataset(spec: str, split: str = "test") -> RetrievalDataset:
    """`squad` (SQuAD v1.1 dev; `split` as in squad_split), `scifact` (BEIR SciFact, the split's qrels)
    from the development data, or a PATH: a BEIR-layout folder or a SQuAD-format .json/.json.gz file."""
    if spec in NAMED:
        path = shared_data() / NAMED[spec]
        if not path.exists():
            raise LmforgeError(f"dataset {spec!r} needs {path}; set LMFORGE_SHARED_DATA to the folder that has "
                               f"{NAMED[spec]}, or give its path")
        if spec == "squad":
            return squad_split(load_squad(path, "squad-dev"), split)
        return load_beir(path, split, f"scifact ({split})")
    path = Path(spec)
    if path.is_dir():
        return load_beir(path, split)
    if path.is_file():
        return squad_split(load_squad(path), split)
    raise LmforgeError(f"dataset {spec!r}: no such file or folder (expected squad, scifact, a BEIR-layout "
                      "folder or a SQuAD-format JSON file)")
