"""Counted n-gram language models: add-eps (Lidstone/Laplace) and interpolated modified Kneser-Ney.

This file is long because a family is one module (lmforge/models/README.md): counting, the two
smoothing methods, scoring, the decode state and the ARPA export all work on the same count tables.

A counted model is not trained by gradient descent: `fit(tokens)` counts every k-gram (k = 1..n) of
one long stream of token ids and the probabilities follow from the counts in closed form. The ids
come from any lmforge tokenizer (the byte-level one with no merges makes a classic character model).

Documents. The training stream holds `<|bos|>` at every document start; it is an ordinary token
here. Counting runs across document boundaries (the n-grams "...end of doc <|bos|> start of next"
are counted too), exactly like a transformer's training window that spans two documents: the bos
token itself is the context that says "a document starts here". Scoring does the same: position t
of a row sees the up to n-1 previous ids of that row, bos or not, and fewer at the row start.

Storage: rank-compressed sorted keys. The k-grams of order k are kept as one sorted int64 array
    key = id of the (k-1)-gram prefix * V + last token
where "id of a j-gram" is its position in order j's sorted array (order 0 has the one empty
context, id 0). A key is below (number of distinct (k-1)-grams) * V <= N * V, so it never overflows
int64 whatever V**n is (vocab 4096, n = 7: 4096**7 = 2**84), and it is an exact encoding: no hashing,
no collisions. The k-grams sharing a context are one contiguous run of the sorted array, which is
what both the dense next-token distribution and the context totals need. Counting is a histogram for
order 1 and one sort per higher order over the whole stream (numpy, no Python loop over tokens).

Kneser-Ney (Chen & Goodman 1998, "interpolated modified Kneser-Ney"): the highest order uses raw
counts, every lower order k uses continuation counts N1+(. g) = the number of distinct tokens seen
before the k-gram g. Per order three discounts from the count-of-counts n1..n4 of that order's
counts (Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3), and
    P_k(w | h) = max(c(h w) - D(c(h w)), 0) / c(h) + gamma(h) P_{k-1}(w | h minus its first token)
    gamma(h)   = (D1 N1(h) + D2 N2(h) + D3+ N3+(h)) / c(h)
with c(h) = sum over w of c(h w). An unseen context (c(h) = 0) backs off with gamma = 1, and the
lowest order interpolates with the uniform 1/V, so every id has probability > 0 and every
distribution sums to 1 exactly (up to float64 rounding).

Discount fallback (tiny corpora): when an order's estimate is unusable (some of n1..n4 is 0, or a
discount outside (0, k) for count k), that order uses D = (0.5, 1.0, 1.5) -- the values KenLM's
`--discount_fallback` uses -- and `fit` reports the order in "discount_fallback_orders". With
`discount_fallback=False` in the config the same situation raises one LmforgeError instead.

Add-eps: P(w | h) = (c(h w) + eps) / (c(h) + eps V) with the full n-1 token context h (an unseen
context gives the uniform distribution); at a row start, where fewer than n-1 tokens precede, the
same formula at the order the available context allows (position 0: the add-eps unigram).

`write_arpa` exports a Kneser-Ney model (or any order-1 model) as an ARPA file (SRILM/KenLM) whose
backoff rule reproduces the model's probabilities exactly; `arpa_token_text(tokenizer)` gives every
id a whitespace-free name. Add-eps of order >= 2 is refused: its uniform answer for an unseen context
is not a backoff to the shorter context, so no ARPA file can hold it.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.models.protocol import LanguageModel, ModelConfig, ModelFamily

SMOOTHINGS = ("kneser-ney", "add-eps")
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # D1, D2, D3+ where an order's estimate is unusable
DENSE_CHUNK = 1 << 22  # float64 cells of one chunk of dense next-token distributions (32 MB)


@dataclass(frozen=True)
class NgramConfig(ModelConfig):
    vocab_size: int = 4096
    order: int = 5  # n: a token is predicted from the n-1 before it
    smoothing: str = "kneser-ney"  # "kneser-ney" | "add-eps"
    eps: float = 1.0  # add-eps pseudo-count (1.0 = Laplace); unused by Kneser-Ney
    discount_fallback: bool = True  # Kneser-Ney: fixed discounts where they cannot be estimated (else an error)

    def __post_init__(self):
        def bad(msg):
            raise LmforgeError(f"invalid n-gram config: {msg}")

        if not isinstance(self.vocab_size, int) or self.vocab_size <= 0:
            bad(f"vocab_size must be a positive integer, got {self.vocab_size!r}")
        if not isinstance(self.order, int) or self.order < 1:
            bad(f"order must be an integer >= 1, got {self.order!r}")
        if self.smoothing not in SMOOTHINGS:
            bad(f"smoothing must be {' or '.join(SMOOTHINGS)}, got {self.smoothing!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            bad(f"eps must be a positive number, got {self.eps!r}")


# ----------------------------------------------------------------------------- small array helpers


def _expand_runs(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs [starts[i], ends[i]): (which run, index) of every element of every run, vectorised."""
    lengths = ends - starts
    owner = np.repeat(np.arange(len(starts)), lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, starts[owner] + offsets


def estimate_discounts(counts: np.ndarray) -> tuple[float, float, float] | None:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts of `counts`, or None when they cannot
    be estimated (a count-of-counts n1..n4 is 0, or a discount outside (0, k) for count k)."""
    n = np.bincount(np.minimum(counts, 5), minlength=6)[1:5].astype(np.float64)
    if (n == 0).any():
        return None
    y = n[0] / (n[0] + 2 * n[1])
    d = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])
    if not all(0 < dk < k for k, dk in enumerate(d, start=1)):
        return None
    return tuple(float(x) for x in d)


# ----------------------------------------------------------------------------- decode state


class NgramState:
    """The decode state of an n-gram model: each row's last n-1 tokens, (B, n-1) int64, right
    aligned, -1 where the row has fewer tokens so far."""

    def __init__(self, history: torch.Tensor):
        self.history = history

    @property
    def batch_size(self) -> int:
        return self.history.size(0)

    def keep(self, rows: torch.Tensor) -> None:
        self.history = self.history.index_select(0, rows.to(self.history.device))

    def extend(self, other: NgramState) -> None:
        if other.history.size(1) != self.history.size(1):
            raise LmforgeError(f"cannot join n-gram states of {self.history.size(1)} and "
                               f"{other.history.size(1)} context tokens")
        self.history = torch.cat([self.history, other.history.to(self.history.device)])


# ----------------------------------------------------------------------------- the model


class NgramLM(LanguageModel):
    family = "ngram"
    trainable = False

    def __init__(self, cfg: NgramConfig):
        super().__init__()
        self.config = cfg
        # Buffers, so that state_dict() (and a checkpoint's safetensors) holds the counts. Their
        # lengths depend on the data: see _load_from_state_dict.
        for k in range(1, cfg.order + 1):
            self.register_buffer(f"keys_{k}", torch.zeros(0, dtype=torch.int64))
            self.register_buffer(f"counts_{k}", torch.zeros(0, dtype=torch.int32))
        self._prepare()

    # ------------------------------------------------------------------ counting

    def fit(self, tokens, progress: bool = True) -> dict:
        """Count the model from a 1-D array of training ids. Returns what it did: seconds, tokens,
        distinct n-grams per order, bytes held, and (Kneser-Ney) the discounts per order."""
        t0 = time.perf_counter()
        V, n = self.config.vocab_size, self.config.order
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise LmforgeError(f"n-gram fit needs a 1-D array of integer token ids, got {tokens.dtype} "
                               f"of shape {tokens.shape}")
        N = len(tokens)
        if N < n:
            raise LmforgeError(f"a {n}-gram model needs at least {n} training tokens, got {N}")
        if N >= 2**31 or N * V >= 2**63:
            raise LmforgeError(f"{N:,} training tokens with a vocabulary of {V} are more than the n-gram "
                               "counter handles (int32 counts, int64 keys)")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            raise LmforgeError(f"training token id {lo if lo < 0 else hi} is outside the vocabulary (0..{V - 1})")
        tokens = tokens.astype(np.int64, copy=False)
        kneser_ney = self.config.smoothing == "kneser-ney"

        # Order 1 needs no sort: a histogram over the vocabulary.
        histogram = np.bincount(tokens, minlength=V)
        seen = np.flatnonzero(histogram)
        rank = np.zeros(V, dtype=np.int64)
        rank[seen] = np.arange(len(seen))
        keys, counts = [seen.astype(np.int64)], [histogram[seen].astype(np.int32)]
        ids = rank[tokens]  # ids[i]: id of the (k-1)-gram starting at position i
        for k in range(2, n + 1):
            tk = time.perf_counter()
            L = N - k + 1  # number of k-gram occurrences
            key = ids[:L] * V + tokens[k - 1:]
            order = np.argsort(key)
            sorted_keys = key[order]
            is_new = np.empty(L, dtype=bool)
            is_new[0] = True
            np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_new[1:])
            starts = np.flatnonzero(is_new)
            keys.append(sorted_keys[starts])
            counts.append(np.diff(np.append(starts, L)).astype(np.int32))
            if kneser_ney:
                # Order k-1 becomes continuation counts: each distinct k-gram adds one left extension
                # to its suffix, the (k-1)-gram one position later (every occurrence has the same).
                suffix = ids[order[starts] + 1]
                counts[k - 2] = np.bincount(suffix, minlength=len(keys[k - 2])).astype(np.int32)
            new_ids = np.empty(L, dtype=np.int64)
            new_ids[order] = np.cumsum(is_new) - 1
            ids = new_ids
            del order, sorted_keys, is_new, starts, key
            if progress:
                print(f"ngram: order {k}: {len(keys[-1]):,} distinct ({time.perf_counter() - tk:.1f} s)",
                      file=sys.stderr)
        del ids
        before = {name: getattr(self, name) for name in self._table_names()}
        try:
            for k in range(1, n + 1):
                setattr(self, f"keys_{k}", torch.from_numpy(keys[k - 1]))
                setattr(self, f"counts_{k}", torch.from_numpy(counts[k - 1]))
            self._prepare()
        except LmforgeError:  # discounts that cannot be estimated: keep the model as it was
            for name, t in before.items():
                setattr(self, name, t)
            self._prepare()
            raise
        stats = {"seconds": time.perf_counter() - t0, "tokens": N,
                 "ngrams": [len(x) for x in keys], "ngrams_total": self.num_params(),
                 "memory_bytes": self.nbytes()}
        if kneser_ney:
            stats["discounts"] = [list(d) for d in self._discounts]
            stats["discount_fallback_orders"] = list(self._fallback_orders)
            if progress and self._fallback_orders:
                print(f"ngram: orders {self._fallback_orders}: too few distinct counts to estimate the "
                      f"Kneser-Ney discounts; used the fallback {FALLBACK_DISCOUNTS}", file=sys.stderr)
        return stats

    def _table_names(self) -> list[str]:
        return [f"{kind}_{k}" for k in range(1, self.config.order + 1) for kind in ("keys", "counts")]

    def _tables(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(getattr(self, f"keys_{k}").cpu().numpy(), getattr(self, f"counts_{k}").cpu().numpy())
                for k in range(1, self.config.order + 1)]

    def _prepare(self) -> None:
        """Derive what scoring needs from the stored keys and counts (also after loading): per order
        the run of every context, its total c(h) and (Kneser-Ney) its backoff weight gamma(h), the
        discounts, and the dense order-1 distribution."""
        cfg = self.config
        V = cfg.vocab_size
        self._keys, self._counts = [], []
        self._run_starts, self._totals, self._gammas = [], [], []
        self._discounts, self._fallback_orders = [], []
        n_contexts = 1  # order 0: the empty context
        for k, (keys, counts) in enumerate(self._tables(), start=1):
            prefix = keys // V
            # run of context h in order k: [run_starts[h], run_starts[h + 1])
            run_starts = np.searchsorted(keys, np.arange(n_contexts + 1, dtype=np.int64) * V)
            # (at least one entry, so that the "safe" index 0 of an absent context exists in an empty model)
            totals = np.bincount(prefix, weights=counts, minlength=max(n_contexts, 1))
            self._keys.append(keys)
            self._counts.append(counts)
            self._run_starts.append(run_starts)
            self._totals.append(totals)
            if cfg.smoothing == "kneser-ney":
                d = estimate_discounts(counts)
                if d is None:
                    if len(keys) and not cfg.discount_fallback:
                        raise LmforgeError(
                            f"cannot estimate the Kneser-Ney discounts of order {k}: the training text is too "
                            "small (some count-of-counts n1..n4 is 0 or a discount is out of range); use more "
                            "text, a lower order, or discount_fallback=True")
                    if len(keys):
                        self._fallback_orders.append(k)
                    d = FALLBACK_DISCOUNTS
                self._discounts.append(d)
                mass = np.bincount(prefix, weights=self._discount_of(k, counts), minlength=len(totals))
                with np.errstate(invalid="ignore", divide="ignore"):
                    self._gammas.append(np.where(totals > 0, mass / totals, 1.0))
            n_contexts = len(keys)
        # The order-1 distribution as one dense vector (every row of every query starts from it).
        keys1, counts1 = self._keys[0], self._counts[0]
        total1 = self._totals[0][0]
        if cfg.smoothing == "add-eps":
            p1 = np.full(V, cfg.eps / (total1 + cfg.eps * V))
            p1[keys1] += counts1 / (total1 + cfg.eps * V)
        elif total1 > 0:
            p1 = np.full(V, self._gammas[0][0] / V)
            p1[keys1] += self._discounted(1, counts1) / total1
        else:  # nothing counted yet: uniform
            p1 = np.full(V, 1.0 / V)
        self._p1 = p1

    def _discount_of(self, k: int, counts: np.ndarray) -> np.ndarray:
        """D(c) of order k for each count (0 for a count of 0)."""
        table = np.array((0.0, *self._discounts[k - 1]))
        return table[np.minimum(counts, 3)]

    def _discounted(self, k: int, counts: np.ndarray) -> np.ndarray:
        return np.maximum(counts - self._discount_of(k, counts), 0.0)

    def nbytes(self) -> int:
        """Bytes of memory the fitted model holds (stored counts and what _prepare derives)."""
        arrays = self._keys + self._counts + self._run_starts + self._totals + self._gammas + [self._p1]
        return int(sum(a.nbytes for a in arrays))

    # ------------------------------------------------------------------ checkpoints

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """The stored tables have data-dependent lengths, so they replace the (empty) buffers
        instead of being copied into them. All of them or none: a partial set is reported missing
        and leaves the model as it was."""
        own = self._table_names()
        absent = [prefix + name for name in own if prefix + name not in state_dict]
        unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key[len(prefix):] not in own)
        if absent:
            missing_keys.extend(absent)
            return
        loaded = {}
        for name in own:
            t = state_dict[prefix + name]
            want = torch.int64 if name.startswith("keys") else torch.int32
            if not torch.is_tensor(t) or t.ndim != 1 or t.dtype not in (torch.int32, torch.int64):
                raise LmforgeError(f"n-gram checkpoint tensor {name} is not a 1-D integer tensor")
            loaded[name] = t.detach().to("cpu", want).clone()
        self._check_tables(loaded)
        for name, t in loaded.items():
            setattr(self, name, t)
        self._prepare()

    def _check_tables(self, tables: dict[str, torch.Tensor]) -> None:
        """One clear error for stored tables that cannot come from `fit` (a damaged checkpoint)."""
        V = self.config.vocab_size
        n_contexts = 1
        for k in range(1, self.config.order + 1):
            keys, counts = tables[f"keys_{k}"].numpy(), tables[f"counts_{k}"].numpy()
            problem = None
            if len(keys) != len(counts):
                problem = f"keys_{k} and counts_{k} differ in length ({len(keys)} and {len(counts)})"
            elif len(keys) and (keys[0] < 0 or keys[-1] >= n_contexts * V):
                problem = f"keys_{k} holds an n-gram whose context or token does not exist"
            elif (np.diff(keys) <= 0).any():
                problem = f"keys_{k} is not strictly increasing"
            elif (counts < 0).any():
                problem = f"counts_{k} holds negative counts"
            if problem:
                raise LmforgeError(f"the n-gram checkpoint is damaged: {problem}")
            n_contexts = len(keys)

    # ------------------------------------------------------------------ probabilities

    def _lookup(self, k: int, prefix: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Index in order k of the k-gram (prefix id, token w), -1 where it is not stored (or the
        prefix or token is -1)."""
        keys = self._keys[k - 1]
        valid = (prefix >= 0) & (w >= 0)
        if len(keys) == 0:
            return np.full(prefix.shape, -1, dtype=np.int64)
        key = np.where(valid, prefix * self.config.vocab_size + w, 0)
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return np.where(valid & (keys[pos] == key), pos, -1)

    def _count_of(self, k: int, pos: np.ndarray) -> np.ndarray:
        """The stored count at each index of order k, 0 where the index is -1 (not stored)."""
        counts = self._counts[k - 1]
        if len(counts) == 0:
            return np.zeros(pos.shape, dtype=np.int64)
        return np.where(pos >= 0, counts[np.maximum(pos, 0)], 0)

    def _contexts(self, x: np.ndarray) -> list[np.ndarray]:
        """x (R, T) ids (-1: no token). contexts[m][r, t] = id of the m-gram x[r, t-m+1 .. t] in
        order m (-1: not stored, or the row has fewer than m tokens up to t), for m = 0..n-1."""
        contexts = [np.zeros(x.shape, dtype=np.int64)]
        if self.config.order > 1:
            contexts.append(self._lookup(1, contexts[0], x))
        for m in range(2, self.config.order):
            # the m-gram ending at t = the (m-1)-gram ending at t-1, then x[t]; none at t = 0
            cur = np.full(x.shape, -1, dtype=np.int64)
            cur[:, 1:] = self._lookup(m, contexts[m - 1][:, :-1], x[:, 1:])
            contexts.append(cur)
        return contexts

    def _context_stats(self, k: int, ctx: np.ndarray):
        """Whether each context is seen in order k (c(h) > 0), and its (safe) index."""
        safe = np.where(ctx >= 0, ctx, 0)
        total = self._totals[k - 1][safe]
        return (ctx >= 0) & (total > 0), safe, total

    def _target_probs(self, contexts: list[np.ndarray], available: np.ndarray, y: np.ndarray) -> np.ndarray:
        """P(y | context) in float64 for flat arrays of queries (only the target's probability)."""
        cfg = self.config
        if cfg.smoothing == "add-eps":
            p = np.empty(len(y))
            for k in range(1, cfg.order + 1):
                rows = np.flatnonzero(available == k - 1)
                ctx = contexts[k - 1][rows]
                _, safe, total = self._context_stats(k, ctx)
                total = np.where(ctx >= 0, total, 0.0)
                c = self._count_of(k, self._lookup(k, ctx, y[rows]))
                p[rows] = (c + cfg.eps) / (total + cfg.eps * cfg.vocab_size)
            return p
        p = self._p1[y]
        for k in range(2, cfg.order + 1):
            ctx = contexts[k - 1]
            seen, safe, total = self._context_stats(k, ctx)
            c = self._count_of(k, self._lookup(k, ctx, y))
            with np.errstate(invalid="ignore", divide="ignore"):
                interpolated = self._discounted(k, c) / total + self._gammas[k - 1][safe] * p
            p = np.where(seen, interpolated, p)
        return p

    def _dense_probs(self, contexts: list[np.ndarray], available: np.ndarray) -> np.ndarray:
        """The whole next-token distribution (R, V) in float64 for flat arrays of R queries."""
        cfg = self.config
        V = cfg.vocab_size
        R = len(available)
        if cfg.smoothing == "add-eps":
            probs = np.empty((R, V))
            for k in range(1, cfg.order + 1):
                rows = np.flatnonzero(available == k - 1)
                ctx = contexts[k - 1][rows]
                seen, safe, total = self._context_stats(k, ctx)
                denominator = np.where(seen, total, 0.0) + cfg.eps * V
                probs[rows] = (cfg.eps / denominator)[:, None]
                self._scatter_runs(probs, k, rows[seen], safe[seen])
            return probs
        probs = np.tile(self._p1, (R, 1))
        for k in range(2, cfg.order + 1):
            seen, safe, total = self._context_stats(k, contexts[k - 1])
            rows = np.flatnonzero(seen)
            probs[rows] *= self._gammas[k - 1][safe[rows]][:, None]
            self._scatter_runs(probs, k, rows, safe[rows])
        return probs

    def _scatter_runs(self, probs: np.ndarray, k: int, rows: np.ndarray, ctx: np.ndarray) -> None:
        """Add each row's own-order term for the tokens seen after its context: the discounted
        count / c(h) (Kneser-Ney) or count / (c(h) + eps V) (add-eps)."""
        if len(rows) == 0:
            return
        run_starts = self._run_starts[k - 1]
        owner, entry = _expand_runs(run_starts[ctx], run_starts[ctx + 1])
        counts = self._counts[k - 1][entry]
        total = self._totals[k - 1][ctx[owner]]
        if self.config.smoothing == "add-eps":
            term = counts / (total + self.config.eps * self.config.vocab_size)
        else:
            term = self._discounted(k, counts) / total
        probs[rows[owner], self._keys[k - 1][entry] % self.config.vocab_size] += term

    def _queries(self, idx: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:
        """Contexts and number of available context tokens of every position of idx (B, T), flat."""
        x = self._check_ids(idx)
        B, T = x.shape
        contexts = [c.reshape(-1) for c in self._contexts(x)]
        available = np.broadcast_to(np.minimum(np.arange(T) + 1, self.config.order - 1), (B, T)).reshape(-1)
        return contexts, available

    def _check_ids(self, idx) -> np.ndarray:
        x = idx.detach().cpu().numpy() if torch.is_tensor(idx) else np.asarray(idx)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise LmforgeError(f"n-gram model input must be a (batch, time) array of ids, got shape {x.shape}")
        if x.size and (x.min() < 0 or x.max() >= self.config.vocab_size):
            bad = x.min() if x.min() < 0 else x.max()
            raise LmforgeError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return x.astype(np.int64, copy=False)

    def probabilities(self, idx) -> np.ndarray:
        """float64 next-token distributions (B, T, V): row b, position t predicts the token after
        idx[b, t] from idx[b, t-n+2 .. t]."""
        contexts, available = self._queries(idx)
        B, T = np.shape(idx)
        return self._dense_probs(contexts, available).reshape(B, T, self.config.vocab_size)

    def target_probabilities(self, idx, targets) -> np.ndarray:
        """float64 P(targets[b, t] | idx up to t) (B, T); targets must be valid ids."""
        contexts, available = self._queries(idx)
        y = self._check_ids(targets).reshape(-1)
        return self._target_probs(contexts, available, y).reshape(np.shape(idx))

    # ------------------------------------------------------------------ the protocol

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Without targets: float32 log-probabilities (B, T, V) as "logits" (their log-softmax is
        themselves). With targets (B, T; -100 = ignore): the cross-entropy, from the targets'
        probabilities only (no (B, T, V) array), `reduction` as in F.cross_entropy."""
        B, T = idx.shape
        V = self.config.vocab_size
        contexts, available = self._queries(idx)
        if targets is None:
            out = torch.empty(B * T, V, dtype=torch.float32)
            step = max(1, DENSE_CHUNK // V)
            for lo in range(0, B * T, step):
                part = [c[lo:lo + step] for c in contexts]
                out[lo:lo + step] = torch.from_numpy(np.log(self._dense_probs(part, available[lo:lo + step])))
            return out.view(B, T, V).to(idx.device)
        if reduction not in ("mean", "sum", "none"):
            raise LmforgeError(f"reduction must be mean, sum or none, got {reduction!r}")
        y = targets.detach().cpu().numpy().reshape(-1).astype(np.int64)
        keep = y != -100
        if keep.any() and (y[keep].min() < 0 or y[keep].max() >= V):
            raise LmforgeError(f"target id outside the vocabulary (0..{V - 1}) and not -100")
        nll = np.zeros(B * T)
        rows = np.flatnonzero(keep)
        nll[rows] = -np.log(self._target_probs([c[rows] for c in contexts], available[rows], y[rows]))
        if reduction == "none":
            loss = nll
        elif reduction == "sum":
            loss = nll.sum()
        else:
            loss = nll.sum() / keep.sum() if keep.any() else float("nan")  # F.cross_entropy gives nan too
        return torch.as_tensor(loss, dtype=torch.float32).to(idx.device)

    def param_groups(self) -> dict:
        return {}  # nothing to train

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """The number of stored n-gram entries (all orders): a counted model's size."""
        return sum(len(k) for k in self._keys)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 0.0

    # ------------------------------------------------------------------ generation

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> NgramState:
        """An empty state: no tokens yet in any row (max_len and dtype do not apply)."""
        return NgramState(torch.full((batch_size, self.config.order - 1), -1, dtype=torch.int64))

    def _state_probs(self, state: NgramState, device) -> torch.Tensor:
        history = state.history.cpu().numpy()
        B = history.shape[0]
        if history.shape[1] == 0:  # a unigram model has no context
            contexts, available = [np.zeros(B, dtype=np.int64)], np.zeros(B, dtype=np.int64)
        else:
            contexts = [c[:, -1] for c in self._contexts(history)]
            available = (history >= 0).sum(axis=1)
        return torch.from_numpy(np.log(self._dense_probs(contexts, available))).float().to(device)

    def prefill(self, idx: torch.Tensor, cache: NgramState, last: torch.Tensor | None = None) -> torch.Tensor:
        """Read right-padded prompts idx (B, T) whose real tokens end at last[b] (default T - 1);
        keep each row's last n-1 tokens; return float32 log-probabilities (B, V) of the next token."""
        x = self._check_ids(idx)
        B, T = x.shape
        if cache.batch_size != B:
            raise LmforgeError(f"n-gram state has {cache.batch_size} rows, the prompts {B}")
        last = np.full(B, T - 1) if last is None else last.detach().cpu().numpy().astype(np.int64)
        width = self.config.order - 1
        history = np.full((B, width), -1, dtype=np.int64)
        for col in range(width):  # column col holds the token width-1-col places before the last one
            pos = last - (width - 1 - col)
            ok = pos >= 0
            history[ok, col] = x[np.flatnonzero(ok), pos[ok]]
        cache.history = torch.from_numpy(history)
        return self._state_probs(cache, idx.device)

    def decode(self, idx: torch.Tensor, cache: NgramState, positions: list[int], step_fn=None) -> torch.Tensor:
        """Append each row's next token idx (B, 1) to its context; return float32 log-probabilities
        (B, V) of the token after it. positions and step_fn do not apply (no window, no graph)."""
        x = self._check_ids(idx)
        if x.shape != (cache.batch_size, 1):
            raise LmforgeError(f"decode needs ({cache.batch_size}, 1) ids, got {tuple(x.shape)}")
        if self.config.order > 1:
            cache.history = torch.cat([cache.history[:, 1:].cpu(), torch.from_numpy(x)], dim=1)
        return self._state_probs(cache, idx.device)

    # ------------------------------------------------------------------ whole-table probabilities (ARPA)

    def stored_probabilities(self) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """P(w | h) in float64 for every stored k-gram (h, w), order by order (and the dense
        order-1 distribution over the whole vocabulary), and for the stored k-grams of orders
        1..n-1 their backoff weight gamma as a context of the next order (1 where unseen). For a
        Kneser-Ney (or order-1) model, P(w | h) = gamma(h) P(w | h minus its first token) for every
        (h, w) not stored: the ARPA backoff rule."""
        V = self.config.vocab_size
        probs = [self._p1[self._keys[0]]]
        suffix = None  # suffix[i]: id in order k-1 of stored k-gram i minus its first token
        for k in range(2, self.config.order + 1):
            keys = self._keys[k - 1]
            prefix, w = keys // V, keys % V
            shorter = np.zeros(len(keys), dtype=np.int64) if k == 2 else suffix[prefix]
            suffix = self._lookup(k - 1, shorter, w)
            if (suffix < 0).any():  # impossible for tables made by fit: every suffix is counted
                raise LmforgeError(f"n-gram table of order {k} has an n-gram whose suffix is not stored")
            lower = probs[k - 2][suffix]
            total = self._totals[k - 1][prefix]
            with np.errstate(invalid="ignore", divide="ignore"):
                own = self._discounted(k, self._counts[k - 1]) / total + self._gammas[k - 1][prefix] * lower
            probs.append(np.where(total > 0, own, lower))
        backoffs = [self._gammas[k] for k in range(1, self.config.order)]
        return self._p1.copy(), probs, backoffs


# ----------------------------------------------------------------------------- ARPA export

ARPA_RESERVED = ("<s>", "</s>", "<unk>")
ARPA_NEVER = -99.0  # log10 probability of a word the model never predicts (the SRILM/KenLM convention)


def arpa_token_text(tokenizer) -> list[str]:
    """A whitespace-free, unique ARPA word for every id of an lmforge tokenizer: bytes spelled with
    the byte-level BPE alphabet (every byte a visible non-space character), "<s>" for bos, the
    other special tokens by name. A byte token that spells like a special or reserved word gets a
    U+2400 suffix, a character the byte alphabet never uses."""
    from lmforge.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    specials = {i: name for name, i in tokenizer.special_tokens.items()}
    specials[tokenizer.bos_id] = "<s>"
    taken = set(specials.values()) | set(ARPA_RESERVED)
    words = []
    for i in range(tokenizer.vocab_size):
        if i in specials:
            words.append(specials[i])
            continue
        word = "".join(table[b] for b in tokenizer.token_bytes(i))
        words.append(word + "\u2400" if word in taken else word)
    return words


def write_arpa(model: NgramLM, path: str | Path, token_text: Callable[[int], str] | Sequence[str]) -> dict:
    """Write `model` as an ARPA file. token_text gives each id's word (whitespace-free, unique);
    the id spelled "<s>" is the sentence start, usually bos (see arpa_token_text).

    Every stored n-gram is listed with the model's (interpolated) log10 probability, and every
    stored context with log10 gamma, so the ARPA backoff rule reproduces the model exactly. "<s>",
    "</s>" and "<unk>" are added at log10 probability -99 where no id spells them (readers require
    them; the model never predicts them). Add-eps models of order >= 2 give an unseen context the
    uniform distribution, which backoff cannot express: they are refused."""
    cfg = model.config
    if cfg.smoothing != "kneser-ney" and cfg.order > 1:
        raise LmforgeError("ARPA export needs a backoff model: an add-eps n-gram model of order >= 2 gives unseen "
                           "contexts a uniform distribution, which the ARPA backoff rule cannot express; "
                           "export a Kneser-Ney model (or an order-1 one)")
    V = cfg.vocab_size
    words = [token_text[i] for i in range(V)] if isinstance(token_text, Sequence) else [token_text(i) for i in range(V)]
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise LmforgeError(f"ARPA word of id {i} must be a non-empty string without whitespace, got {word!r}")
    if len(set(words)) != V:
        dup = next(w for w in words if words.count(w) > 1)
        raise LmforgeError(f"ARPA words must be unique; {dup!r} spells more than one id")
    extra = [w for w in ARPA_RESERVED if w not in set(words)]
    p1_dense, probs, backoffs = model.stored_probabilities()
    keys1 = model._keys[0]
    counts = [V + len(extra)] + [len(model._keys[k]) for k in range(1, cfg.order)]
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\\data\\\n")
        for k, c in enumerate(counts, start=1):
            f.write(f"ngram {k}={c}\n")
        # Order 1 lists the whole vocabulary (every id has a probability); ids never seen are
        # never contexts, so their backoff weight is 1.
        f.write("\n\\1-grams:\n")
        log_p = np.log10(p1_dense).tolist()
        if cfg.order > 1:
            bow = np.ones(V)
            bow[keys1] = backoffs[0]
            f.writelines(f"{p:.10f}\t{t}\t{b:.10f}\n" for p, t, b in zip(log_p, words, np.log10(bow).tolist()))
            f.writelines(f"{ARPA_NEVER:.1f}\t{w}\t0.0\n" for w in extra)
        else:
            f.writelines(f"{p:.10f}\t{t}\n" for p, t in zip(log_p, words))
            f.writelines(f"{ARPA_NEVER:.1f}\t{w}\n" for w in extra)
        texts = [words[t] for t in keys1.tolist()]  # text of each stored n-gram of the order before
        for k in range(2, cfg.order + 1):
            f.write(f"\n\\{k}-grams:\n")
            keys = model._keys[k - 1]
            texts = [f"{texts[h]} {words[t]}" for h, t in zip((keys // V).tolist(), (keys % V).tolist())]
            log_p = np.log10(probs[k - 1]).tolist()
            if k < cfg.order:
                log_b = np.log10(backoffs[k - 1]).tolist()
                f.writelines(f"{p:.10f}\t{t}\t{b:.10f}\n" for p, t, b in zip(log_p, texts, log_b))
            else:
                f.writelines(f"{p:.10f}\t{t}\n" for p, t in zip(log_p, texts))
        f.write("\n\\end\\\n")
    return {"path": str(path), "ngrams": counts}


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, NgramConfig] = {
    # add-eps baselines (vocab_size is replaced by the tokenizer's at build time). eps: the best of
    # 1, 0.1, 0.01, 0.001 by validation bits per byte on the stdlib corpus with a 4096-id tokenizer
    # (bench/ngram_count.py's data); the unigram barely cares and keeps Laplace's 1.
    "unigram": NgramConfig(order=1, smoothing="add-eps", eps=1.0),
    "bigram": NgramConfig(order=2, smoothing="add-eps", eps=0.1),
    "trigram": NgramConfig(order=3, smoothing="add-eps", eps=0.01),
    "addeps5": NgramConfig(order=5, smoothing="add-eps", eps=0.001),
    # interpolated modified Kneser-Ney
    "kn3": NgramConfig(order=3, smoothing="kneser-ney"),
    "kn5": NgramConfig(order=5, smoothing="kneser-ney"),
    "kn7": NgramConfig(order=7, smoothing="kneser-ney"),
}

FAMILY = ModelFamily("ngram", NgramLM, NgramConfig, PRESETS, default_preset="kn5",
                     description="counted n-gram model (interpolated modified Kneser-Ney or add-eps), "
                                 "fitted in one pass")
