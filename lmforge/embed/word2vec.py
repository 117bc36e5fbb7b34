"""word2vec (Mikolov et al. 2013), written out by hand: skip-gram and CBOW with negative sampling.

The pieces, in the order the data meets them:

* **Words.** `tokenize` lowercases and keeps runs of letters and digits (`[^\\W_]+`): punctuation,
  apostrophes and hyphens separate words ("don't" -> "don", "t"; "hill-side" -> "hill", "side").
  A sentence is a paragraph of plain text (lines up to a blank line; `unit="line"`: one line, as
  word2vec's C tool and gensim's LineSentence read a file), cut into pieces of at most 10,000 words
  (the same cap as both). Context windows never cross a sentence.
* **Vocabulary.** Words seen at least `min_count` times (at most `max_vocab` of them), most frequent
  first; the others are dropped from the text before windows are taken, as in the original.
* **Subsampling.** Each epoch a word of corpus frequency f = count / total is kept with probability
  min(1, (sqrt(f / t) + 1) * t / f) (t = `sample`): Mikolov's formula as the C tool and gensim apply
  it, which keeps more than the paper's 1 - sqrt(t / f).
* **Windows.** For each kept word a window size b is drawn uniformly from 1..`window` (the original's
  "reduced window": near words count more often) and its context is the kept words within b positions.
* **Skip-gram:** each (context word, word) pair is an example: the context word's input vector scores
  the word's output vector against `negative` noise words drawn from unigram^0.75 (a noise word
  equal to the target is ignored, as in the original). **CBOW:** the mean of the context's input
  vectors scores the word. Loss per example: -log sigma(u_o . h) - sum_k log sigma(-u_k . h).
* **Updates.** Plain SGD on two tables (input vectors, initialised uniform in +-0.5/dim; output vectors,
  initialised to zero), the learning rate falling linearly from `lr` to `min_lr` over the run. The
  gradients are derived by hand (see `sgns_step`) and a batch of examples is applied at once with
  `index_add_` (rows that several examples touch receive the sum, like the C tool's lock-free threads).

`Word2Vec.save` writes a folder: vectors.safetensors (tensors "input" and "output") and vocab.json
(words, counts, settings, training statistics); `export_text` writes the word2vec text format.

This file is long because it is the algorithm from text to trained vectors in the order above, each
piece small and used only by the next; split up, a reader would jump between files to follow one pass.
"""
from __future__ import annotations

import gzip
import math
import re
import time
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_json, read_json
from lmforge.embed.config import CorpusOptions, Word2VecConfig
from lmforge.embed.vectors import WordVectors

WORD_RE = re.compile(r"[^\W_]+")
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
MAX_SENTENCE_WORDS = 10_000  # the C tool's and gensim's cap: longer sentences are cut into pieces
NOISE_POWER = 0.75  # unigram^0.75: rare words are drawn as noise more often than their frequency
FORMAT, VERSION = "lmforge-word2vec", 1
CHUNK_WORDS = 200_000  # corpus words turned into training examples at a time (bounded memory)


def tokenize(text: str) -> list[str]:
    """Lowercase words: runs of letters and digits."""
    return WORD_RE.findall(text.lower())


# ----------------------------------------------------------------------------- reading text


def text_sentences(text: str, unit: str = "paragraph") -> Iterator[list[str]]:
    """The sentences (word lists, at most MAX_SENTENCE_WORDS each) of a text."""
    parts = PARAGRAPH_BREAK.split(text) if unit == "paragraph" else text.splitlines()
    for part in parts:
        yield from _pieces(tokenize(part))


def _pieces(words: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(words), MAX_SENTENCE_WORDS):
        yield words[i:i + MAX_SENTENCE_WORDS]


