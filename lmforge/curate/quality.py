"""The model-based quality score: a small classifier trained to tell reference text (books,
encyclopaedia articles) from raw web text; P(reference) is the document's score.

The classifier is fastText's (Joulin et al. 2017), written here in numpy: a document's word unigrams
and bigrams are hashed into `buckets` rows of an embedding table, their embeddings are averaged, and a
logistic output turns the average into P(reference). It is trained by plain SGD, one document at a
time, with the learning rate decayed linearly to zero, as fastText trains.

With one output, averaged embeddings dotted with the output vector w are the average of the
per-bucket scalars E @ w, so the trained model *is* a logistic regression over the bag of hashed
n-grams (each n-gram's share of the document). Training keeps fastText's factorised form (its
low-rank parametrisation is what fastText's defaults are tuned for); scoring and the saved file use
the product E @ w, one float per bucket, so scoring is a table look-up and a mean per document.

Tokens are lowercased runs of letters, runs of digits (all numbers are one token) and single
punctuation marks, so "word ," and "word," give the same tokens: spacing conventions of one corpus
(tokenised Wikipedia, for one) are not a signal the model can learn.

Documents of very different lengths would make length the easiest signal (whole books against web
pages), so both classes are cut into chunks of about `chunk_chars` characters before training.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_json, read_json

FORMAT = "lmforge-quality-model"
VERSION = 1
TOKENIZER = "lower-letters-digits-punct/crc32/uni+bigram-v1"  # changes to _ngram_ids must change this name


@dataclass
class QualityModelConfig:
    # off by default: it needs reference text (the pipeline turns it on when `reference` is given)
    enabled: bool = False
    # files / folders / globs of reference text, read with lmforge.data.sources.iter_documents
    reference: tuple[str, ...] = ()
    buckets: int = 1 << 20  # hash space for unigrams and bigrams (fastText's default is 2M)
    dim: int = 16  # embedding size; with one output any size gives the same kind of model (see above)
    epochs: int = 5  # fastText's default
    lr: float = 0.5  # initial SGD learning rate, decayed linearly to 0
    max_train_docs: int = 10_000  # training chunks per class, sampled at random when there are more
    chunk_chars: int = 2_000  # both classes are cut into chunks of about this size (a web page's median)
    heldout_fraction: float = 0.1  # share of each class held out (by whole source document) for metrics
    # The decision: a document is kept when it is among the top keep_fraction of documents by score
    # AND its score is at least `threshold`. By default the better half, whatever the scores: a
    # probability depends on how far the reference is from the web (books vs web pages: nearly every
    # page scores < 0.5), a rank does not. DCLM keeps its top 10%; threshold-only: keep_fraction = 1.0.
    threshold: float = 0.0
    keep_fraction: float = 0.5

    def __post_init__(self):
        checks = [
            (self.buckets >= 2, f"buckets must be at least 2, got {self.buckets}"),
            (self.dim >= 1, f"dim must be positive, got {self.dim}"),
            (self.epochs >= 1, f"epochs must be positive, got {self.epochs}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.max_train_docs >= 1, f"max_train_docs must be positive, got {self.max_train_docs}"),
            (self.chunk_chars >= 100, f"chunk_chars must be at least 100, got {self.chunk_chars}"),
            (0.0 <= self.heldout_fraction <= 0.5, f"heldout_fraction must be in [0, 0.5], got {self.heldout_fraction}"),
            (0.0 <= self.threshold <= 1.0, f"threshold must be a probability in [0, 1], got {self.threshold}"),
            (0.0 < self.keep_fraction <= 1.0,
             f"keep_fraction must be in (0, 1], got {self.keep_fraction}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# -- text to hashed n-grams -------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W\d_]+|\d+|[^\w\s]|_")
_HASHES: dict[str, int] = {}  # token -> crc32, per process; cleared when large (words are Zipfian: hits dominate)
_NUMBER = zlib.crc32(b"0")
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)


def _token_hash(token: str) -> int:
    h = _NUMBER if token[0].isdigit() else zlib.crc32(token.encode("utf-8", "replace"))
    if len(_HASHES) > 1_000_000:
        _HASHES.clear()
    _HASHES[token] = h
    return h


def _ngram_ids(text: str, buckets: int) -> np.ndarray:
    """The bucket of every unigram and bigram of text (repeats kept: the mean weighs them by count)."""
    tokens = _TOKEN.findall(text.lower())
    get = _HASHES.get
    h = np.array([get(t) or _token_hash(t) for t in tokens], dtype=np.uint64)
    # a bigram's hash mixes its two tokens' hashes (splitmix-style) so (a, b) and (b, a) differ
    pair = h[:-1] * _MIX1 + h[1:]
    pair ^= pair >> np.uint64(31)
    pair *= _MIX2
    pair ^= pair >> np.uint64(29)
    return (np.concatenate([h, pair]) % np.uint64(buckets)).astype(np.int64)


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Text cut into pieces of about chunk_chars characters (between half and 1.5 times), at a line
    break when one is near, else at a space; a text up to 1.5 * chunk_chars stays whole."""
    text = text.strip()
    if len(text) <= chunk_chars * 3 // 2:
        return [text] if text else []
    chunks, start, n = [], 0, len(text)
    while start < n:
        if n - start <= chunk_chars * 3 // 2:
            end = n
        else:
            end = text.find("\n", start + chunk_chars, start + chunk_chars * 3 // 2)
            if end < 0:
                end = text.rfind(" ", start + chunk_chars // 2, start + chunk_chars)
            if end < 0:
                end = start + chunk_chars
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        start = end
    return chunks


def reference_texts(cfg: QualityModelConfig) -> list[str]:
    """Reference documents from cfg.reference (each path read with iter_documents): about enough
    characters for max_train_docs training chunks plus the held-out share, the paths sharing the
    budget equally. A long document gives at most 1/100 of the budget, cut from its middle (past a
    book's front matter, before its index), so a path of books yields many books, not the first few."""
    from lmforge.data.sources import iter_documents

    if not cfg.reference:
        raise LmforgeError("the quality model needs reference text: give one or more reference paths")
    budget = int(cfg.max_train_docs / (1 - cfg.heldout_fraction) * cfg.chunk_chars * 1.25) + 1
    per_path = budget // len(cfg.reference) + 1
    per_doc = max(cfg.chunk_chars * 2, budget // 100)
    docs: list[str] = []
    for path in cfg.reference:
        taken = 0
        for text in iter_documents(path):
            if len(text) > per_doc:
                start = (len(text) - per_doc) // 2
                text = text[start:start + per_doc]
            docs.append(text)
            taken += len(text)
            if taken >= per_path:
                break
    return docs


# -- metrics ----------------------------------------------------------------------------------------

def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count half), by the rank-sum formula; NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, tied scores share their mean rank
    rank_sum = mean_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# -- the classifier ---------------------------------------------------------------------------------

def _split(texts: list[str], cfg: QualityModelConfig, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(training chunks, held-out chunks) of one class. Whole source documents are held out, so no
    passage of a held-out book also trains the model; a class of fewer than 10 documents holds out
    the last part of each instead."""
    docs = [c for c in (chunk_text(t, cfg.chunk_chars) for t in texts) if c]
    total = sum(len(c) for c in docs)
    if cfg.heldout_fraction == 0 or total < 2:
        train, held = [x for c in docs for x in c], []
    elif len(docs) >= 10:
        train, held = [], []
        for i in rng.permutation(len(docs)):
            (held if len(held) < cfg.heldout_fraction * total else train).extend(docs[i])
    else:
        train, held = [], []
        for c in docs:
            cut = len(c) - round(len(c) * cfg.heldout_fraction)
            train.extend(c[:cut])
            held.extend(c[cut:])
    cap_held = max(1, round(cfg.max_train_docs * cfg.heldout_fraction))
    if len(train) > cfg.max_train_docs:
        train = [train[i] for i in sorted(rng.choice(len(train), cfg.max_train_docs, replace=False))]
    if len(held) > cap_held:
        held = [held[i] for i in sorted(rng.choice(len(held), cap_held, replace=False))]
    return train, held


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


class QualityClassifier:
    """P(reference | text). `weights[b]` is the collapsed E @ w of bucket b, `bias` the output bias."""

    def __init__(self, weights: np.ndarray, bias: float, cfg: QualityModelConfig, metrics: dict | None = None):
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.bias = float(bias)
        self.config = cfg
        self.metrics = dict(metrics or {})

    @property
    def buckets(self) -> int:
        return self.weights.shape[0]

    def logits(self, texts) -> np.ndarray:
        ids = [_ngram_ids(t, self.buckets) for t in texts]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        if not len(ids):
            return np.zeros(0)
        owner = np.repeat(np.arange(len(ids)), lengths)
        sums = np.bincount(owner, weights=self.weights[np.concatenate(ids)], minlength=len(ids))
        return sums / np.maximum(lengths, 1) + self.bias  # a text without tokens gets the bias alone

    def score(self, texts) -> np.ndarray:
        """P(reference) of each text (float64 array, same order)."""
        return _sigmoid(self.logits(list(texts)))

    @classmethod
    def train(cls, positive_texts, negative_texts, cfg: QualityModelConfig, seed: int = 0) -> QualityClassifier:
        """Train on reference texts (label 1) against web texts (label 0); `.metrics` records the
        sizes and the held-out accuracy (at P = 0.5) and ROC AUC. The two classes weigh the same in the
        loss however many chunks each has, so P = 0.5 is the even-odds point."""
        rng = np.random.default_rng(seed)
        pos_train, pos_held = _split(list(positive_texts), cfg, rng)
        neg_train, neg_held = _split(list(negative_texts), cfg, rng)
        if not pos_train:
            raise LmforgeError("the quality model has no reference text to train on (empty reference documents?)")
        if not neg_train:
            raise LmforgeError("the quality model has no web text to train on (no document survived the filters?)")

        texts = pos_train + neg_train
        y = np.array([1.0] * len(pos_train) + [0.0] * len(neg_train))
        class_weight = np.where(y == 1, len(texts) / (2 * len(pos_train)), len(texts) / (2 * len(neg_train)))
        labels, weights = y.tolist(), class_weight.tolist()  # Python floats: cheaper in the per-document loop
        # per document: its distinct buckets and each one's share of the document's n-grams
        feats = []
        for t in texts:
            ids, counts = np.unique(_ngram_ids(t, cfg.buckets), return_counts=True)
            feats.append((ids, (counts / max(counts.sum(), 1)).astype(np.float32)))

        dim = cfg.dim
        emb = rng.uniform(-1.0 / dim, 1.0 / dim, size=(cfg.buckets, dim)).astype(np.float32)  # fastText's init
        out = np.zeros(dim, dtype=np.float32)
        bias = 0.0
        steps, step = cfg.epochs * len(texts), 0
        for _ in range(cfg.epochs):
            for i in rng.permutation(len(texts)):
                lr = cfg.lr * (1.0 - step / steps)
                step += 1
                ids, share = feats[i]
                if not len(ids):
                    continue
                rows = np.take(emb, ids, axis=0)  # faster than emb[ids] for a gather
                hidden = share @ rows
                z = min(max(float(hidden @ out) + bias, -30.0), 30.0)
                g = lr * (1.0 / (1.0 + math.exp(-z)) - labels[i]) * weights[i]  # d(weighted log loss)/d(logit) * lr
                emb[ids] = rows - np.float32(g) * share[:, None] * out
                out -= g * hidden
                bias -= g
        model = cls(emb @ out, bias, cfg)
        model.metrics = {"train_reference": len(pos_train), "train_web": len(neg_train),
                         "heldout_reference": len(pos_held), "heldout_web": len(neg_held)}
        # the training chunks are scored from their features (no second tokenisation)
        train_scores = _sigmoid(np.array([share @ model.weights[ids] for ids, share in feats]) + model.bias)
        model.metrics.update(_metrics(train_scores, y, "train"))
        if pos_held and neg_held:
            held_y = np.array([1.0] * len(pos_held) + [0.0] * len(neg_held))
            model.metrics.update(_metrics(model.score(pos_held + neg_held), held_y, "heldout"))
        return model

    def save(self, folder) -> Path:
        """quality.safetensors (the per-bucket weights and the bias) + quality.json (settings, metrics)."""
        from safetensors.numpy import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "quality.safetensors",
                           save({"weights": self.weights, "bias": np.array([self.bias], dtype=np.float64)}))
        atomic_write_json(folder / "quality.json", {"format": FORMAT, "version": VERSION, "tokenizer": TOKENIZER,
                                                    "buckets": self.buckets, "config": asdict(self.config),
                                                    "metrics": self.metrics})
        return folder

    @classmethod
    def load(cls, folder) -> QualityClassifier:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise LmforgeError(f"quality model folder not found: {folder}")
        meta = read_json(folder / "quality.json", "quality model", fmt=FORMAT, version=VERSION)
        if meta.get("tokenizer") != TOKENIZER:
            raise LmforgeError(f"{folder}: the model hashes text as {meta.get('tokenizer')!r}, this lmforge as "
                               f"{TOKENIZER!r}; train it again")
        path = folder / "quality.safetensors"
        if not path.is_file():
            raise LmforgeError(f"quality model weights not found: {path}")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"cannot read {path}: {e}") from None
        buckets = meta.get("buckets")
        weights, bias = tensors.get("weights"), tensors.get("bias")
        if (weights is None or weights.dtype != np.float32 or weights.shape != (buckets,)
                or bias is None or bias.shape != (1,)):
            raise LmforgeError(f"{path} does not hold a weight for each of the {buckets} buckets and a bias "
                               f"(the .json and .safetensors files do not belong together?)")
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise LmforgeError(f"{path} holds non-finite weights")
        known = QualityModelConfig.__dataclass_fields__
        raw = {k: v for k, v in meta.get("config", {}).items() if k in known}
        if "reference" in raw:
            raw["reference"] = tuple(raw["reference"])
        try:
            cfg = QualityModelConfig(**raw)
        except (TypeError, ValueError) as e:
            raise LmforgeError(f"{folder / 'quality.json'}: bad settings: {e}") from None
        return cls(weights, float(bias[0]), cfg, meta.get("metrics"))


def _metrics(scores: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_accuracy": float(((scores >= 0.5) == (labels == 1)).mean()),
            f"{prefix}_auc": roc_auc(scores, labels)}


def quality_keep(scores, cfg: QualityModelConfig) -> np.ndarray:
    """Which documents to keep (bool array, same order as scores): the round(keep_fraction * n)
    highest scores (among equal scores the earlier document wins, so the count is exact even with
    ties), and of those only the ones scoring at least `threshold`."""
    scores = np.asarray(scores, dtype=np.float64)
    k = math.floor(cfg.keep_fraction * len(scores) + 0.5)
    keep = np.zeros(len(scores), dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:k]] = True
    return keep & (scores >= cfg.threshold)
