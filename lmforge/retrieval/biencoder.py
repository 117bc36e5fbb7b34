"""lmforge's own retrievers, built from an encoder (lmforge/models/encoder.py) pretrained by masked
language modelling: a bi-encoder that embeds queries and passages apart, and a cross-encoder that
reads a query and a passage together and scores the pair.

Bi-encoder. One encoder embeds both sides (shared weights): `[<|bos|>] + tokens`, cut at
`query_len` / `passage_len` tokens, pooled by the encoder's pooling (mean by default), L2-normalised.
It is trained with InfoNCE: for a batch of B queries, every query's positive passage, and `n` mined
hard negatives per query, the similarity matrix S (B x B(1 + n)) of cosine similarities divided by a
temperature τ is a B-way-and-more classification whose right answer for query i is its own
positive; every other query's positive is an in-batch negative for free, and the hard negatives
(passages BM25 ranks high but that are not relevant) teach what lexical overlap alone gets wrong.
Loss = cross-entropy(S[i], i), averaged. τ = 0.05 (a scale of 20, sentence-transformers' default
for the same loss). Searching is exact inner product over the normalised vectors
(lmforge/retrieval/dense.py), so any index built with it and the numbers of `retrieval eval` agree.

Cross-encoder (`CrossEncoder`). The encoder composed with a scalar head (lmforge's ModelWithHead, as
the reward model: not a subclass of the encoder): input `[<|bos|>] + query + [<|bos|>] + passage`
(a second document start separates the two: no text can encode to it), cut at `pair_len` tokens
(the query kept whole up to `query_len`, the passage cut from its end), pooled, then one linear
layer, initialised at zero so every pair starts at score 0. Trained listwise: for each query its
positive and `n` hard negatives form a group, and the loss is the cross-entropy of the positive
under a softmax over the group's scores. It re-ranks the top candidates of any first stage
(`RerankedRetriever`): far slower per document than a bi-encoder, so only the top `depth` are read.

The training stages are in lmforge/stages/retriever.py; this module holds the models' reading side
used by evaluation, the RAG index and the benchmark.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.heads import ModelWithHead

TEMPERATURE = 0.05


# ----------------------------------------------------------------------------- tokens in, vectors out


def text_ids(tok, text: str, max_len: int) -> list[int]:
    """[<|bos|>] + the text's tokens, cut to max_len in all."""
    return [tok.bos_id] + tok.encode(text)[: max_len - 1]


def pair_ids(tok, query: list[int], passage: list[int], pair_len: int) -> list[int]:
    """[<|bos|>] + query + [<|bos|>] + passage (token lists without their own <|bos|>), cut to
    pair_len: the passage loses its end first."""
    head = [tok.bos_id] + query + [tok.bos_id]
    return (head + passage)[:pair_len]