def _plain_text_blocks(path: Path, unit: str) -> Iterator[str]:
    """Paragraphs (or lines) of a .txt or gzipped text file, streamed line by line."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            if unit == "line":
                yield from f
                return
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not valid UTF-8 text: {e}") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise LmforgeError(f"cannot read {path}: {e}") from None


def read_sentences(sources: Iterable[str], options: CorpusOptions | None = None) -> Iterator[list[str]]:
    """Sentences of words from data sources: plain-text files (.txt, and gzipped text such as .txt.gz)
    are streamed here; anything else (.jsonl[.gz], .json, .parquet, folders, globs) goes through the
    pretraining data reader (lmforge.data.sources.iter_documents, field `text_field`). Every source is
    checked now (a missing file is an error before any reading), and read lazily."""
    from lmforge.data.sources import iter_documents

    o = options or CorpusOptions()
    streams = []
    for spec in sources:
        path = Path(str(spec)).expanduser()
        name = path.name.lower()
        if path.is_file() and (name.endswith(".txt") or (name.endswith(".gz") and not name.endswith(".jsonl.gz"))):
            # each block is one paragraph (or line) already
            streams.append(s for block in _plain_text_blocks(path, o.unit) for s in _pieces(tokenize(block)))
        else:
            docs = iter_documents(spec, text_field=o.text_field)
            streams.append(s for doc in docs for s in text_sentences(doc, o.unit))
    return _limited(streams, o.max_words)


def _limited(streams, max_words: int | None) -> Iterator[list[str]]:
    left = max_words
    for stream in streams:
        for words in stream:
            if not words:
                continue
            if left is not None:
                words = words[:left]
                left -= len(words)
            yield words
            if left is not None and left <= 0:
                return


# ----------------------------------------------------------------------------- vocabulary and corpus


@dataclass
class Corpus:
    """A corpus as word ids: the in-vocabulary words of every sentence, end to end (int32), and where
    each sentence starts (offsets[i]:offsets[i+1] is sentence i; empty sentences are dropped)."""

    words: list[str]  # the vocabulary, most frequent first
    counts: np.ndarray  # int64, count of each vocabulary word in the corpus
    ids: np.ndarray  # int32, the corpus
    offsets: np.ndarray  # int64, len = sentences + 1
    raw_words: int  # words read, out-of-vocabulary ones included (what words/second counts)

    @property
    def n_sentences(self) -> int:
        return len(self.offsets) - 1


def build_corpus(sentences: Iterable[list[str]], min_count: int = 5, max_vocab: int | None = None,
                 progress: bool = False) -> Corpus:
    """One pass over the sentences: count the words, keep those seen min_count times or more (the
    max_vocab most frequent, ties in order of first appearance) and encode the corpus with them."""
    from tqdm import tqdm

    first_seen: dict[str, int] = {}  # word -> provisional id, in order of first appearance
    ids = array("i")
    lengths = array("q")
    bar = tqdm(desc="reading", unit=" words", unit_scale=True, disable=None if progress else True)
    for words in sentences:
        new = first_seen.setdefault
        ids.extend([new(w, len(first_seen)) for w in words])
        lengths.append(len(words))
        bar.update(len(words))
    bar.close()
    raw = np.frombuffer(ids, dtype=np.int32) if len(ids) else np.zeros(0, np.int32)
    if not len(raw):
        raise LmforgeError("the data contains no words")
    counts = np.bincount(raw, minlength=len(first_seen))
    order = np.argsort(-counts, kind="stable")  # most frequent first; ties by first appearance
    order = order[counts[order] >= min_count]
    if max_vocab is not None:
        order = order[:max_vocab]
    if not len(order):
        raise LmforgeError(f"no word occurs min_count={min_count} times in the data ({len(raw):,} words, "
                           f"{len(first_seen):,} distinct); lower --min-count or give more data")
    remap = np.full(len(first_seen), -1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    mapped = remap[raw]
    keep = mapped >= 0
    sentence_of = np.repeat(np.arange(len(lengths)), np.frombuffer(lengths, dtype=np.int64))
    kept_lengths = np.bincount(sentence_of[keep], minlength=len(lengths))
    kept_lengths = kept_lengths[kept_lengths > 0]
    words_by_id = list(first_seen)
    return Corpus(words=[words_by_id[i] for i in order], counts=counts[order].astype(np.int64),
                  ids=mapped[keep].astype(np.int32),
                  offsets=np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64),
                  raw_words=int(len(raw)))


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """The probability that subsampling keeps each occurrence of a word of these counts: with
    threshold t * total (total = all in-vocabulary words), (sqrt(count / (t*total)) + 1) * t*total / count,
    capped at 1; 1 everywhere when sample is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    if sample <= 0:
        return np.ones(len(counts))
    threshold = sample * counts.sum()
    return np.minimum(1.0, (np.sqrt(counts / threshold) + 1.0) * threshold / counts)


