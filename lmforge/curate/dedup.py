"""Deduplication: exact duplicates (same normalised text) and near-duplicates (MinHash + LSH over word
n-gram shingles, every candidate verified by its true Jaccard similarity before anything is removed).
This file is long because both phases (signatures, then the global search) and the compact
signature file they share belong together.

It runs in the two phases of the curation pipeline:

- phase 1, per document, in the worker processes: `dedup_signature(text, cfg)` normalises the text
  (lowercase, runs of letters and digits as words, every ASCII digit read as 0), hashes it for exact
  dedup, hashes its word n-grams ("shingles") and computes their MinHash. A worker stores its shard's
  signatures with `save_signatures(path, ids, signatures)` (numpy .npz, no pickle);
- phase 2, once over all shards: `find_duplicates(ids, signatures, cfg)` groups exact duplicates,
  bands the MinHash signatures into LSH buckets, keeps the candidate pairs whose shingle sets really
  overlap by at least `cfg.threshold` (Jaccard), joins them into clusters (union-find) and keeps the
  first document of each cluster in input order.

The MinHash is datasketch's ("affine32" scheme: its permutation parameters, its MurmurHash3 pre-mix),
computed for all shingles of a document at once in numpy; tests check it equals
`datasketch.MinHash.update_batch`. Banding is done by sorting in numpy (`lsh = "numpy"`, the default:
1.3 s for 100k documents, where inserting them into datasketch's `MinHashLSH` takes 20 s) or by
`MinHashLSH` itself (`lsh = "datasketch"`); both find the same candidate pairs.

Signature file (`save_signatures`), one per shard, arrays of an uncompressed .npz (the hashes are
random bytes, compression would only cost time):

    version          int64 (1,)     the signature format (FORMAT_VERSION)
    id_bytes         uint8 (B,)     the ids, UTF-8, concatenated
    id_offsets       int64 (n+1,)   id i is id_bytes[id_offsets[i]:id_offsets[i+1]]
    exact            uint64 (n,)    hash of the normalised text
    minhash          uint32 (n, P)  MinHash signature (P = num_perm; 0 when near-dedup was off)
    shingle_offsets  int64 (n+1,)   document i's shingles are shingles[shingle_offsets[i]:shingle_offsets[i+1]]
    shingles         uint32 (S,)    each document's distinct shingle hashes, sorted

About 4 bytes per word plus 4 * num_perm bytes per document. Phase 2 holds all of it in memory.

This file is long because the two phases share the signature format and are tested together: the
vectorised hashing of phase 1, the shard files, and phase 2's banding, verification and clustering.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmforge.common import LmforgeError, atomic_write_bytes

FORMAT_VERSION = 1
EXACT = "exact_duplicate"
NEAR = "near_duplicate"
LSH_BACKENDS = ("numpy", "datasketch")


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal. The LSH turns a pair into a candidate with probability
    1 - (1 - J^rows)^bands for shingle Jaccard J (its S-curve is steepest near (1/bands)^(1/rows));
    the candidate is removed only if its true Jaccard is >= threshold.

    The defaults meet issue 21's goal on bench/curate_dedup.py (recall >= 0.95 for copies with <= 10%
    of their words edited, precision >= 0.99). A copy with 10% of its words edited at random places
    keeps only ~0.9^5 = 59% of its 5-gram shingles: Jaccard 0.45 on average there (5th percentile
    0.42, and more spread on shorter documents), so the threshold has to be low, 0.3 (at 0.5 almost no
    such copy is caught); unrelated text shares next to no 5-grams. The price: on raw web text, pages
    sharing a template with little content of their own (catalogue entries) also reach 0.3. 64 bands
    of 2 rows make a pair at J = 0.3 a candidate with probability 0.998 (S-curve near 0.125); with
    32 x 4 the LSH misses a quarter of the 10% copies, with 16 x 8 nearly all."""

    enabled: bool = True
    exact: bool = True  # drop documents whose normalised text equals an earlier one's
    near: bool = True  # drop near-duplicates (MinHash + LSH, verified by Jaccard)
    ngram: int = 5  # words per shingle (issue 21; FineWeb and datatrove's default use 5-grams too)
    num_perm: int = 128  # MinHash permutations (datasketch's default)
    bands: int = 64  # LSH bands; bands * rows must equal num_perm
    rows: int = 2  # MinHash values per band (see the class docstring for the S-curve)
    threshold: float = 0.3  # verified shingle Jaccard that makes a pair duplicates (bench/curate_dedup.py)
    seed: int = 1  # picks the MinHash permutations (datasketch's seed); the same for every shard
    lsh: str = "numpy"  # "numpy" (banding by sorting, fast) or "datasketch" (MinHashLSH); same candidates

    def __post_init__(self):
        checks = [
            (self.ngram >= 1, f"ngram must be at least 1, got {self.ngram}"),
            (self.num_perm >= 2, f"num_perm must be at least 2, got {self.num_perm}"),
            (self.bands >= 1 and self.rows >= 1, f"bands and rows must be positive, got {self.bands} and {self.rows}"),
            (self.bands * self.rows == self.num_perm,
             f"bands * rows must equal num_perm: {self.bands} * {self.rows} = {self.bands * self.rows}, "
             f"num_perm = {self.num_perm}"),
            (0.0 < self.threshold <= 1.0, f"threshold must be a Jaccard similarity in (0, 1], got {self.threshold}"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2^32), got {self.seed}"),  # numpy RandomState's range
            (self.lsh in LSH_BACKENDS, f"lsh must be one of {', '.join(LSH_BACKENDS)}, got {self.lsh!r}"),
            (self.lsh != "datasketch" or self.bands >= 2, "lsh = datasketch needs at least 2 bands"),  # MinHashLSH's
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"dedup.{message}")

    def candidate_probability(self, jaccard: float) -> float:
        """P(a pair with this shingle Jaccard shares at least one LSH band)."""
        return 1.0 - (1.0 - jaccard**self.rows) ** self.bands


