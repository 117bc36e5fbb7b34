"""BM25 over `bm25s` (sparse-matrix BM25: the scores of every document are precomputed per term at
index time, so a query is a sum of a few sparse rows).

Tokenisation is bm25s's own `Tokenizer`: lower-case, words = the regex `\\b\\w\\w+\\b` (two or more
word characters, so one-letter words are dropped), bm25s's English stop-word list removed, then
the Snowball English (Porter 2) stemmer of PyStemmer when it is installed (it is a dependency of
lmforge's test extras; without it, no stemming: `BM25Retriever.stemmer_name` says which). Queries
are tokenised with the corpus's vocabulary; a query word that is not in the corpus is dropped, and a
query with no word left returns an empty ranking (it scores 0 on every metric).

Scoring: bm25s's default variant, "lucene" (Lucene's BM25: idf = ln(1 + (N - df + 0.5) / (df + 0.5))),
k1 = 1.5, b = 0.75. Documents sharing no word with the query (score 0) are left out of the ranking.
"""
from __future__ import annotations

import time

import numpy as np

from lmforge.common import LmforgeError


def english_stemmer():
    """(stemmer, name): PyStemmer's Snowball English stemmer, or (None, "none") without PyStemmer."""
    try:
        import Stemmer
    except ImportError:
        return None, "none (PyStemmer not installed)"
    return Stemmer.Stemmer("english"), "Snowball English (PyStemmer)"


class BM25Retriever:
    """index(doc_ids, texts) once, then search(queries, k) -> [[(doc_id, score), ...], ...]."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stem: bool = True,
                 stopwords: str | None = "en", show_progress: bool = False):
        try:
            import bm25s  # noqa: F401
        except ImportError:
            raise LmforgeError("the BM25 retriever needs bm25s: pip install bm25s") from None
        self.k1, self.b, self.method, self.stopwords = k1, b, method, stopwords
        self.stemmer, self.stemmer_name = english_stemmer() if stem else (None, "none")
        self.show_progress = show_progress
        self.name = "BM25"
        self.doc_ids: list[str] = []
        self.index_seconds = 0.0

    def describe(self) -> str:
        return (f"BM25 (bm25s, {self.method}, k1={self.k1}, b={self.b}; bm25s tokenizer, stop words "
                f"{self.stopwords or 'kept'}, stemmer {self.stemmer_name})")

    def index(self, doc_ids: list[str], texts: list[str]) -> float:
        """Builds the index; returns (and keeps in index_seconds) the build time in seconds."""
        import bm25s

        if not doc_ids:
            raise LmforgeError("cannot index an empty corpus")
        t0 = time.perf_counter()
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords=self.stopwords, stemmer=self.stemmer)
        ids = self.tokenizer.tokenize(list(texts), show_progress=self.show_progress, allow_empty=True)
        self.model = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self.model.index(ids, show_progress=self.show_progress)
        self.doc_ids = list(doc_ids)
        self.empty_id = self.tokenizer.get_vocab_dict().get("")  # the token of documents with no word
        self.index_seconds = time.perf_counter() - t0
        return self.index_seconds

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """The top k documents of each query, best first (score > 0 only)."""
        if not self.doc_ids:
            raise LmforgeError("search before index: build the BM25 index first")
        k = min(k, len(self.doc_ids))
        tokens = self.tokenizer.tokenize(list(queries), update_vocab=False, show_progress=False, allow_empty=True)
        tokens = [[t for t in q if t != self.empty_id] for q in tokens]
        out: list[list[tuple[str, float]]] = [[] for _ in tokens]
        asked = [i for i, q in enumerate(tokens) if q]
        if not asked:
            return out
        docs, scores = self.model.retrieve([tokens[i] for i in asked], k=k, show_progress=False, n_threads=1)
        for row, i in enumerate(asked):
            order = np.argsort(-scores[row], kind="stable")
            out[i] = [(self.doc_ids[int(docs[row, j])], float(scores[row, j])) for j in order if scores[row, j] > 0]
        return out
