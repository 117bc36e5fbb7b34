"""Mixture of experts: a feed-forward layer in which a router sends each token to k of E expert MLPs,
so the parameters grow with E while the compute per token stays that of k experts.

    scores  = softmax(router(x))            (or sigmoid: each expert scored on its own)
    chosen  = top-k of scores (+ bias)       the bias only chooses; it never weights (see below)
    weights = scores of the chosen, divided by their sum if norm_topk
    y       = sum over chosen e of weights_e * expert_e(x)  (+ shared experts every token goes through)

Dropless by default (every assignment is computed); with a capacity factor c each expert takes at most
c * tokens * k / E assignments per batch, first come first served, and a dropped assignment adds
nothing (the token's residual stream carries it past the layer).

Load balancing, one of:
  * "aux": the Switch/GShard auxiliary loss coef * E * sum_e f_e * P_e (f_e: the share of assignments
    expert e received, P_e: its mean router probability), added to the training loss by the model;
    an optional router z-loss z_coef * mean(logsumexp(logits)^2) keeps the logits small;
  * "bias": DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores only to
    choose the top k, raised for experts that got fewer than the mean load and lowered for those that
    got more, by `bias_rate` after every optimizer step (`after_step`), from that step's loads summed
    over all processes;
  * "none".
Tokens whose targets are ignored (padding, -100) never count toward loads or losses.

Statistics for the training log (`pop_stats`): every expert's share of the assignments since the
last log, the auxiliary loss, and the max violation (max_e load_e / mean load - 1, 0 when perfectly
balanced), so collapsed routing shows even when the loss looks balanced.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

GATES = ("softmax", "sigmoid")
BALANCE = ("aux", "bias", "none")
# Each expert's block of rows is padded to a multiple of up to this many rows (1: exact sizes), about
# an eighth of the mean block, so padding adds a few percent of rows (MoE.forward says why).
MAX_ALIGN = 64


def queue_places(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For token-major expert labels in [0, n): each one's 0-based place among the earlier equal labels
    (its place in its expert's queue), and the count of each label. Dense ops only: compiles to fixed
    shapes."""
    onehot = F.one_hot(labels, n)
    return (onehot.cumsum(0) * onehot).sum(-1) - 1, onehot.sum(0)


def place_rows(x: torch.Tensor, slots: torch.Tensor, size: int) -> torch.Tensor:
    """(size, ...) zeros with x's rows at the distinct `slots`."""
    return _PlaceRows.apply(x, slots, size)


