"""Tokenize a document source into binary shards plus a manifest (`lmforge data prepare`).

Layout of a prepared data folder:

    manifest.json            what was made, from what, with which tokenizer (written last)
    train_000.bin, ...       raw little-endian token ids (uint16, or uint32 for vocabularies > 65536)
    val_000.bin, ...

Each document is stored as `[bos] + tokens`; a split is the concatenation of its shards, so a
document may continue from one shard into the next.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, atomic_write_json, read_json
from lmforge.data.sources import SourceStats, iter_documents

MANIFEST_NAME = "manifest.json"
FORMAT = "lmforge-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")

# Corpora with at most this many documents get an exact val count (smallest hashes); larger
# ones are split by a streaming hash threshold, so they never need to be held in memory.
SMALL_CORPUS_DOCS = 1000

# Work unit sent to a tokenizer worker: whichever limit is reached first.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 256


def shard_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype that holds every id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def doc_hash_fraction(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document (blake2b of its UTF-8 text). Unlike
    Python's hash() it is the same in every process and run, so the split is reproducible."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(docs: Iterator[str], val_fraction: float) -> tuple[str, Iterator[tuple[str, str]]]:
    """Assign each document to "train" or "val" deterministically; returns (rule, (split, text)...).

    The first SMALL_CORPUS_DOCS + 1 documents are buffered to choose the rule:

    - n <= SMALL_CORPUS_DOCS documents and round(n * val_fraction) >= 1: exactly that many
      documents go to val, those with the smallest hashes (a plain hash threshold could give
      zero val documents on a small corpus);
    - fewer documents than that (in particular a single one): too few to split whole documents,
      so split by characters: the last `val_fraction` of the characters (of the documents in
      order) go to val, cutting the document where the boundary falls. For one document with
      0.1 this is nanoGPT's first-90% / last-10% split;
    - more than SMALL_CORPUS_DOCS: streaming rule, a document is val when its hash fraction <
      val_fraction.
    Documents keep their original order within each split."""
    docs = iter(docs)
    if val_fraction <= 0:
        return "none", (("train", d) for d in docs)
    head = list(islice(docs, SMALL_CORPUS_DOCS + 1))
    n = len(head)
    if n > SMALL_CORPUS_DOCS:
        return "hash-threshold", (
            ("val" if doc_hash_fraction(d) < val_fraction else "train", d) for d in chain(head, docs)
        )
    k = round(n * val_fraction)
    if k == 0 or n == 1:
        return "chars", _split_by_chars(head, val_fraction)
    # Keep at least one training document even for an absurd val_fraction.
    k = min(k, n - 1)
    by_hash = sorted(range(n), key=lambda i: (doc_hash_fraction(head[i]), i))
    val_ids = set(by_hash[:k])
    return "smallest-hash", (("val" if i in val_ids else "train", d) for i, d in enumerate(head))


def _split_by_chars(docs: list[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    cut = int(sum(map(len, docs)) * (1 - val_fraction))  # stream position where val begins
    pos = 0
    for d in docs:
        if pos + len(d) <= cut:
            yield "train", d
        elif pos >= cut:
            yield "val", d
        else:
            yield "train", d[: cut - pos]
            yield "val", d[cut - pos :]
        pos += len(d)


def _batches(labelled: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for split, text in labelled:
        if not text:  # e.g. the val part of a one-character document
            continue
        batch.append((split, text))
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(tok, batch: list[tuple[str, str]], dtype: np.dtype) -> dict:
    """Tokenize one batch; per split: the concatenated `[bos] + tokens` arrays, doc and byte counts."""
    ids = tok.encode_batch([text for _, text in batch])
    out = {}
    for split in SPLITS:
        rows = [(text, toks) for (s, text), toks in zip(batch, ids) if s == split]
        if not rows:
            continue
        total = sum(len(toks) + 1 for _, toks in rows)
        flat = chain.from_iterable(chain((tok.bos_id,), toks) for _, toks in rows)
        out[split] = (
            np.fromiter(flat, dtype=dtype, count=total),
            len(rows),
            sum(len(text.encode("utf-8")) for text, _ in rows),
        )
    return out


# Per-worker-process state, set once by the pool initializer.
_worker: dict = {}


def _init_worker(tokenizer_path: str, fingerprint: str, dtype: str) -> None:
    # An exception escaping a Pool initializer makes the pool respawn workers forever, so
    # remember it and report it from the first task instead.
    try:
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_path)
        if tok.fingerprint != fingerprint:
            raise LmforgeError(f"tokenizer {tokenizer_path} changed while data prepare was running")
        _worker.update(tok=tok, dtype=np.dtype(dtype), error=None)
    except Exception as e:
        _worker.update(tok=None, error=LmforgeError(f"tokenizer worker failed to start: {e}"))


def _worker_encode(batch: list[tuple[str, str]]) -> dict:
    if _worker.get("error") is not None:
        raise _worker["error"]
    return _encode_batch(_worker["tok"], batch, _worker["dtype"])


class _ShardWriter:
    """Appends tokens of one split to `{split}_000.bin`, `{split}_001.bin`, ..., starting a new
    file every `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self.bytes = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece = tokens[pos : pos + room]
            self._file.write(piece.tobytes())
            self.shards[-1]["tokens"] += len(piece)
            pos += len(piece)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": self.documents,
            "bytes": self.bytes,
        }


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
        # Remove the old manifest first: from now until the new one is written, the folder
        # must not look like a finished dataset. Old shards could outnumber the new ones.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for split in SPLITS:
            for old in out.glob(f"{split}_*.bin"):
                old.unlink()
    except OSError as e:
        raise LmforgeError(f"cannot write to output folder {out}: {e}") from None
    return out


def _load_tokenizer(tokenizer_path):
    from lmforge.tokenizer import Tokenizer

    path = Path(tokenizer_path).expanduser()
    if not path.exists():
        raise LmforgeError(f"tokenizer not found: {path} (train one with `lmforge tokenizer train`)")
    return Tokenizer.load(path), path.resolve()


def prepare_shards(
    source: str | os.PathLike | None,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    text_field: str = "text",
    max_chars: int | None = None,
    max_docs: int | None = None,
    workers: int | None = None,
    shard_tokens: int = 50_000_000,
    show_progress: bool = True,
) -> dict:
    """Tokenize `source` (see `iter_documents`) with the tokenizer at `tokenizer_path` into shards
    in `out_dir`; returns the manifest. Same input and tokenizer -> byte-identical output,
    whatever the number of workers (`workers=1` tokenizes in this process)."""
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise LmforgeError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers is not None and workers < 1:
        raise LmforgeError(f"workers must be at least 1, got {workers}")
    workers = workers or _default_workers()
    tok, tok_path = _load_tokenizer(tokenizer_path)
    dtype = shard_dtype(tok.vocab_size)

    stats = SourceStats()
    docs = iter_documents(source, text_field=text_field, max_chars=max_chars, max_docs=max_docs, stats=stats)
    out = _prepare_out_dir(out_dir)
    rule, labelled = split_documents(docs, val_fraction)
    writers = {split: _ShardWriter(out, split, shard_tokens) for split in SPLITS}

    from tqdm import tqdm

    bar = tqdm(desc="tokenizing", unit="doc", disable=not show_progress, dynamic_ncols=True)
    start, n_tokens, n_bytes = time.perf_counter(), 0, 0
    try:
        for result in _tokenized(labelled, tok, tok_path, dtype, workers):
            for split, (tokens, n_docs, n_doc_bytes) in result.items():
                w = writers[split]
                w.write(tokens)
                w.documents += n_docs
                w.bytes += n_doc_bytes
                n_tokens += len(tokens)
                n_bytes += n_doc_bytes
                bar.update(n_docs)
            rate = n_bytes / 1e6 / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{n_tokens / 1e6:.2f}M tokens, {rate:.1f} MB/s", refresh=False)
        for w in writers.values():
            w.close()
    except OSError as e:
        raise LmforgeError(f"writing shards to {out} failed: {e}") from None
    finally:
        bar.close()
        for w in writers.values():
            if w._file is not None:
                w._file.close()

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer_path": str(tok_path),
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "dtype": dtype.name,  # always stored little-endian
        "source": "stdlib" if source is None else str(source),
        "text_field": text_field,
        "max_chars": max_chars,
        "max_docs": max_docs,
        "val_fraction": val_fraction,
        "split_rule": rule,
        "shard_tokens": shard_tokens,
        "empty_documents_skipped": stats.empty_skipped,
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    if manifest["splits"]["train"]["tokens"] == 0:
        raise LmforgeError(f"source {manifest['source']} produced no training tokens")
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _tokenized(labelled, tok, tok_path: Path, dtype: np.dtype, workers: int) -> Iterator[dict]:
    """Tokenized batches, in input order."""
    batches = _batches(labelled)
    if workers == 1:
        for batch in batches:
            yield _encode_batch(tok, batch, dtype)
        return
    # apply_async with a bounded queue of pending results instead of pool.imap: imap's feeder
    # thread would read (and buffer) the whole corpus ahead of the workers. Results are
    # collected oldest first, so the output order is the input order.
    max_pending = 2 * workers
    initargs = (str(tok_path), tok.fingerprint, dtype.str)
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_worker_encode, (batch,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and sanity-check `manifest.json` of a prepared data folder."""
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise LmforgeError(f"data folder {d} does not exist — run `lmforge data prepare` first")
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise LmforgeError(f"no {MANIFEST_NAME} in {d} — run `lmforge data prepare` first")
    m = read_json(path, "data manifest", fmt=FORMAT, version=FORMAT_VERSION,
                  hint=" — re-run `lmforge data prepare`")
    required = ("tokenizer_fingerprint", "vocab_size", "dtype", "bos_id", "splits")
    missing = [k for k in required if k not in m]
    splits = m.get("splits")
    if missing or not isinstance(splits, dict) or m.get("dtype") not in ("uint16", "uint32"):
        raise LmforgeError(f"{path} is corrupt (missing or bad fields: {', '.join(missing) or 'splits/dtype'})")
    for name, info in splits.items():
        ok = isinstance(info, dict) and isinstance(info.get("shards"), list) and all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)
            for s in info["shards"]
        )
        if not ok:
            raise LmforgeError(f"{path} is corrupt (bad entry for split {name!r})")
    return m
