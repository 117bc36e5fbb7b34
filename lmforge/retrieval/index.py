"""The RAG index: documents cut into overlapping chunks (lmforge/retrieval/chunking.py), embedded once
by one encoder (lmforge/retrieval/encoders.py), kept in a folder, searched exactly.

    index = RagIndex.build(["docs/", "faq.jsonl"], "my-index", encoder="minilm")
    index = RagIndex.load("my-index")            # the encoder it was built with, checked
    index.add(["docs/new.md"])                   # embeds only the new or changed documents
    for p in index.search("how do I resume training?", k=5):
        print(p.score, p.cite(), p.text)

The folder (format version 1):

    index.json       format, version, encoder spec + identity, chunking settings, counts, times
    documents.jsonl  one line per document: key, source, doc_id, title, sha256 of its text, chunks
    chunks.jsonl     one line per chunk, in row order: source, doc_id, title, start, end, chunk, text, key
    vectors.npy      dense encoders: float32 (chunks, dim), rows L2-normalised (np.load(allow_pickle=False))
    bm25/            bm25: bm25s's own files (JSON and .npy, no pickle)

Why a whole folder is replaced at once: a build or an add writes a complete new folder next to the
index (`.NAME.tmp-*`) and renames it into place, so an interrupted run (Ctrl-C, a crash, a full disk)
leaves the previous index as it was; between the two renames of the swap (old out of the way, new
in) the old folder waits as `.NAME.old-*`, and `load` names it if it is all there is.

The encoder is part of the index: vectors of one model mean nothing to another, and BM25 scores
depend on its tokeniser. index.json keeps the encoder's `identity()` (name, dimension, a hash of the
weights; for bm25 its parameters); loading with an explicit encoder, or adding with one, whose
identity differs is an error naming both, and so is loading when the model folder the index names
has changed since. What is embedded is the document title (when it has one), a line break, then the
chunk text; `Passage.text` is the chunk text alone, exactly `source_text[start:end]`.

Search is exact: inner products of the normalised query with every row, top k with numpy
(`topk_numpy`) or faiss-cpu's IndexFlatIP (`backend="auto"` uses faiss when installed; both give the
same top k). For bm25 it is bm25s's retrieval (chunks sharing no word with the query are left out).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, json_lines
from lmforge.retrieval.chunking import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_OVERLAP,
    Document,
    check_chunking,
    chunk_text,
    read_documents,
)
from lmforge.retrieval.encoders import describe_identity, load_encoder, normalised_identity

FORMAT = "lmforge-rag-index"
VERSION = 1
BACKENDS = ("auto", "numpy", "faiss")
EMBED_BATCH = 256


@dataclass(frozen=True)
class Passage:
    """One search result: a chunk of a document and its score (higher is better)."""

    text: str
    source: str
    doc_id: str
    title: str | None
    start: int
    end: int
    chunk: int
    score: float

    def cite(self) -> str:
        """"source:start-end", with "#doc_id" after the source for a record of a .jsonl file."""
        where = self.source if self.doc_id == self.source else f"{self.source}#{self.doc_id}"
        return f"{where}:{self.start}-{self.end}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _embedded_text(chunk: dict) -> str:
    return f"{chunk['title']}\n{chunk['text']}" if chunk.get("title") else chunk["text"]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise LmforgeError(f"{path} is missing: the index is incomplete; rebuild it")
    with open(path, encoding="utf-8") as f:
        return [record for _, record in json_lines(f, path)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _leftover(path: Path) -> list[Path]:
    """The previous index, if an update stopped between the two renames of its swap."""
    return sorted(p for p in path.parent.glob(f".{path.name}.old-*") if (p / "index.json").is_file())


def _check_backend(backend: str) -> str:
    from lmforge.retrieval.dense import faiss_available

    if backend not in BACKENDS:
        raise LmforgeError(f"unknown search backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise LmforgeError("backend faiss needs faiss-cpu: pip install faiss-cpu (or use backend numpy)")
    return ("faiss" if faiss_available() else "numpy") if backend == "auto" else backend


class RagIndex:
    """A loaded index (build, load, add, search); see the module docstring."""

    def __init__(self, path: Path, encoder, spec: str | None, identity: dict, chunk_chars: int, overlap: int,
                 documents: list[dict], chunks: list[dict], vectors: np.ndarray | None, backend: str,
                 created: str | None = None, updated: str | None = None):
        self.path = Path(path)
        self.encoder = encoder
        self.spec = spec
        self.identity = identity
        self.chunk_chars, self.overlap = chunk_chars, overlap
        self.documents, self.chunks = documents, chunks
        self.vectors = vectors
        self.backend = backend if encoder.kind == "dense" else "bm25s"
        self.created, self.updated = created or _now(), updated or _now()
        self.stats: dict = {}
        self._faiss = None
        self._prepare_search()

    # ------------------------------------------------------------------------- building

    @classmethod
    def build(cls, docs, out, encoder="minilm", chunk_chars: int = DEFAULT_CHUNK_CHARS,
              overlap: int = DEFAULT_OVERLAP, show_progress: bool = True, backend: str = "auto",
              overwrite: bool = True) -> RagIndex:
        """Index the documents in docs (files or folders) into the folder out, replacing an index there
        (unless overwrite=False). encoder: "bm25", "minilm", a model folder, or an encoder object."""
        check_chunking(chunk_chars, overlap)
        out = Path(out)
        _check_target(out, overwrite)
        backend = _check_backend(backend)
        docs = [docs] if isinstance(docs, (str, Path)) else list(docs)
        documents = read_documents(docs)
        if not documents:
            raise LmforgeError(f"no documents found in {', '.join(map(str, docs))} "
                               "(expected .txt, .md, .jsonl or .jsonl.gz files)")
        enc = load_encoder(encoder, show_progress=show_progress)
        if isinstance(encoder, (str, Path)):
            spec = encoder if encoder in ("bm25", "minilm") else str(Path(encoder).resolve())
        else:
            spec = None  # an object: load() needs it passed again
        index = cls(out, enc, spec, normalised_identity(enc.identity()), chunk_chars, overlap, [], [],
                    None, backend)
        index._update(documents, show_progress)
        return index

    def add(self, docs, show_progress: bool = True) -> dict:
        """Index more documents with the index's encoder and chunking: a document already in the index
        with the same text is skipped, one whose text changed replaces its old chunks. Returns the stats
        (documents added / replaced / unchanged, chunks added, seconds); the folder is updated at once."""
        documents = read_documents([docs] if isinstance(docs, (str, Path)) else list(docs))
        return self._update(documents, show_progress)

    def _update(self, incoming: list[Document], show_progress: bool) -> dict:
        t0 = time.perf_counter()
        position = {d["key"]: i for i, d in enumerate(self.documents)}
        new_docs, replaced, unchanged = [], set(), 0
        for doc in incoming:
            i = position.get(doc.key)
            if i is not None and self.documents[i]["sha256"] == doc.sha256:
                unchanged += 1
                continue
            if i is not None:
                replaced.add(doc.key)
            new_docs.append(doc)
        stats = {"documents_added": len(new_docs) - len(replaced), "documents_replaced": len(replaced),
                 "documents_unchanged": unchanged, "chunks_added": 0, "chunks_removed": 0}
        if new_docs:
            keep = [i for i, c in enumerate(self.chunks) if c["key"] not in replaced]
            documents = [d for d in self.documents if d["key"] not in replaced]
            chunks = [self.chunks[i] for i in keep]
            added: list[dict] = []
            for doc in new_docs:
                pieces = chunk_text(doc.text, self.chunk_chars, self.overlap)
                documents.append({"key": doc.key, "source": doc.source, "doc_id": doc.doc_id, "title": doc.title,
                                  "sha256": doc.sha256, "chars": len(doc.text), "chunks": len(pieces)})
                added += [{"source": doc.source, "doc_id": doc.doc_id, "title": doc.title, "start": c.start,
                           "end": c.end, "chunk": c.number, "text": c.text, "key": doc.key} for c in pieces]
            chunks += added
            vectors = None
            if self.encoder.kind == "dense":
                old = self.vectors[keep] if self.vectors is not None else None
                fresh = self._embed([_embedded_text(c) for c in added], show_progress)
                vectors = fresh if old is None or not len(old) else np.concatenate([old, fresh]) if len(fresh) else old
            stats.update(chunks_added=len(added), chunks_removed=len(self.chunks) - len(keep))
            self._commit(documents, chunks, vectors)
        stats["seconds"] = time.perf_counter() - t0
        self.stats = stats
        return stats

    def _embed(self, texts: list[str], show_progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        dim = self.vectors.shape[1] if self.vectors is not None and self.vectors.size else None
        parts = []
        with tqdm(total=len(texts), desc=f"embed ({self.encoder.name})", unit="chunk",
                  disable=not show_progress or not texts) as bar:
            for s in range(0, len(texts), EMBED_BATCH):
                batch = texts[s:s + EMBED_BATCH]
                x = np.asarray(self.encoder.encode(batch), dtype=np.float32)
                if x.ndim != 2 or x.shape[0] != len(batch) or (dim is not None and x.shape[1] != dim):
                    raise LmforgeError(f"encoder {self.encoder.name} returned shape {tuple(x.shape)} for "
                                       f"{len(batch)} texts; expected ({len(batch)}, {dim or 'dim'})")
                dim = x.shape[1]
                parts.append(_normalise(x))
                bar.update(len(batch))
        return np.concatenate(parts) if parts else np.zeros((0, dim or 0), dtype=np.float32)

    def _commit(self, documents: list[dict], chunks: list[dict], vectors: np.ndarray | None) -> None:
        """Write the new state as a whole folder, swap it in, then adopt it (on failure: nothing changed)."""
        if self.encoder.kind == "sparse":
            self.encoder.fit([_embedded_text(c) for c in chunks])
        updated = _now()
        meta = {"format": FORMAT, "version": VERSION,
                "encoder": {"spec": self.spec, "name": self.encoder.name, "kind": self.encoder.kind,
                            "identity": self.identity},
                "dimension": None if vectors is None else int(vectors.shape[1]),
                "chunking": {"chunk_chars": self.chunk_chars, "overlap": self.overlap},
                "embedded_text": "title, a line break, then the chunk text (the chunk text alone without a title)",
                "documents": len(documents), "chunks": len(chunks),
                "created": self.created, "updated": updated}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        try:
            _write_jsonl(tmp / "documents.jsonl", documents)
            _write_jsonl(tmp / "chunks.jsonl", chunks)
            if vectors is not None:
                with open(tmp / "vectors.npy", "wb") as f:
                    np.save(f, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self.encoder.save(tmp / "bm25")
            with open(tmp / "index.json", "w") as f:  # written last: a folder with it is complete
                f.write(json.dumps(meta, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _swap_in(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.encoder.kind == "sparse" and self.chunks:
                self.encoder.fit([_embedded_text(c) for c in self.chunks])  # back to the state on disk
            raise
        self.documents, self.chunks, self.vectors, self.updated = documents, chunks, vectors, updated
        self._prepare_search()

    # ------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path, backend: str = "auto", encoder=None, show_progress: bool = False) -> RagIndex:
        """The index in folder path. encoder=None loads the model the index names; an explicit encoder
        (spec or object) must have the identity the index was built with."""
        path = Path(path)
        if not path.is_dir():
            left = _leftover(path)
            hint = f" (an interrupted update left the previous index at {left[-1]}: rename it to {path})" \
                if left else ""
            raise LmforgeError(f"no RAG index at {path}: {'not a folder' if path.exists() else 'no such folder'}{hint}")
        meta_path = path / "index.json"
        if not meta_path.is_file():
            raise LmforgeError(f"{path} is not a RAG index (no index.json); build one with `lmforge rag index DOCS "
                               f"--out {path}`")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LmforgeError(f"{path} is not a RAG index ({meta_path} is not an lmforge RAG index description)")
        version = meta.get("version")
        if not isinstance(version, int) or version < 1:
            raise LmforgeError(f"{meta_path}: unknown index format version {version!r}")
        if version > VERSION:
            raise LmforgeError(f"{path} was written by a newer lmforge (index format version {version}; this one "
                               f"reads up to {VERSION}): upgrade lmforge or rebuild the index")
        stored = meta["encoder"]["identity"]
        spec = meta["encoder"].get("spec")
        if encoder is None:
            if spec is None:
                raise LmforgeError(f"{path} was built with an encoder object ({describe_identity(stored)}): pass the "
                                   "same encoder to RagIndex.load(..., encoder=...)")
            if spec not in ("bm25", "minilm") and not Path(spec).exists():
                raise LmforgeError(f"{path} was built with the model at {spec}, which is gone: restore it, or "
                                   "rebuild the index with another --encoder")
            enc = load_encoder(spec, show_progress=show_progress)
        else:
            enc = load_encoder(encoder, show_progress=show_progress)
        given = normalised_identity(enc.identity())
        if given != stored:
            what = "the encoder given is" if encoder is not None else f"the model at {spec} is now"
            raise LmforgeError(f"model mismatch: {path} was built with {describe_identity(stored)}, but {what} "
                               f"{describe_identity(given)}; use the same model or rebuild the index")
        documents = _read_jsonl(path / "documents.jsonl")
        chunks = _read_jsonl(path / "chunks.jsonl")
        if len(chunks) != meta.get("chunks") or len(documents) != meta.get("documents"):
            raise LmforgeError(f"{path}: index.json counts {meta.get('documents')} documents and {meta.get('chunks')} "
                               f"chunks, the files hold {len(documents)} and {len(chunks)}; rebuild the index")
        vectors = None
        if enc.kind == "dense":
            try:
                vectors = np.load(path / "vectors.npy", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise LmforgeError(f"{path / 'vectors.npy'} cannot be read ({e}); rebuild the index") from None
            if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(chunks):
                raise LmforgeError(f"{path / 'vectors.npy'} holds {vectors.dtype} {vectors.shape}, expected float32 "
                                   f"({len(chunks)}, dim); rebuild the index")
        else:
            enc.load(path / "bm25", len(chunks))
        chunking = meta["chunking"]
        return cls(path, enc, spec, stored, int(chunking["chunk_chars"]), int(chunking["overlap"]), documents,
                   chunks, vectors, _check_backend(backend), meta.get("created"), meta.get("updated"))

    # ------------------------------------------------------------------------- searching

    def _prepare_search(self) -> None:
        self._faiss = None
        if self.backend == "faiss" and self.vectors is not None and len(self.vectors):
            from lmforge.retrieval.dense import FaissFlatIP

            self._faiss = FaissFlatIP(self.vectors)

    def __len__(self) -> int:
        return len(self.chunks)

    def describe(self) -> str:
        how = f"exact inner product, {self.backend}" if self.encoder.kind == "dense" else "bm25s"
        return (f"{len(self.documents)} documents, {len(self.chunks)} chunks of <= {self.chunk_chars} characters "
                f"(overlap {self.overlap}); encoder {describe_identity(self.identity)}; search: {how}")

    def _passage(self, row: int, score: float) -> Passage:
        c = self.chunks[row]
        return Passage(text=c["text"], source=c["source"], doc_id=c["doc_id"], title=c.get("title"),
                       start=c["start"], end=c["end"], chunk=c["chunk"], score=float(score))

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """The k best chunks for query, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int = 5) -> list[list[Passage]]:
        """search() for each query (dense encoders embed them in one batch)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise LmforgeError(f"k must be a positive integer, got {k!r}")
        queries = [queries] if isinstance(queries, str) else list(queries)
        if not queries or not self.chunks:
            return [[] for _ in queries]
        if self.encoder.kind == "sparse":
            return [[self._passage(row, s) for row, s in hits] for hits in self.encoder.search(queries, int(k))]
        encode = getattr(self.encoder, "encode_queries", None) or self.encoder.encode
        q = np.asarray(encode(queries), dtype=np.float32)
        if q.ndim != 2 or q.shape != (len(queries), self.vectors.shape[1]):
            raise LmforgeError(f"encoder {self.encoder.name} returned shape {tuple(q.shape)} for {len(queries)} "
                               f"queries; expected ({len(queries)}, {self.vectors.shape[1]})")
        q = _normalise(q)
        if self._faiss is not None:
            idx, scores = self._faiss.search(q, int(k))
        else:
            from lmforge.retrieval.dense import topk_numpy

            idx, scores = topk_numpy(q, self.vectors, int(k))
        return [[self._passage(int(i), s) for i, s in zip(ri, rs) if i >= 0] for ri, rs in zip(idx, scores)]


def _is_rag_index(path: Path) -> bool:
    try:
        return json.loads((path / "index.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path, overwrite: bool) -> None:
    """A build may write out when it is absent, empty, or (with overwrite) a RAG index; never over
    anything else."""
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} is a file; the index is a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not _is_rag_index(out):
        raise LmforgeError(f"{out} exists and is not a RAG index: refusing to replace it; choose another --out")
    if not overwrite:
        raise LmforgeError(f"{out} already holds an index: --add to add documents to it, --overwrite to replace it")


def _swap_in(new: Path, target: Path) -> None:
    """Rename the complete folder new to target, replacing a folder there."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rmdir(old)  # a unique name for the old folder
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