# -- phase 1: one document ----------------------------------------------------------------------

class Signature(NamedTuple):
    """What phase 2 needs of one document."""

    exact: int  # 64-bit hash of the normalised text
    minhash: np.ndarray  # (num_perm,) uint32, datasketch "affine32" MinHash of the shingles
    shingles: np.ndarray  # sorted distinct uint32 shingle hashes: the set the Jaccard is verified on


# A word is a run of letters and digits in any script; the rest (spaces, punctuation, symbols,
# underscores) only separates words. Scripts written without spaces get one "word" per run.
_WORD = re.compile(r"[^\W_]+")
_SPACE, _ZERO = 32, 48
_U64, _U32 = np.uint64, np.uint32
_POLY = _U64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64; any odd constant with mixed bits works
_MINHASH_CHUNK = 4096  # shingles per block of the (shingles x num_perm) product: ~2 MB at 128 perms
_SEGMENT = 1 << 20  # bytes of normalised text hashed at once (the power tables take 16 bytes per byte)
_DIGITS_TO_ZERO = bytes(_ZERO if 48 <= c <= 57 else c for c in range(256))


def normalize(text: str) -> bytes:
    """The text as exact dedup and the shingles see it: lowercase words (runs of letters and digits)
    joined by single spaces, UTF-8, every ASCII digit replaced by 0 (so "page 3 of 12" and
    "page 4 of 15" match: dates, counters and prices vary between copies of a page)."""
    data = " ".join(_WORD.findall(text.lower())).encode("utf-8")
    return data.translate(_DIGITS_TO_ZERO)


def dedup_signature(text: str, cfg: DedupConfig) -> Signature:
    """The exact-dedup hash, the shingle set and the MinHash of one document (the hot path of phase 1).

    Shingles are the hashes of every `cfg.ngram` consecutive words; a document with fewer words has one
    shingle, all of its words (so two short texts match only if equal after normalisation), and an
    empty one none (it takes part in exact dedup only)."""
    data = normalize(text)
    exact = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    if not cfg.near:
        return Signature(exact, np.zeros(0, _U32), np.zeros(0, _U32))
    shingles = _shingle_hashes(data, cfg.ngram)
    return Signature(exact, _minhash(shingles, cfg.num_perm, cfg.seed), shingles)


