"""Optimizers and learning-rate schedules.

Muon (MomentUm Orthogonalized by Newton-Schulz) updates each hidden 2-D weight matrix with an
orthogonalised version of its momentum: all singular values of the update are pushed towards 1,
so every direction in the matrix learns at a similar rate. Embeddings, the output head and all
1-D parameters (norm gains, biases) keep AdamW, for which Muon is not designed. Which parameter is
which is the model's declaration (`param_groups()`), not a guess from names or shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lmforge.common import LmforgeError
from lmforge.models.protocol import trainable_groups


def newton_schulz_orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace G = U S V^T by U V^T with a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) are the published Muon choice: they push singular
    values into roughly [0.7, 1.2] in five steps rather than converging exactly, which is enough for
    an optimizer update and runs fast in bfloat16. G may be a stack (..., m, n) of same-shaped
    matrices, each orthogonalised on its own in one batched iteration."""
    assert G.ndim >= 2
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16).reshape(-1, *G.shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    # Contiguous, and each polynomial step folded into its product (baddbmm: beta*in + alpha*A@B): on a
    # CPU a product with a transposed operand and separate bf16 scale-and-add passes cost more than
    # the products themselves (bench/moe_step.py).
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)).contiguous()  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices. Every rank computes the same update from the same (already
    all-reduced) gradients, so it works unchanged under DDP."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError("Muon only handles 2-D parameters")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            # Matrices of one shape are orthogonalised together, one batched iteration per shape: a
            # mixture of experts has dozens of same-shaped expert matrices per layer.
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                # A sharded (FSDP2) matrix is orthogonalised whole: every rank gathers it and computes
                # the same update, then keeps its own shard of it.
                g = g.full_tensor() if isinstance(g, DTensor) else g
                by_shape.setdefault((tuple(p.shape), g.dtype, g.device), []).append((p, g))
            for (shape, _, _), pairs in by_shape.items():
                updates = newton_schulz_orthogonalize(torch.stack([g for _, g in pairs]), group["ns_steps"])
                # An orthogonal matrix has RMS entry 1/sqrt(max dim); rescale so tall and wide
                # matrices move by a comparable amount per step.
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), update in zip(pairs, updates.unbind(0)):
                    if isinstance(p, DTensor):
                        update = distribute_tensor(update, p.device_mesh, p.placements)
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * scale)


def build_optimizers(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                     betas: tuple[float, float], muon_lr: float, muon_momentum: float,
                     fused_ok: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for the model's hidden matrices plus AdamW for the rest.

    The groups are the model's own declaration (`param_groups()`, see lmforge/models/protocol.py):
    "matrix" parameters get weight decay (and Muon), "embedding" and "vector" ones never do."""
    if name not in ("adamw", "muon"):
        raise LmforgeError(f"optimizer must be adamw or muon, got {name!r}")
    groups = trainable_groups(model)
    hidden, embed, other = groups["matrix"], groups["embedding"], groups["vector"]
    if name == "muon" and any(p.ndim != 2 for p in hidden):
        raise LmforgeError(f"{type(model).__name__} declares a non-matrix parameter in its 'matrix' group; "
                           "Muon updates 2-D matrices only")
    kw = dict(lr=lr, betas=betas)
    if fused_ok:
        kw["fused"] = True
    if name == "adamw":
        adam_groups = [{"params": hidden, "weight_decay": weight_decay},
                       {"params": embed, "weight_decay": 0.0},
                       {"params": other, "weight_decay": 0.0}]
        return [torch.optim.AdamW([g for g in adam_groups if g["params"]], **kw)]
    adam_groups = [{"params": embed, "weight_decay": 0.0}, {"params": other, "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW([g for g in adam_groups if g["params"]], **kw)]
    if hidden:
        optimizers.append(Muon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay))
    return optimizers


def lr_multiplier(progress: float, step: int, *, warmup_steps: int, schedule: str,
                  min_lr_frac: float, decay_frac: float) -> float:
    """Multiplier on each group's base learning rate.

    progress in [0, 1] is the fraction of the run done (by steps or by wall-clock budget).
    - "cosine": linear warmup, then cosine from 1 to min_lr_frac.
    - "wsd": warmup, stable at 1, then a linear decay to min_lr_frac over the last decay_frac of
      the run (warmup-stable-decay: the run can be extended without restarting the schedule).
    - "constant": warmup then flat."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        if progress < 1 - decay_frac:
            return 1.0
        return 1.0 - (1 - min_lr_frac) * (progress - (1 - decay_frac)) / max(decay_frac, 1e-9)
    if schedule == "constant":
        return 1.0
    raise LmforgeError(f"schedule must be cosine, wsd or constant, got {schedule!r}")
