"""Training data made of records (conversations, preference pairs, prompts) rather than a token
stream: mixing sources by weight, holding some out, and each process's share.

Every process walks the same global stream of records and keeps its own slice of every global batch
(`ProcessShare`), so a run's global batches, and so its result, are the same on any number of
processes; evaluation sets are split by taking every world-th item. The token-stream counterpart of
this file is loader.py's BatchLoader.
"""
from __future__ import annotations

import random

import numpy as np

from lmforge.common import LmforgeError, dist_info


class ProcessShare:
    """This process's part of the data, decided here once for every record-based stage."""

    def __init__(self, rank: int | None = None, world: int | None = None):
        env_rank, _, env_world = dist_info()
        self.rank = env_rank if rank is None else rank
        self.world = env_world if world is None else world

    @classmethod
    def of_data_parallel(cls, tensor_parallel: int = 1) -> ProcessShare:
        """The share of a process whose group of `tensor_parallel` consecutive ranks splits one model
        copy: the group reads one batch together (rank // tp of world // tp groups)."""
        from lmforge.train.distributed import data_parallel_size

        rank, _, world = dist_info()
        return cls(rank // tensor_parallel, data_parallel_size(world, tensor_parallel))

    def batch(self, draw, batch_size: int) -> tuple[list, list]:
        """(this process's rows, the whole global batch): batch_size * world rows drawn in order."""
        rows = [draw() for _ in range(batch_size * self.world)]
        return rows[self.rank * batch_size:(self.rank + 1) * batch_size], rows

    def items(self, items: list) -> list:
        """Every world-th item, starting at this process's rank (evaluation sets)."""
        return items[self.rank::self.world]


class MixtureSampler:
    """Which (source, index) each row uses: source drawn by weight, index from a per-pass permutation."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if len(sizes) != len(weights) or not sizes or min(sizes) <= 0:
            raise LmforgeError("every SFT source needs at least one training conversation")
        self.sizes, self.seed = sizes, seed
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.drawn, self.pos, self.epoch = 0, [0] * len(sizes), [0] * len(sizes)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _perm(self, d: int) -> np.ndarray:
        if self._perms.get(d, (None,))[0] != self.epoch[d]:
            rng = np.random.default_rng([self.seed, d, self.epoch[d]])
            self._perms[d] = (self.epoch[d], rng.permutation(self.sizes[d]))
        return self._perms[d][1]

    def next(self) -> tuple[int, int]:
        u = np.random.default_rng([self.seed, 1 << 30, self.drawn]).random()
        d = min(int(np.searchsorted(self.cum, u, side="right")), len(self.sizes) - 1)
        i = int(self._perm(d)[self.pos[d]])
        self.drawn += 1
        self.pos[d] += 1
        if self.pos[d] == self.sizes[d]:
            self.pos[d], self.epoch[d] = 0, self.epoch[d] + 1
        return d, i

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "pos": list(self.pos), "epoch": list(self.epoch)}

    def load_state_dict(self, s: dict) -> None:
        if len(s["pos"]) != len(self.sizes):
            raise LmforgeError("--resume: the run was started with a different number of --data sources")
        self.drawn, self.pos, self.epoch = s["drawn"], list(s["pos"]), list(s["epoch"])


def split_heldout(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random fraction of the conversations, at least one if fraction > 0
    and there are at least two."""
    if fraction <= 0 or len(convs) < 2:
        return convs, []
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    k = max(1, int(round(len(convs) * fraction)))
    held = set(order[:k])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]