def pad_rows(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the attention mask (True on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def embed_rows(encoder, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, H) float32, L2-normalised: one vector per token row."""
    ids, mask = pad_rows(rows, pad_id, encoder.device)
    return F.normalize(encoder.embed_texts(ids, mask).float(), dim=-1)


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float = TEMPERATURE):
    """(loss, accuracy): queries (B, H) and passages (P, H), both normalised, P >= B, where passage i
    is query i's positive and every other passage a negative (in-batch positives of the other
    queries, then hard negatives). Accuracy: the share of queries whose positive scores highest."""
    scores = queries @ passages.T / temperature
    labels = torch.arange(queries.size(0), device=queries.device)
    return F.cross_entropy(scores, labels), tops(scores, labels)


def tops(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The share of rows whose label's score is strictly above every other (a tie is a miss)."""
    right = scores.gather(1, labels[:, None])
    others = scores.scatter(1, labels[:, None], float("-inf"))
    return (right[:, 0] > others.max(-1).values).float().mean()


def weights_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_run(path, stage: str | None):
    """(checkpoint folder, state, tokenizer) of a run or checkpoint of the given retrieval stage."""
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, read_checkpoint_state, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_state(ckpt)
    if stage is not None and state.get("stage") != stage:
        what = {"biencoder": "`lmforge retrieval train-biencoder`", "cross-encoder": "`lmforge retrieval "
                "train-reranker`"}[stage]
        raise LmforgeError(f"{ckpt} is not a {stage} (stage {state.get('stage', 'pretrain')!r}); train one with {what}")
    return ckpt, state, load_checkpoint_tokenizer(ckpt)


class BiEncoderEmbedder:
    """A trained bi-encoder (or any encoder checkpoint) as a dense-retrieval encoder:
    encode(texts) -> (n, H) float32, normalised. Texts are embedded in batches sorted by length
    (less padding), and returned in the order given."""

    def __init__(self, path, device: str = "cpu", batch_size: int = 64, require_trained: bool = True):
        from lmforge.train.checkpoint import load_model

        self.checkpoint, state, self.tok = _load_run(path, "biencoder" if require_trained else None)
        model, _ = load_model(self.checkpoint, device=device)
        if getattr(model, "family", None) != "encoder":
            raise LmforgeError(f"{self.checkpoint} holds a {getattr(model, 'family', '?')} model; a bi-encoder "
                               "is an encoder (lmforge pretrain --arch encoder)")
        self.model = model.eval()
        self.passage_len = int(state.get("passage_len") or model.context_limit)
        self.query_len = int(state.get("query_len") or self.passage_len)
        self.batch_size = batch_size
        self.name = f"lmforge bi-encoder ({Path(path).name})"
        self.digest = weights_digest(self.checkpoint / "model.safetensors") \
            if (self.checkpoint / "model.safetensors").is_file() else "sharded"

    @property
    def dimension(self) -> int:
        return self.model.hidden_size

    def identity(self) -> dict:
        """What must match between an index and the model searching it: the weights (by their hash,
        so a moved run folder still matches), the dimension and the passage length."""
        return {"kind": "lmforge-biencoder", "weights": self.digest, "dimension": self.dimension,
                "passage_len": self.passage_len}

    @torch.no_grad()
    def encode(self, texts: list[str], max_len: int | None = None) -> np.ndarray:
        max_len = max_len or self.passage_len
        rows = [text_ids(self.tok, t, max_len) for t in texts]
        out = np.zeros((len(rows), self.dimension), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            out[chunk] = embed_rows(self.model, [rows[i] for i in chunk], self.tok.pad_id).cpu().numpy()
        return out

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts, self.query_len)


def load_biencoder_encoder(path, device: str = "cpu"):
    """The dense encoder of a `lmforge retrieval train-biencoder` run (for RAG indexes)."""
    return BiEncoderEmbedder(path, device=device)


# ----------------------------------------------------------------------------- cross-encoder


class CrossEncoder(ModelWithHead):
    """An encoder (`self.model`) and a linear score head over its pooled states of a query-passage pair."""

    head_kind = "cross-encoder"
    head_modules = ("score_head",)
    loads_as_language_model = False  # the masked-token output layer is left out of its checkpoint

    def __init__(self, encoder: nn.Module):
        super().__init__(encoder)
        if getattr(encoder, "family", None) != "encoder":
            raise LmforgeError(f"a cross-encoder is built on an encoder (lmforge pretrain --arch encoder), "
                               f"not a {getattr(encoder, 'family', '?')} model")
        self._freeze_output_layer(encoder)
        self.score_head = nn.Linear(encoder.hidden_size, 1, device=encoder.device)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) float32 scores of right-padded pair rows."""
        pooled = self.model.embed_texts(ids, mask)
        return self.score_head(pooled).squeeze(-1).float()


def listwise_loss(scores: torch.Tensor, group: int):
    """(loss, accuracy) of scores laid out as groups of `group` (positive first): the cross-entropy
    of the positive under a softmax over its group, and the share of groups it tops."""
    s = scores.view(-1, group)
    labels = torch.zeros(s.size(0), dtype=torch.long, device=s.device)
    return F.cross_entropy(s, labels), tops(s, labels)


class Reranker:
    """A trained cross-encoder: scores(query, passages) and rerank(query, hits)."""

    def __init__(self, path, device: str = "cpu", batch_size: int = 32):
        from lmforge.models.registry import build_model
        from lmforge.train.checkpoint import checkpoint_family, checkpoint_model_config, load_model_weights

        self.checkpoint, state, self.tok = _load_run(path, "cross-encoder")
        encoder = build_model(checkpoint_family(state), checkpoint_model_config(self.checkpoint, state))
        self.model = CrossEncoder(encoder)
        load_model_weights(self.model, self.checkpoint)
        self.model.to(device).eval()
        self.query_len, self.pair_len = int(state["query_len"]), int(state["pair_len"])
        self.batch_size = batch_size
        self.name = f"lmforge re-ranker ({Path(path).name})"

    @torch.no_grad()
    def scores(self, query: str, passages: list[str]) -> np.ndarray:
        q = self.tok.encode(query)[: self.query_len]
        rows = [pair_ids(self.tok, q, self.tok.encode(p), self.pair_len) for p in passages]
        out = np.zeros(len(rows), dtype=np.float32)
        for k in range(0, len(rows), self.batch_size):
            ids, mask = pad_rows(rows[k:k + self.batch_size], self.tok.pad_id, self.model.device)
            out[k:k + self.batch_size] = self.model(ids, mask).cpu().numpy()
        return out


class RerankedRetriever:
    """A first-stage retriever whose top `depth` documents per query a cross-encoder re-orders (the
    retriever interface of lmforge/retrieval/evaluate.py: index, search, describe, name). Documents
    below the depth keep their first-stage order after the re-ranked ones. A first stage already
    indexed over the same documents is not indexed again (its index time is reported)."""

    def __init__(self, first, reranker: Reranker, depth: int = 20):
        self.first, self.reranker, self.depth = first, reranker, depth
        self.name = f"{first.name} + re-rank"
        self.rerank_seconds = 0.0

    def describe(self) -> str:
        return f"{self.first.describe()}, top {self.depth} re-ranked by {self.reranker.name}"

    def index(self, doc_ids: list[str], texts: list[str]) -> float:
        self.texts = dict(zip(doc_ids, texts))
        if list(getattr(self.first, "doc_ids", [])) == list(doc_ids):
            return self.first.index_seconds
        return self.first.index(doc_ids, texts)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        results = self.first.search(queries, max(k, self.depth))
        out = []
        t0 = time.perf_counter()
        for q, hits in zip(queries, results):
            top, rest = hits[: self.depth], hits[self.depth:]
            if top:
                s = self.reranker.scores(q, [self.texts[d] for d, _ in top])
                order = sorted(range(len(top)), key=lambda i: (-s[i], i))
                # re-ranked documents first, each above everything below the depth
                floor = min((sc for _, sc in rest), default=0.0)
                top = [(top[i][0], float(floor + 1 + len(top) - r)) for r, i in enumerate(order)]
            out.append((top + rest)[:k])
        self.rerank_seconds += time.perf_counter() - t0
        return out