def subsample(ids: np.ndarray, keep_p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The positions of `ids` that one pass of subsampling keeps (each independently, with keep_p[id])."""
    return np.flatnonzero(rng.random(len(ids)) < keep_p[ids])


def noise_distribution(counts: np.ndarray, power: float = NOISE_POWER) -> np.ndarray:
    """P(noise word = w) proportional to count(w)^power."""
    weights = np.asarray(counts, dtype=np.float64) ** power
    return weights / weights.sum()


# ----------------------------------------------------------------------------- examples


def _sentence_chunks(offsets: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[lo, hi) word ranges of about `size` words that start and end at sentence boundaries."""
    n = int(offsets[-1])
    cuts = offsets[np.searchsorted(offsets, np.arange(size, n, size))] if n > size else np.zeros(0, np.int64)
    bounds = np.unique(np.concatenate([[0], cuts, [n]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def context_windows(sentence: np.ndarray, window: int, rng: np.random.Generator):
    """For a run of words (sentence ids per position), the contexts of every position: (ctx, ok),
    both (n, 2*window): ctx[i, j] is a position near i and ok[i, j] says whether it is in i's context,
    i.e. within i's reduced window b_i ~ uniform{1..window} and in the same sentence."""
    n = len(sentence)
    offsets = np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)])
    reduced = rng.integers(1, window + 1, size=n)
    ctx = np.arange(n)[:, None] + offsets[None, :]
    ok = (np.abs(offsets)[None, :] <= reduced[:, None]) & (ctx >= 0) & (ctx < n)
    ctx = np.clip(ctx, 0, max(n - 1, 0))
    ok &= sentence[ctx] == sentence[:, None]
    return ctx, ok


# ----------------------------------------------------------------------------- the updates


def sgns_step(w_in, w_out, inputs, targets, noise, lr: float, *, hidden=None, scatter=None):
    """One SGD step of negative sampling on a batch, gradients by hand; returns the summed loss.

    Example b scores h_b (the input vector of inputs[b], or `hidden[b]` for CBOW) against the output
    vectors of targets[b] (label 1) and noise[b, :] (label 0). With s = u . h, the loss
    -log sigma(s) (label 1) or -log sigma(-s) (label 0) has d loss / d s = sigma(s) - label, so SGD
    adds g = lr * (label - sigma(s)) times h to u and times u to h. A noise word equal to the target
    contributes nothing (the original skips it). `scatter` (CBOW): (rows, context ids) -- each context
    word receives its window's whole gradient of h, as the C tool and gensim do (not divided by the
    window's size)."""
    import torch
    import torch.nn.functional as F

    b = len(targets)
    h = w_in.index_select(0, inputs) if hidden is None else hidden
    out_ids = torch.cat([targets[:, None], noise], 1)  # (B, 1 + k)
    u = w_out.index_select(0, out_ids.view(-1)).view(b, out_ids.shape[1], -1)
    s = (u * h[:, None, :]).sum(-1)  # (B, 1 + k)
    counted = (noise != targets[:, None]).to(s.dtype)
    loss = -(F.logsigmoid(s[:, 0]).sum() + (F.logsigmoid(-s[:, 1:]) * counted).sum())
    g = torch.sigmoid(s).neg_()
    g[:, 0] += 1.0  # label - sigma(s): label 1 for the target, 0 for noise
    g[:, 1:] *= counted
    g *= lr
    grad_h = torch.bmm(g[:, None, :], u)[:, 0]  # computed before w_out changes
    w_out.index_add_(0, out_ids.view(-1), (g[:, :, None] * h[:, None, :]).view(-1, h.shape[1]))
    if scatter is None:
        w_in.index_add_(0, inputs, grad_h)
    else:
        rows, ids = scatter
        w_in.index_add_(0, ids, grad_h.index_select(0, rows))
    return float(loss)


class _NoiseSampler:
    """Draws noise words from a distribution in O(1) per draw with Walker's alias method (exact up to
    float rounding): pick a slot uniformly, keep its word with the slot's probability, else take the
    slot's alias."""

    def __init__(self, probs: np.ndarray):
        import torch

        n = len(probs)
        scaled = np.asarray(probs, dtype=np.float64) * n
        keep, alias = np.ones(n), np.arange(n)
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:  # fill each under-full slot with mass from an over-full one
            s, g = small.pop(), large.pop()
            keep[s], alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        self.keep = torch.from_numpy(keep).float()
        self.alias = torch.from_numpy(alias)

    def __call__(self, shape, generator):
        import torch

        slot = torch.randint(len(self.alias), shape, generator=generator)
        take = torch.rand(shape, generator=generator) < self.keep[slot]
        return torch.where(take, slot, self.alias[slot])


# ----------------------------------------------------------------------------- the model


class Word2Vec:
    """Trained word2vec: the vocabulary (most frequent first), both tables, settings and statistics.
    `wv` (the input vectors, as the C tool and gensim publish) answers queries."""

    def __init__(self, words: list[str], counts, input_vectors, output_vectors, config: Word2VecConfig,
                 stats: dict | None = None):
        self.words = list(words)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.input_vectors = input_vectors  # torch float32 (V, dim)
        self.output_vectors = output_vectors
        self.config = config
        self.stats = stats or {}
        self._wv = None

    @property
    def wv(self) -> WordVectors:
        if self._wv is None:
            self._wv = WordVectors(self.words, self.input_vectors.numpy(), self.counts)
        return self._wv

    def save(self, out_dir) -> Path:
        from safetensors.torch import save

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "vectors.safetensors", save({"input": self.input_vectors.contiguous(),
                                                              "output": self.output_vectors.contiguous()}))
        atomic_write_json(out / "vocab.json", {"format": FORMAT, "version": VERSION, "config": asdict(self.config),
                                               "stats": self.stats, "words": self.words,
                                               "counts": self.counts.tolist()})
        return out

    @classmethod
    def load(cls, folder) -> Word2Vec:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise LmforgeError(f"word2vec folder not found: {folder}")
        meta = read_json(folder / "vocab.json", "word2vec vocabulary", fmt=FORMAT, version=VERSION)
        path = folder / "vectors.safetensors"
        if not path.is_file():
            raise LmforgeError(f"word2vec vectors not found: {path}")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"cannot read {path}: {e}") from None
        words, counts = meta.get("words"), meta.get("counts")
        if not isinstance(words, list) or not isinstance(counts, list) or len(words) != len(counts):
            raise LmforgeError(f"{folder / 'vocab.json'}: words and counts must be lists of the same length")
        for name in ("input", "output"):
            if name not in tensors or tuple(tensors[name].shape[:1]) != (len(words),):
                raise LmforgeError(f"{path}: no {name!r} table with one row for each of the {len(words)} words")
        known = Word2VecConfig.__dataclass_fields__
        config = Word2VecConfig(**{k: v for k, v in meta.get("config", {}).items() if k in known})
        return cls(words, counts, tensors["input"], tensors["output"], config, meta.get("stats"))

    def export_text(self, path) -> Path:
        """The word2vec text format: a "count dim" line, then "word v1 v2 ..." per word."""
        vectors = self.input_vectors.numpy()
        lines = [f"{len(self.words)} {vectors.shape[1]}"]
        lines += [w + " " + " ".join(f"{x:.6g}" for x in row) for w, row in zip(self.words, vectors.tolist())]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        return Path(path)


