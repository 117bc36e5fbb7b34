"""Word vectors and the two queries everyone asks of them, vectorised over the whole vocabulary:
nearest neighbours by cosine similarity, and analogies by 3CosAdd ("a is to b as c is to ?" is the
word closest to b - a + c, all three unit-normalised, the three query words excluded).

`WordVectors` holds words in rank order (most frequent first: evaluations restrict candidates to the
top N rows) and a float32 matrix. `as_word_vectors` turns any word -> vector mapping into one, so the
evaluation code scores lmforge's vectors and another library's (gensim's KeyedVectors) the same way.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lmforge.common import LmforgeError


class WordVectors:
    """words[i] has vector vectors[i]; counts (optional) are the training-corpus frequencies."""

    def __init__(self, words: list[str], vectors, counts=None):
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise LmforgeError(f"{len(words)} words but vectors of shape {tuple(vectors.shape)}")
        self.words = list(words)
        self.vectors = vectors
        self.counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        self.index: dict[str, int] = {}
        for i, w in enumerate(self.words):
            self.index.setdefault(w, i)  # a repeated key keeps its first (most frequent) row
        self._unit = None

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self.lookup(word)]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def unit(self) -> np.ndarray:
        """Rows scaled to length 1 (an all-zero row stays zero), computed once."""
        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.maximum(norms, np.finfo(np.float32).tiny)
        return self._unit

    def lookup(self, word: str) -> int:
        """The row of a word; the lowercased word if only that is known (the vocabulary of
        lmforge's word2vec is lowercase); otherwise a one-line error."""
        i = self.index.get(word)
        if i is None:
            i = self.index.get(word.lower())
        if i is None:
            raise LmforgeError(f"{word!r} is not in the vocabulary ({len(self.words):,} words)")
        return i

    def _top(self, scores: np.ndarray, exclude: list[int], k: int) -> list[tuple[str, float]]:
        scores = scores.copy()
        scores[exclude] = -np.inf
        k = min(k, len(scores) - len(set(exclude)))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.words[i], float(scores[i])) for i in top]

    def neighbors(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The k words of highest cosine similarity to `word` (itself excluded), best first."""
        i = self.lookup(word)
        return self._top(self.unit @ self.unit[i], [i], k)

    def analogy(self, a: str, b: str, c: str, k: int = 10) -> list[tuple[str, float]]:
        """a is to b as c is to ?: the k words closest (cosine) to b - a + c, a, b and c excluded."""
        ia, ib, ic = self.lookup(a), self.lookup(b), self.lookup(c)
        u = self.unit
        q = u[ib] - u[ia] + u[ic]
        q = q / max(float(np.linalg.norm(q)), np.finfo(np.float32).tiny)
        return self._top(u @ q, [ia, ib, ic], k)


def as_word_vectors(obj) -> WordVectors:
    """A WordVectors from: a WordVectors; anything with `index_to_key` and `vectors` (gensim's
    KeyedVectors, read without importing gensim); a Mapping word -> vector (iteration order taken as
    rank order); or lmforge's Word2Vec (its `wv`)."""
    if isinstance(obj, WordVectors):
        return obj
    if hasattr(obj, "wv") and isinstance(obj.wv, WordVectors):
        return obj.wv
    if hasattr(obj, "index_to_key") and hasattr(obj, "vectors"):
        return WordVectors(list(obj.index_to_key), obj.vectors)
    if isinstance(obj, Mapping):
        words = list(obj)
        if not words:
            raise LmforgeError("no word vectors given")
        return WordVectors(words, np.stack([np.asarray(obj[w], dtype=np.float32) for w in words]))
    raise LmforgeError(f"cannot read word vectors from a {type(obj).__name__}")