def take_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x[slots] for distinct `slots`."""
    return _TakeRows.apply(x, slots)


class _PlaceRows(torch.autograd.Function):
    # Each slot is written once, so each direction's gradient is the other direction: a gather or a
    # plain store. Indexing's own gradient scatter-adds, which torch.compile turns into atomic adds on
    # a CPU, several times slower.
    @staticmethod
    def forward(ctx, x, slots, size):
        ctx.save_for_backward(slots)
        out = x.new_zeros(size, *x.shape[1:])
        out[slots] = x
        return out

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        return grad[slots], None, None


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slots):
        ctx.save_for_backward(slots)
        ctx.size = x.size(0)
        return x[slots]

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        return place_rows(grad, slots, ctx.size), None


class Tallies:
    """Mixin for a module that sums training statistics in plain tensor attributes, named in `tallies`.
    They are always tensors, so torch.compile specialises on nothing (a Python counter, or None
    before the first sum, would recompile the model); they follow the module to another device like
    buffers, restarting from zero, but are never cast, saved, or broadcast by DDP at every forward
    (which would replace each process's sums with the first one's)."""

    tallies: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for name in self.tallies:
            tally = getattr(self, name)
            setattr(self, name, torch.zeros_like(tally, device=fn(tally).device))
        return out


class MoE(Tallies, nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, make_expert: Callable[[], nn.Module], *,
                 shared: nn.Module | None = None, gate: str = "softmax", norm_topk: bool = True,
                 capacity: float | None = None, balance: str = "aux", aux_coef: float = 0.01,
                 z_coef: float = 0.0, bias_rate: float = 1e-3):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate, self.norm_topk, self.capacity = gate, norm_topk, capacity
        self.balance, self.aux_coef, self.z_coef, self.bias_rate = balance, aux_coef, z_coef, bias_rate
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))
        self.shared = shared
        # Saved with the model (an exact resume continues the same balancing); not a parameter.
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.aux_loss: torch.Tensor | None = None  # this forward's balancing loss (training only)
        # Sums of (assignments per expert, balancing loss, forwards): since the last optimizer step,
        # and since the last log (there the loads are those of all processes).
        self.tallies = ("_step_stats", "_log_stats")
        self._step_stats = torch.zeros(n_experts + 2)
        self._log_stats = torch.zeros(n_experts + 2)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E) fp32, scores (N, E), chosen experts (N, k), their weights (N, k))."""
        logits = self.router(flat).float()
        scores = logits.softmax(-1) if self.gate == "softmax" else logits.sigmoid()
        choose = scores + self.expert_bias if self.balance == "bias" else scores
        chosen = choose.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, chosen, weights

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); valid (B, T) bool, False for tokens that count toward no load or loss."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, scores, chosen, weights = self.route(flat)
        keep = torch.ones_like(chosen, dtype=torch.bool)
        if self.capacity is not None:
            keep = self._within_capacity(chosen)
        # Each assignment gets a row slot: the experts' rows are contiguous and in token order, each
        # expert's block padded to a multiple of `align` rows, and dropped assignments (sentinel
        # expert E) go last. Padding keeps the products' shapes to a few sizes: a CPU's oneDNN builds
        # a kernel for every new shape (~1 ms each, more than the product itself) and the loads
        # change every step. The buffer's size is fixed by N alone, so torch.compile compiles once.
        # The experts then run as one grouped product per projection where the kernel exists, else
        # one after another on their blocks; results come back to token order by the same slots.
        n, k = chosen.shape
        rows_n, dim = n * k, flat.size(-1)
        align = min(MAX_ALIGN, 1 << max(0, (rows_n // self.n_experts // 8).bit_length() - 1))
        expert_of = torch.where(keep, chosen, self.n_experts).reshape(-1)  # (N * k,), token-major
        rank, counts = queue_places(expert_of, self.n_experts + 1)
        blocks = (counts[:-1] + align - 1) // align * align
        ends = blocks.cumsum(0)
        starts = torch.cat([ends - blocks, ends[-1:]])  # the dropped start after the last block
        slots = starts[expert_of] + rank
        size = rows_n + self.n_experts * (align - 1)  # room for the worst-case padding
        assigned = flat[:, None].expand(n, k, dim).reshape(rows_n, dim)
        if self.capacity is not None:  # the grouped product leaves rows past its last group unspecified,
            assigned = torch.where(keep.reshape(-1, 1), assigned, 0)  # gradients included: mask both ways
        rows = place_rows(assigned, slots, size)
        grouped = getattr(self.experts[0], "grouped", None)
        ys = grouped(self.experts, rows, ends.to(torch.int32)) if grouped is not None else None
        if ys is None:
            parts = rows.split(blocks.tolist() + [size - int(ends[-1])])
            ys = torch.cat([expert(part) for expert, part in zip(self.experts, parts)] + [torch.zeros_like(parts[-1])])
        ys = take_rows(ys, slots).view(n, k, -1)
        ys = torch.where(keep[..., None], ys, 0) * weights[..., None].to(ys.dtype)  # dropped: nothing
        out = ys.sum(1)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            mask = torch.ones(flat.size(0), dtype=torch.bool, device=x.device) if valid is None else valid.reshape(-1)
            self._account(logits, scores, chosen, keep, mask)
        return out.reshape(shape)

    def _within_capacity(self, chosen: torch.Tensor) -> torch.Tensor:
        """(N, k) bool: the assignments each expert takes, in token order, up to its capacity."""
        n, k = chosen.shape
        cap = math.ceil(self.capacity * n * k / self.n_experts)
        return queue_places(chosen.reshape(-1), self.n_experts)[0].reshape(n, k) < cap

    def _account(self, logits, scores, chosen, keep, mask) -> None:
        """The balancing loss of this forward and the load statistics, over valid tokens only."""
        m = mask.to(scores.dtype)
        n_valid = m.sum().clamp(min=1)
        assigned = F.one_hot(chosen, self.n_experts).to(scores.dtype) * keep[..., None]  # (N, k, E)
        load = (assigned.sum(1) * m[:, None]).sum(0)  # (E,) assignments per expert
        aux = logits.new_zeros(())
        if self.balance == "aux" and self.aux_coef > 0:
            share = load / (n_valid * self.top_k)  # f_e
            probs = scores / scores.sum(-1, keepdim=True)  # sigmoid scores normalised like softmax
            mean_prob = (probs * m[:, None]).sum(0) / n_valid  # P_e
            aux = aux + self.aux_coef * self.n_experts * (share * mean_prob).sum()
        if self.z_coef > 0:
            aux = aux + self.z_coef * ((torch.logsumexp(logits, -1) ** 2) * m).sum() / n_valid
        self.aux_loss = aux
        forward = torch.cat([load.detach(), aux.detach().reshape(1), torch.ones_like(load[:1])])
        self._step_stats = self._step_stats + forward

    @torch.no_grad()
    def after_step(self) -> None:
        """After an optimizer step: sum this step's loads over the processes, keep them for the log, and
        (bias balancing) move each expert's bias toward the mean load."""
        stats, self._step_stats = self._step_stats, torch.zeros_like(self._step_stats)
        load = stats[:self.n_experts].clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self._log_stats += torch.cat([load, stats[self.n_experts:]])
        if self.balance == "bias":  # an expert without load this step (or no step at all) moves by 0
            self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)

    def pop_stats(self) -> dict[str, float] | None:
        """Loads and losses since the last call (None if this layer has not trained since)."""
        stats, self._log_stats = self._log_stats.tolist(), torch.zeros_like(self._log_stats)
        load, aux, n = torch.tensor(stats[:self.n_experts]), stats[-2], stats[-1]
        if n == 0:
            return None
        share = load / load.sum().clamp(min=1)
        return {"share": share.tolist(), "max_violation": float(load.max() / load.mean().clamp(min=1e-9) - 1),
                "aux_loss": aux / n}
