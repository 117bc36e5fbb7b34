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


class MoE(nn.Module):
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
        # Accumulators, as plain attributes: DDP broadcasts buffers from rank 0 at every forward.
        self._step_load: torch.Tensor | None = None  # assignments per expert since the last step
        self._log_load: torch.Tensor | None = None  # ... since the last log
        self._log_aux: torch.Tensor | float = 0.0
        self._log_n = 0

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
        # Group the assignments by expert (one sort), gather their tokens once, run each expert on its
        # contiguous slice, and add the weighted results back to their tokens once. A dropped assignment
        # goes to a sentinel expert E that is never run.
        expert_of = torch.where(keep, chosen, self.n_experts).reshape(-1)  # (N * k,)
        order = expert_of.argsort(stable=True)
        counts = torch.bincount(expert_of, minlength=self.n_experts + 1).tolist()
        token_of = order // self.top_k
        parts = flat[token_of].split(counts)
        ys = torch.cat([expert(part) for expert, part in zip(self.experts, parts)])
        taken = order[:ys.size(0)]
        ys = ys * weights.reshape(-1)[taken, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of[:ys.size(0)], ys)
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
        onehot = F.one_hot(chosen.reshape(-1), self.n_experts)  # (N*k, E), token-major order
        rank = (onehot.cumsum(0) * onehot).sum(-1).reshape(n, k)  # 1-based position in its expert's queue
        return rank <= cap

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
        load = load.detach()
        self._step_load = load if self._step_load is None else self._step_load + load
        self._log_aux = self._log_aux + aux.detach()  # a tensor: no device sync inside the forward
        self._log_n += 1

    @torch.no_grad()
    def after_step(self) -> None:
        """After an optimizer step: sum this step's loads over the processes, keep them for the log, and
        (bias balancing) move each expert's bias toward the mean load."""
        load = self._step_load
        self._step_load = None
        if load is None:
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self._log_load = load if self._log_load is None else self._log_load + load
        if self.balance == "bias":
            self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)

    def pop_stats(self) -> dict[str, float] | None:
        """Loads and losses since the last call (None if this layer has not trained since)."""
        if self._log_load is None:
            return None
        load, self._log_load = self._log_load, None
        aux, n = float(self._log_aux), max(self._log_n, 1)
        self._log_aux, self._log_n = 0.0, 0
        share = load / load.sum().clamp(min=1)
        return {"share": share.tolist(), "max_violation": float(load.max() / load.mean().clamp(min=1e-9) - 1),
                "aux_loss": aux / n}
