"""From files to chunks: read the documents a RAG index is built from and cut them into overlapping
passages that keep their exact place in the source.

Why chunks: an embedding model reads a few hundred tokens (all-MiniLM-L6-v2 cuts at 256 word
pieces, about 1,000 characters of English) and a prompt has room for a handful of passages, so a
long document is indexed as many short ones. Why overlap: a sentence that answers a question may
straddle a cut; with `overlap` characters shared by neighbours it is whole in at least one chunk
whenever it is shorter than the overlap.

Where a chunk ends. It is at most `chunk_chars` long. Among the positions between half the target
(or `overlap + 1`, when larger: every chunk then moves the next one forward) and the target, the
cut is the last paragraph break (a blank line), else the last sentence end (`.`, `!`, `?` and
closing quotes or brackets before white space, a line break, or CJK `。！？`), else the last white
space; only a run of at least `chunk_chars / 2` characters without white space is cut mid-word.
White space at either edge of a chunk is trimmed (offsets stay exact).

Where the next chunk starts: at the earliest sentence start within the last `overlap` characters of
the previous chunk, else the earliest word start there, else right after the previous chunk (no
overlap: a single word longer than the overlap). So neighbours share at most `overlap` characters,
every non-white-space character of the text is in some chunk, and `text[start:end] == chunk.text`.

Documents (`read_documents`): `.txt` and `.md` files are one document each (UTF-8; a file that is
not valid UTF-8 or holds NUL bytes is skipped with a warning naming it); `.jsonl` and `.jsonl.gz`
hold one JSON object per line with `text` and optionally `id` (or BEIR's `_id`) and `title`. A
folder is read recursively in name order, skipping hidden entries and RAG index folders.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError, json_lines

DEFAULT_CHUNK_CHARS = 1000
DEFAULT_OVERLAP = 200
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s)|[。！？]|(?<=\S)(?=\n)")
_SPACE = re.compile(r"\s")
_SENTENCE_START = re.compile(r"(?:(?<=[.!?][\s])|(?<=[.!?][\"'”’)\]][\s])|(?<=\n)|(?<=[。！？]))\s*(?=\S)")
_WORD_START = re.compile(r"(?<=\s)(?=\S)")
_NON_SPACE = re.compile(r"\S")


@dataclass(frozen=True)
class Chunk:
    """text == source_text[start:end]; number counts the chunks of one document from 0."""

    text: str
    start: int
    end: int
    number: int


def check_chunking(chunk_chars: int, overlap: int) -> None:
    if not isinstance(chunk_chars, int) or chunk_chars <= 0:
        raise LmforgeError(f"chunk size must be a positive number of characters, got {chunk_chars!r}")
    if not isinstance(overlap, int) or overlap < 0:
        raise LmforgeError(f"chunk overlap must be 0 or more characters, got {overlap!r}")
    if overlap >= chunk_chars:
        raise LmforgeError(f"chunk overlap ({overlap}) must be smaller than the chunk size ({chunk_chars}): "
                           "otherwise a chunk would never move past the previous one")


def _last_cut(pattern: re.Pattern, text: str, lo: int, hi: int, use_end: bool) -> int | None:
    """The largest cut position in [lo, hi] given by a match of pattern (its end or its start)."""
    best = None
    for m in pattern.finditer(text, max(lo - 2, 0), min(hi + 2, len(text))):
        pos = m.end() if use_end else m.start()
        if lo <= pos <= hi:
            best = pos
    return best


def _cut(text: str, start: int, chunk_chars: int, overlap: int) -> int:
    """Where the chunk starting at `start` ends (exclusive), before trimming white space."""
    lo, hi = start + max(chunk_chars // 2, overlap + 1), start + chunk_chars
    for pattern, use_end in ((_PARAGRAPH, False), (_SENTENCE_END, True), (_SPACE, False)):
        pos = _last_cut(pattern, text, lo, hi, use_end)
        if pos is not None:
            return pos
    return hi  # no white space near the target: a very long word, cut it


def _next_start(text: str, start: int, end: int, overlap: int) -> int:
    """Where the chunk after [start, end) starts: inside its last `overlap` characters at a sentence,
    else a word start, else right after it."""
    lo = max(end - overlap, start + 1)
    for pattern in (_SENTENCE_START, _WORD_START):
        m = pattern.search(text, lo, end)
        if m is not None and m.end() < end:
            return m.end()
    return end


def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS, overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """The chunks of one document, in order (see the module docstring for the rules)."""
    check_chunking(chunk_chars, overlap)
    chunks: list[Chunk] = []
    n = len(text)
    start = prev_end = 0
    while True:
        m = _NON_SPACE.search(text, start)
        if m is None:
            return chunks
        start = m.start()
        end = n if n - start <= chunk_chars else _cut(text, start, chunk_chars, overlap)
        while end > start and text[end - 1].isspace():
            end -= 1
        if chunks and end <= prev_end:
            # the overlap reached back across a long run of white space: start after the run instead
            start = prev_end
            continue
        chunks.append(Chunk(text[start:end], start, end, len(chunks)))
        prev_end = end
        if end >= n:
            return chunks
        start = _next_start(text, start, end, overlap)


# ----------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    """One indexable text. `key` identifies it across runs (the resolved file path, plus `#id` for a
    record of a .jsonl file); `source` is the path as given; `doc_id` the record's id, or the path."""

    key: str
    source: str
    doc_id: str
    title: str | None
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.title or ''}\x00{self.text}".encode()).hexdigest()


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _is_index_folder(path: Path) -> bool:
    return (path / "index.json").is_file() and (path / "chunks.jsonl").is_file()


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def document_files(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """(file, kind) for every document file named or found (recursively, in name order) in paths."""
    found: list[tuple[Path, str]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            if _is_index_folder(path):
                raise LmforgeError(f"{path} is a RAG index, not a folder of documents")
            for folder, subfolders, files in os.walk(path):
                folder = Path(folder)
                subfolders[:] = sorted(d for d in subfolders
                                       if not d.startswith(".") and not _is_index_folder(folder / d))
                for name in sorted(files):
                    kind = None if name.startswith(".") else _kind(folder / name)
                    if kind:
                        found.append((folder / name, kind))
        elif path.is_file():
            kind = _kind(path)
            if kind is None:
                raise LmforgeError(f"{path}: not a document file (expected .txt, .md, .jsonl or .jsonl.gz)")
            found.append((path, kind))
        else:
            raise LmforgeError(f"{path}: no such file or folder")
    return found


def _read_text(path: Path) -> str | None:
    data = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    if b"\x00" in data:
        warn(f"skipped {path}: binary file (it holds NUL bytes)")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        warn(f"skipped {path}: not valid UTF-8 ({e.reason} at byte {e.start})")
        return None


def _jsonl_documents(path: Path, text: str) -> Iterator[Document]:
    resolved = str(path.resolve())
    for lineno, record in json_lines(text.splitlines(), path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmforgeError(f"{path}:{lineno}: expected a JSON object with a \"text\" string "
                               '(and optionally "id" or "_id", "title")')
        doc_id = record.get("id", record.get("_id"))
        doc_id = str(lineno) if doc_id is None else str(doc_id)
        title = record.get("title")
        title = str(title) if title not in (None, "") else None
        yield Document(f"{resolved}#{doc_id}", str(path), doc_id, title, record["text"])


def read_documents(paths: list[str | Path]) -> list[Document]:
    """Every document in paths (files or folders), each key once (a repeated key keeps the first and
    warns). Unreadable text files are skipped with a warning; malformed .jsonl is an error."""
    docs: dict[str, Document] = {}
    repeated: dict[str, int] = {}
    for path, kind in document_files(paths):
        try:
            text = _read_text(path)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            warn(f"skipped {path}: {e}")
            continue
        if text is None:
            continue
        if kind == "text":
            found = [Document(str(path.resolve()), str(path), str(path), None, text)]
        else:
            found = _jsonl_documents(path, text)
        for doc in found:
            if doc.key in docs:
                if docs[doc.key].sha256 != doc.sha256:
                    repeated[doc.source] = repeated.get(doc.source, 0) + 1
                continue
            docs[doc.key] = doc
    for source, count in repeated.items():
        warn(f"{source}: {count} document id(s) repeated with different text; kept the first of each")
    return list(docs.values())