def train(corpus: Corpus, config: Word2VecConfig | None = None) -> Word2Vec:
    """Train word2vec on an encoded corpus (see the module docstring for the algorithm).

    The corpus is cut into pieces of about CHUNK_WORDS words at sentence ends; a piece of one epoch
    is a task with its own random streams (subsampling, windows, noise), so its draws do not depend
    on which thread runs it. `workers` threads take tasks in corpus order and update the shared tables
    without locks (Hogwild, as the C tool and gensim do: a row written by both at once may lose one
    of the two updates). Torch runs each operation on one thread: a batch's operations are too small
    for intra-op threads to pay (on 2 cores they made a run twice as slow; docs/embeddings.md)."""
    import torch
    from tqdm import tqdm

    cfg = config or Word2VecConfig()
    if cfg.min_lr > cfg.lr:
        raise LmforgeError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    V, n = len(corpus.words), len(corpus.ids)
    gen = torch.Generator().manual_seed(cfg.seed % 2**63)
    w_in = (torch.rand(V, cfg.dim, generator=gen) - 0.5) / cfg.dim
    w_out = torch.zeros(V, cfg.dim)
    keep_p = keep_probabilities(corpus.counts, cfg.sample)
    sampler = _NoiseSampler(noise_distribution(corpus.counts))
    sentence_of = np.repeat(np.arange(corpus.n_sentences, dtype=np.int32), np.diff(corpus.offsets))
    chunks = _sentence_chunks(corpus.offsets, CHUNK_WORDS)
    tasks = [(epoch, i, lo, hi) for epoch in range(cfg.epochs) for i, (lo, hi) in enumerate(chunks)]
    total = max(cfg.epochs * n, 1)
    step = _skipgram_chunk if cfg.model == "sg" else _cbow_chunk

    def run(task) -> tuple[float, int]:
        epoch, i, lo, hi = task
        rng = np.random.default_rng([cfg.seed % 2**64, epoch, i])
        task_gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        kept = subsample(corpus.ids[lo:hi], keep_p, rng) + lo
        ctx, ok = context_windows(sentence_of[kept], cfg.window, rng)
        done = (epoch * n + kept) / total  # each kept word's progress through the run: the learning rate's clock
        with torch.no_grad():  # grad mode is per thread
            return step(cfg, w_in, w_out, lambda shape: sampler(shape, task_gen), corpus.ids[kept], ctx, ok, done)

    first_loss = (1 + cfg.negative) * math.log(2)  # every score is 0 at the start (output vectors are 0)
    sums, counts = np.zeros(cfg.epochs), np.zeros(cfg.epochs, dtype=np.int64)
    bar = tqdm(total=cfg.epochs * corpus.raw_words, unit=" words", unit_scale=True,
               disable=None if cfg.progress else True,  # None: no bar where stderr is not a terminal
               desc=f"word2vec {cfg.model}")
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)
        for (epoch, i, lo, hi), (loss, examples) in zip(tasks, pool.map(run, tasks) if pool else map(run, tasks)):
            if examples and not loss / examples < 3 * first_loss:  # NaN too
                raise LmforgeError(f"training diverged: loss {loss / examples:.3g} per example in epoch {epoch + 1} "
                                   f"(it starts at {first_loss:.2f}); lower --batch-size (the summed updates of "
                                   "frequent words overshoot) or --lr")
            sums[epoch] += loss
            counts[epoch] += examples
            bar.update(round((hi - lo) * corpus.raw_words / max(n, 1)))
            if i == len(chunks) - 1:
                bar.set_postfix(loss=f"{sums[epoch] / max(counts[epoch], 1):.4f}")
                if cfg.progress:
                    tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {sums[epoch] / max(counts[epoch], 1):.4f} "
                               f"per example ({counts[epoch]:,} examples)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)
        bar.close()
    seconds = time.perf_counter() - start
    stats = {"train_seconds": seconds, "words_per_second": cfg.epochs * corpus.raw_words / max(seconds, 1e-9),
             "raw_words": corpus.raw_words, "corpus_words": n, "sentences": corpus.n_sentences, "vocab": V,
             "examples": int(counts.sum()), "epoch_loss": (sums / np.maximum(counts, 1)).tolist(),
             "workers": cfg.workers}
    return Word2Vec(corpus.words, corpus.counts, w_in, w_out, cfg, stats)