class _Powers:
    """POLY^k and POLY^-k mod 2^64 for k < size, grown on demand (per process)."""

    powers = np.ones(1, _U64)
    inverses = np.ones(1, _U64)

    @classmethod
    def get(cls, size: int) -> tuple[np.ndarray, np.ndarray]:
        if len(cls.powers) < size:
            n = 1 << max(12, (size - 1).bit_length())
            inverse = _U64(pow(int(_POLY), -1, 1 << 64))
            # cumprod wraps mod 2^64, which is the arithmetic wanted
            cls.powers = np.cumprod(np.concatenate([[_U64(1)], np.full(n - 1, _POLY, _U64)]), dtype=_U64)
            cls.inverses = np.cumprod(np.concatenate([[_U64(1)], np.full(n - 1, inverse, _U64)]), dtype=_U64)
        return cls.powers, cls.inverses


def _shingle_hashes(data: bytes, ngram: int) -> np.ndarray:
    """Sorted distinct 32-bit hashes of the word n-grams of normalised text, all at once: a polynomial
    prefix hash over the bytes gives any span's hash from two prefix values, divided by POLY^start so
    that equal spans hash equally wherever they are; a MurmurHash3 finalizer then mixes the bits."""
    if not data:
        return np.zeros(0, _U32)
    chars = np.frombuffer(data, np.uint8)
    spaces = np.flatnonzero(chars == _SPACE)
    starts = np.concatenate([[0], spaces + 1])
    ends = np.concatenate([spaces, [len(chars)]])
    if len(starts) >= ngram:
        starts, ends = starts[: len(starts) - ngram + 1], ends[ngram - 1:]
    else:
        starts, ends = starts[:1], ends[-1:]
    # A long document goes in segments of whole shingles, so the power tables stay ~_SEGMENT long;
    # span hashes do not depend on where the span is, so segments give the same hashes.
    parts, i = [], 0
    while i < len(starts):
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + _SEGMENT, side="right")))
        lo, hi = starts[i], ends[j - 1]
        parts.append(_span_hashes(chars[lo:hi], starts[i:j] - lo, ends[i:j] - lo))
        i = j
    return np.unique(np.concatenate(parts))


def _span_hashes(chars: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    size = len(chars)
    powers, inverses = _Powers.get(size)
    prefix = np.zeros(size + 1, _U64)
    np.cumsum((chars.astype(_U64) + _U64(1)) * powers[:size], out=prefix[1:])
    spans = (prefix[ends] - prefix[starts]) * inverses[starts]
    return _fmix64(spans).astype(_U32)  # the low 32 bits of a well-mixed 64-bit value


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    # datasketch's "affine32" pre-mix of every input hash (MurmurHash3's 32-bit finalizer)
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> _U32(13))
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own permutation parameters (a odd, b) for this num_perm and seed."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(_U32), b.astype(_U32)


