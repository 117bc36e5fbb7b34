"""Training and evaluation batches from prepared token shards, read through memory maps.

A split's token stream (its shards concatenated) is cut into windows of `seq_len + 1` tokens at
stride `seq_len`: window i covers tokens [i*seq_len, (i+1)*seq_len], its first seq_len tokens
are the inputs and its last seq_len the targets, so every token is a target once per epoch.
Windows are located by index arithmetic; only the rows of the current batch are copied.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError, dist_info
from lmforge.data.prepare import load_manifest


class SplitMissing(LmforgeError):
    """The folder has no tokens for this split (e.g. val prepared with val_fraction=0). Kept apart
    from a damaged split (a shard missing or of the wrong size), which is always an error: a caller
    may run without validation when there is none, never when its data is broken."""


class TokenSplit:
    """The shards of one split ("train" / "val") of a prepared data folder, memory-mapped."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        tokenizer=None,
        expected_fingerprint: str | None = None,
    ):
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        m = self.manifest
        if split not in m["splits"]:
            raise SplitMissing(f"{self.data_dir} has no {split!r} split (has: {', '.join(m['splits'])})")
        self.fingerprint: str = m["tokenizer_fingerprint"]
        if tokenizer is not None:
            expected_fingerprint = tokenizer.fingerprint
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise LmforgeError(
                f"shards in {self.data_dir} were made with a different tokenizer (hash "
                f"{self.fingerprint[:12]}) than the one in use (hash {expected_fingerprint[:12]}) "
                "— re-run `lmforge data prepare` with this tokenizer"
            )
        self.vocab_size: int = int(m["vocab_size"])
        self.bos_id: int = int(m["bos_id"])
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")  # shards are always little-endian

        self._maps: list[np.memmap] = []
        for shard in m["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            n = shard["tokens"]
            if not path.is_file():
                raise LmforgeError(f"shard {path} listed in the manifest is missing — re-run `lmforge data prepare`")
            size = path.stat().st_size
            if size != n * self.dtype.itemsize:
                raise LmforgeError(
                    f"shard {path} has {size} bytes but the manifest says {n} tokens "
                    f"({n * self.dtype.itemsize} bytes) — the data is incomplete or corrupt; "
                    "re-run `lmforge data prepare`"
                )
            if n > 0:  # numpy cannot map an empty file
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
        # _starts[k] = position of shard k's first token in the split's stream.
        self._starts = np.cumsum([0] + [len(a) for a in self._maps])
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens == 0:
            raise SplitMissing(
                f"the {split!r} split in {self.data_dir} is empty"
                + (" (prepared with val_fraction=0)" if split == "val" else "")
            )

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenSplit({str(self.data_dir)!r}, {self.split!r}, tokens={self.num_tokens}, shards={len(self._maps)})"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int64, crossing shard borders if needed."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside 0..{self.num_tokens}")
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard_start = int(self._starts[k])
            piece_stop = min(stop, int(self._starts[k + 1]))
            out[pos - start : piece_stop - start] = self._maps[k][pos - shard_start : piece_stop - shard_start]
            pos = piece_stop
            k += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        """Number of full windows of seq_len + 1 tokens at stride seq_len."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def windows(self, indices, seq_len: int) -> np.ndarray:
        """Rows (len(indices), seq_len + 1) int64: window i is tokens [i*seq_len, (i+1)*seq_len]."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self.read(int(i) * seq_len, int(i) * seq_len + seq_len + 1)
        return out


def _to_tensors(rows: np.ndarray, device):
    """(x, y) int64 tensors from window rows, y being x shifted left by one, on `device`."""
    import torch  # imported here so `lmforge data prepare` does not pay for torch

    t = torch.from_numpy(rows)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    dev = torch.device(device)
    if dev.type == "cuda":
        # Pinned memory lets the copy run asynchronously with the previous step's compute.
        return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
    if dev.type != "cpu":
        return x.to(dev), y.to(dev)
    return x, y


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise LmforgeError(f"invalid rank {rank} for world size {world_size}")


class BatchLoader:
    """Random training batches: each epoch visits every window once in an order given by a
    permutation seeded with (seed, epoch). Step i of an epoch takes the global batch of
    batch_size * world_size windows at positions [i*B*W, (i+1)*B*W) of that permutation and rank
    r takes its r-th block of B rows; the remaining < B*W windows of an epoch are skipped."""

    def __init__(
        self,
        split: TokenSplit,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        device="cpu",
    ):
        if rank is None or world_size is None:
            env_rank, _, env_world = dist_info()
            rank = env_rank if rank is None else rank
            world_size = env_world if world_size is None else world_size
        if batch_size < 1 or seq_len < 1:
            raise LmforgeError(f"batch size and sequence length must be positive (got {batch_size}, {seq_len})")
        _check_rank(rank, world_size)
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.device = device
        self.num_windows = split.num_windows(seq_len)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.num_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise LmforgeError(
                f"the {split.split!r} split of {split.data_dir} has {split.num_tokens:,} tokens = "
                f"{self.num_windows:,} windows of {seq_len}+1 tokens, fewer than one global batch of "
                f"{batch_size} x {world_size} rank(s) = {self.global_batch} windows; use a smaller "
                "batch size or sequence length, or more data"
            )
        self.epoch = 0  # epoch and step of the *next* batch
        self.step_in_epoch = 0
        self._perm: np.ndarray | None = None
        self._perm_key: tuple | None = None

    @property
    def tokens_per_step(self) -> int:
        """Target tokens per step summed over all ranks (batch_size * seq_len * world_size)."""
        return self.global_batch * self.seq_len

    def _permutation(self) -> np.ndarray:
        key = (self.seed, self.epoch)
        if self._perm_key != key:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            self._perm_key = key
        return self._perm

    def next_indices(self) -> np.ndarray:
        """Window indices of this rank's next batch (advances the position)."""
        start = self.step_in_epoch * self.global_batch + self.rank * self.batch_size
        idx = self._permutation()[start : start + self.batch_size]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return idx

    def next_batch(self):
        """(x, y) int64 tensors of shape (batch_size, seq_len) on the loader's device."""
        return _to_tensors(self.split.windows(self.next_indices(), self.seq_len), self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where `state_dict()` was taken. The global batch (batch_size *
        world_size) may be redistributed over a different number of ranks, but the global batch
        size, sequence length and data must be the same, or the position would mean other data."""
        try:
            epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
            seed, seq_len, windows = int(state["seed"]), int(state["seq_len"]), int(state["num_windows"])
            global_batch = int(state["batch_size"]) * int(state["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise LmforgeError(f"corrupt data-loader state (missing or bad {e})") from None
        if (seq_len, global_batch, windows) != (self.seq_len, self.global_batch, self.num_windows):
            raise LmforgeError(
                "cannot resume the data position: it was saved with sequence length "
                f"{seq_len}, global batch {global_batch} and {windows} windows, but this run has "
                f"{self.seq_len}, {self.global_batch} and {self.num_windows}"
            )
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise LmforgeError(f"corrupt data-loader state (epoch {epoch}, step {step})")
        self.seed, self.epoch, self.step_in_epoch = seed, epoch, step


def eval_batches(
    split: TokenSplit,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device="cpu",
) -> Iterator:
    """(x, y) batches over the split's windows in order; rank r takes windows r, r+W, r+2W, ...
    The last batch may be smaller; ranks may get different numbers of batches."""
    if batch_size < 1 or seq_len < 1:
        raise LmforgeError(f"batch size and sequence length must be positive (got {batch_size}, {seq_len})")
    _check_rank(rank, world_size)
    n = split.num_windows(seq_len)
    if n == 0:
        raise LmforgeError(
            f"the {split.split!r} split of {split.data_dir} has only {split.num_tokens} tokens, "
            f"fewer than one window of {seq_len}+1 tokens"
        )
    return _eval_iter(split, batch_size, seq_len, max_batches, range(rank, n, world_size), device)


def _eval_iter(split, batch_size, seq_len, max_batches, mine: range, device):
    for b, start in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _to_tensors(split.windows(mine[start : start + batch_size], seq_len), device)