def _skipgram_chunk(cfg, w_in, w_out, sampler, words, ctx, ok, done) -> tuple[float, int]:
    """Skip-gram on a run of kept words: every (context word, word) pair in corpus order, in batches;
    returns (summed loss, examples)."""
    import torch

    rows, cols = np.nonzero(ok)  # row-major: the pairs of one word follow each other, in corpus order
    inputs = torch.from_numpy(words[ctx[rows, cols]].astype(np.int64))
    targets = torch.from_numpy(words[rows].astype(np.int64))
    noise = sampler((len(rows), cfg.negative))  # drawn at once: fewer small operations per batch
    loss = 0.0
    for b0 in range(0, len(rows), cfg.batch_size):
        b1 = min(b0 + cfg.batch_size, len(rows))
        loss += sgns_step(w_in, w_out, inputs[b0:b1], targets[b0:b1], noise[b0:b1], _lr(cfg, done[rows[b0]]))
    return loss, len(rows)


def _cbow_chunk(cfg, w_in, w_out, sampler, words, ctx, ok, done) -> tuple[float, int]:
    """CBOW on a run of kept words: every word that has a context, in batches of words; returns
    (summed loss, examples)."""
    import torch

    sizes = ok.sum(1)
    centers = np.flatnonzero(sizes)  # a word without context teaches nothing
    rows, cols = np.nonzero(ok[centers])  # its context words follow each other
    ctx_ids = torch.from_numpy(words[ctx[centers][rows, cols]].astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(sizes[centers])])
    targets = torch.from_numpy(words[centers].astype(np.int64))
    inv_size = torch.from_numpy(1.0 / sizes[centers]).float()
    rows = torch.from_numpy(rows.astype(np.int64))
    noise = sampler((len(centers), cfg.negative))
    loss = 0.0
    for b0 in range(0, len(centers), cfg.batch_size):
        b1 = min(b0 + cfg.batch_size, len(centers))
        c0, c1 = int(starts[b0]), int(starts[b1])
        r, ids = rows[c0:c1] - b0, ctx_ids[c0:c1]
        hidden = torch.zeros(b1 - b0, cfg.dim).index_add_(0, r, w_in.index_select(0, ids))
        hidden *= inv_size[b0:b1, None]  # the mean of the context vectors
        loss += sgns_step(w_in, w_out, None, targets[b0:b1], noise[b0:b1], _lr(cfg, done[centers[b0]]),
                          hidden=hidden, scatter=(r, ids))
    return loss, len(centers)