def _minhash(shingles: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """min over shingles of (a * fmix32(h) + b) mod 2^32, for each of the num_perm (a, b): what
    datasketch.MinHash(scheme="affine32").update_batch computes, without its per-value Python loop."""
    out = np.full(num_perm, np.iinfo(_U32).max, _U32)  # datasketch's empty-sketch value
    a, b = _permutations(num_perm, seed)
    mixed = _fmix32(shingles)
    for i in range(0, len(mixed), _MINHASH_CHUNK):
        block = mixed[i:i + _MINHASH_CHUNK, None] * a + b
        np.minimum(out, block.min(axis=0), out=out)
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of distinct values (0 if both are empty)."""
    if len(a) > len(b):
        a, b = b, a
    if len(a) == 0:
        return 0.0
    at = np.searchsorted(b, a)
    inter = int(np.count_nonzero(b[np.minimum(at, len(b) - 1)] == a))
    return inter / (len(a) + len(b) - inter)


# -- signatures of many documents: one shard on disk, or the whole corpus in phase 2 -------------

@dataclass(eq=False)
class SignatureBatch(Sequence):
    """Many signatures as a few flat arrays (no Python object per document). Indexing gives a
    `Signature` whose arrays are views into the batch."""

    exact: np.ndarray  # (n,) uint64
    minhash: np.ndarray  # (n, num_perm) uint32
    shingle_offsets: np.ndarray  # (n + 1,) int64
    shingles: np.ndarray  # (S,) uint32

    def __len__(self) -> int:
        return len(self.exact)

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)):
            raise TypeError("SignatureBatch indices are integers")
        if i < 0:
            i += len(self)
        return Signature(int(self.exact[i]), self.minhash[i], self.shingles_of(i))

    def shingles_of(self, i: int) -> np.ndarray:
        return self.shingles[self.shingle_offsets[i]:self.shingle_offsets[i + 1]]

    @property
    def num_perm(self) -> int:
        return self.minhash.shape[1]

    @classmethod
    def from_signatures(cls, signatures: Iterable[Signature]) -> SignatureBatch:
        signatures = list(signatures)
        if not signatures:
            return cls(np.zeros(0, _U64), np.zeros((0, 0), _U32), np.zeros(1, np.int64), np.zeros(0, _U32))
        widths = {len(s.minhash) for s in signatures}
        if len(widths) > 1:
            raise LmforgeError(f"dedup signatures of different sizes mixed together: {sorted(widths)} MinHash values")
        lengths = np.fromiter((len(s.shingles) for s in signatures), np.int64, len(signatures))
        return cls(
            exact=np.fromiter((s.exact for s in signatures), _U64, len(signatures)),
            minhash=np.stack([np.asarray(s.minhash, _U32) for s in signatures]),
            shingle_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            shingles=np.concatenate([np.asarray(s.shingles, _U32) for s in signatures]),
        )

    @classmethod
    def concat(cls, batches: Sequence[SignatureBatch]) -> SignatureBatch:
        """One batch of all (e.g. every shard's, in shard order); empty batches are skipped."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.from_signatures([])
        widths = sorted({b.num_perm for b in batches})
        if len(widths) > 1:
            raise LmforgeError(f"dedup signature files of different sizes mixed together: {widths} MinHash values")
        starts = np.cumsum([0] + [len(b.shingles) for b in batches[:-1]])
        offsets = [batches[0].shingle_offsets[:1]] + [b.shingle_offsets[1:] + s for b, s in zip(batches, starts)]
        return cls(
            exact=np.concatenate([b.exact for b in batches]),
            minhash=np.concatenate([b.minhash for b in batches]),
            shingle_offsets=np.concatenate(offsets).astype(np.int64),
            shingles=np.concatenate([b.shingles for b in batches]),
        )


def _as_batch(signatures) -> SignatureBatch:
    return signatures if isinstance(signatures, SignatureBatch) else SignatureBatch.from_signatures(signatures)


def save_signatures(path: str | os.PathLike, ids: Sequence[str], signatures) -> None:
    """Write one shard's ids and signatures (a list of `Signature` or a `SignatureBatch`) to `path`
    (.npz, layout in the module docstring), atomically: a reader sees the old file or the new one."""
    batch = _as_batch(signatures)
    if len(ids) != len(batch):
        raise LmforgeError(f"{len(ids)} ids for {len(batch)} dedup signatures")
    encoded = [str(i).encode("utf-8") for i in ids]
    arrays = {
        "version": np.array([FORMAT_VERSION], np.int64),
        "id_bytes": np.frombuffer(b"".join(encoded), np.uint8),
        "id_offsets": np.concatenate([[0], np.cumsum([len(e) for e in encoded], dtype=np.int64)]).astype(np.int64),
        "exact": batch.exact,
        "minhash": batch.minhash,
        "shingle_offsets": batch.shingle_offsets,
        "shingles": batch.shingles,
    }
    buf = io.BytesIO()  # a file object: np.savez would append ".npz" to a name
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_signatures(path: str | os.PathLike) -> tuple[list[str], SignatureBatch]:
    """The ids and signatures `save_signatures` wrote."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"dedup signature file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise LmforgeError(f"{path} is not a readable dedup signature file: {e}") from None
    expected = {"version", "id_bytes", "id_offsets", "exact", "minhash", "shingle_offsets", "shingles"}
    if set(arrays) != expected:
        raise LmforgeError(f"{path} is not an lmforge dedup signature file (arrays: {', '.join(sorted(arrays))})")
    version = int(arrays["version"][0]) if arrays["version"].size else None
    if version != FORMAT_VERSION:
        raise LmforgeError(f"{path}: dedup signature format {version} is not supported (this lmforge reads "
                           f"{FORMAT_VERSION}); delete the file to recompute it")
    raw, off = arrays["id_bytes"].tobytes(), arrays["id_offsets"]
    ids = [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
    batch = SignatureBatch(arrays["exact"], arrays["minhash"], arrays["shingle_offsets"], arrays["shingles"])
    n = len(ids)
    if (batch.exact.dtype != _U64 or batch.minhash.dtype != _U32 or batch.shingles.dtype != _U32
            or len(batch.exact) != n or batch.minhash.ndim != 2 or len(batch.minhash) != n
            or len(batch.shingle_offsets) != n + 1 or batch.shingle_offsets[-1] != len(batch.shingles)):
        raise LmforgeError(f"{path}: dedup signature arrays are inconsistent (a damaged file?); delete it to recompute")
    return ids, batch


# -- phase 2: the whole corpus --------------------------------------------------------------------

@dataclass
class DedupResult:
    """Which documents are duplicates of which. Ids are the ones given to `find_duplicates`."""

    keep: np.ndarray  # (n,) bool in input order: False for every removed document
    removed: dict[str, str] = field(default_factory=dict)  # removed id -> EXACT or NEAR
    kept_id: dict[str, str] = field(default_factory=dict)  # removed id -> id of the document kept in its place
    cluster: dict[str, int] = field(default_factory=dict)  # id of every document in a cluster -> cluster number
    similarity: dict[str, float] = field(default_factory=dict)  # removed id -> shingle Jaccard with the kept one
    cluster_sizes: list[int] = field(default_factory=list)  # documents in each cluster (>= 2), by cluster number
    stats: dict[str, int] = field(default_factory=dict)  # counts for the report (see find_duplicates)


# A bucket this large gives each member one pair with the bucket's first and one with its predecessor
# instead of all k(k-1)/2 pairs: thousands of copies of a template must not cost millions of Jaccards.
_ALL_PAIRS_MAX_BUCKET = 64


def find_duplicates(ids: Sequence[str], signatures, cfg: DedupConfig) -> DedupResult:
    """Exact and near-duplicate clusters of the documents, one kept per cluster: the first in input order.

    `signatures` is a sequence of `Signature` (or a `SignatureBatch`), one per id, in input order.
    `stats` counts: documents; exact_duplicates / near_duplicates removed (a document removed in a
    cluster whose kept document has the same normalised text counts as exact); clusters; candidate_pairs
    (distinct pairs sharing an LSH band); verified_pairs (Jaccard >= threshold: joined); rejected_pairs
    (LSH false positives, Jaccard below the threshold: not joined); skipped_pairs (already in one
    cluster through other pairs, so not checked)."""
    batch = _as_batch(signatures)
    n = len(ids)
    if len(batch) != n:
        raise LmforgeError(f"{n} ids for {len(batch)} dedup signatures")
    ids = [str(i) for i in ids]
    if len(set(ids)) != n:
        raise LmforgeError("document ids given to dedup are not unique")
    if cfg.enabled and cfg.near and n and batch.num_perm != cfg.num_perm:
        raise LmforgeError(f"dedup signatures hold {batch.num_perm} MinHash values but num_perm is {cfg.num_perm} "
                           f"(computed with other settings, or with near = false); recompute them")
    stats = dict.fromkeys(("documents", "exact_duplicates", "near_duplicates", "clusters", "candidate_pairs",
                           "verified_pairs", "rejected_pairs", "skipped_pairs"), 0)
    stats["documents"] = n
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:  # the smaller index becomes the root: the root is the cluster's first document
            parent[max(ri, rj)] = min(ri, rj)

    if cfg.enabled and cfg.exact:
        first: dict[int, int] = {}
        for i, h in enumerate(batch.exact.tolist()):
            j = first.setdefault(h, i)
            if j != i:
                parent[i] = j  # j is its own root still: only exact links exist so far
        members = np.zeros(n, bool)
        members[list(first.values())] = True
    else:
        members = np.ones(n, bool)
    if cfg.enabled and cfg.near and n:
        # exact copies of a document stand in through their first; documents without words cannot match
        members &= np.diff(batch.shingle_offsets) > 0
        index = np.flatnonzero(members)
        pairs = _candidate_pairs(batch.minhash, index, cfg)
        stats["candidate_pairs"] = len(pairs)
        for i, j in pairs.tolist():
            if find(i) == find(j):
                stats["skipped_pairs"] += 1
            elif jaccard(batch.shingles_of(i), batch.shingles_of(j)) >= cfg.threshold:
                union(i, j)
                stats["verified_pairs"] += 1
            else:
                stats["rejected_pairs"] += 1

    roots = np.fromiter((find(i) for i in range(n)), np.int64, n)
    result = DedupResult(keep=roots == np.arange(n), stats=stats)
    sizes = np.bincount(roots, minlength=n)
    numbers = {}
    for root in np.flatnonzero(sizes >= 2).tolist():  # ascending: clusters numbered by their kept document
        numbers[root] = len(result.cluster_sizes)
        result.cluster_sizes.append(int(sizes[root]))
    stats["clusters"] = len(result.cluster_sizes)
    for i, root in enumerate(roots.tolist()):
        if root in numbers:
            result.cluster[ids[i]] = numbers[root]
        if root == i:
            continue
        exact = bool(cfg.exact and batch.exact[i] == batch.exact[root])
        result.removed[ids[i]] = EXACT if exact else NEAR
        result.kept_id[ids[i]] = ids[root]
        result.similarity[ids[i]] = 1.0 if exact else jaccard(batch.shingles_of(i), batch.shingles_of(root))
        stats["exact_duplicates" if exact else "near_duplicates"] += 1
    return result


def _candidate_pairs(minhash: np.ndarray, index: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Distinct pairs (i, j), i < j, of documents in `index` that share at least one LSH band: an
    (m, 2) int64 array sorted by i then j."""
    buckets = _buckets_numpy if cfg.lsh == "numpy" else _buckets_datasketch
    found = list(buckets(minhash, index, cfg))
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(found)
    n = int(index.max()) + 1
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])  # a pair found in several bands counts once
    return np.stack([codes // n, codes % n], axis=1)


def _bucket_pairs(members: np.ndarray) -> np.ndarray:
    """The pairs to verify among the sorted members of one bucket (see _ALL_PAIRS_MAX_BUCKET)."""
    if len(members) <= _ALL_PAIRS_MAX_BUCKET:
        return np.array(list(combinations(members.tolist(), 2)), np.int64).reshape(-1, 2)
    to_first = np.stack([np.full(len(members) - 1, members[0]), members[1:]], axis=1)
    to_previous = np.stack([members[:-1], members[1:]], axis=1)
    return np.concatenate([to_first, to_previous[1:]]).astype(np.int64)


def _buckets_numpy(minhash: np.ndarray, index: np.ndarray, cfg: DedupConfig) -> Iterator[np.ndarray]:
    """Pairs ((k, 2) arrays, i < j) from every band bucket holding two or more documents, found by
    sorting each band's rows: equal bands become neighbours."""
    for band in range(cfg.bands):
        values = minhash[index, band * cfg.rows:(band + 1) * cfg.rows]
        order = np.lexsort(values.T[::-1])  # stable: equal bands stay in document order
        ordered = values[order]
        new = np.ones(len(order), bool)
        new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
        starts = np.flatnonzero(new)
        sizes = np.diff(np.append(starts, len(order)))
        pairs = starts[sizes == 2]  # most buckets hold one pair: yielded together, without a Python loop
        if len(pairs):
            yield index[np.stack([order[pairs], order[pairs + 1]], axis=1)]
        for start, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
            yield _bucket_pairs(index[order[start:start + size]])


def _buckets_datasketch(minhash: np.ndarray, index: np.ndarray, cfg: DedupConfig) -> Iterator[np.ndarray]:
    """The same pairs from the buckets of datasketch's MinHashLSH (its hash tables, read back after
    inserting every document)."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    with lsh.insertion_session() as session:
        for i in index.tolist():
            sketch = LeanMinHash(seed=cfg.seed, hashvalues=minhash[i], scheme="affine32")
            session.insert(i, sketch, check_duplication=False)
    for table in lsh.hashtables:
        for key in table.keys():
            members = table.get(key)
            if len(members) >= 2:
                yield _bucket_pairs(np.array(sorted(members), np.int64))