def _lr(cfg: Word2VecConfig, progress: float) -> float:
    """Linear decay from lr to min_lr as the run goes from progress 0 to 1 (words of all epochs)."""
    return cfg.lr - (cfg.lr - cfg.min_lr) * min(1.0, float(progress))


def train_word2vec(sentences: Iterable[list[str]], config: Word2VecConfig | None = None) -> tuple[Word2Vec, Corpus]:
    """Build the vocabulary and corpus from sentences of words, then train."""
    cfg = config or Word2VecConfig()
    corpus = build_corpus(sentences, cfg.min_count, cfg.max_vocab, progress=cfg.progress)
    return train(corpus, cfg), corpus


def read_word2vec_text(path) -> WordVectors:
    """Vectors in the word2vec text format (what `Word2Vec.export_text` writes)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().split()
            if len(header) != 2 or not all(h.isdigit() for h in header):
                raise LmforgeError(f"{path}: the first line must be '<words> <dimension>'")
            n, dim = map(int, header)
            words, rows = [], []
            for lineno, line in enumerate(f, 2):
                parts = line.rstrip().split(" ")  # the C tool ends each line with a space
                if len(parts) != dim + 1:
                    raise LmforgeError(f"{path}:{lineno}: expected a word and {dim} numbers")
                words.append(parts[0])
                rows.append([float(x) for x in parts[1:]])
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    if len(words) != n:
        raise LmforgeError(f"{path}: the header says {n} words, the file has {len(words)}")
    return WordVectors(words, np.asarray(rows, dtype=np.float32).reshape(n, dim))


def summary(model: Word2Vec) -> str:
    s = model.stats
    return (f"{s.get('vocab', len(model.words)):,} words x {model.config.dim}, {s.get('raw_words', 0):,} corpus words "
            f"x {model.config.epochs} epochs in {s.get('train_seconds', 0):.1f} s "
            f"({s.get('words_per_second', 0):,.0f} words/s), final loss {s.get('epoch_loss', [math.nan])[-1]:.4f}")

