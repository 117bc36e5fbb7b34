"""What a training run needs before it starts: memory per device and compute.

The point is to catch a configuration that cannot fit before it runs (or before GPUs are rented).
Memory per device under data parallelism (DDP: every rank holds the whole model and optimizer):

    weights   4 bytes per parameter (fp32 master weights), plus 2 for the bf16 copies autocast makes
              and keeps for the backward pass
    gradients 4 bytes per parameter
    optimizer AdamW: 8 bytes per parameter (two moments); Muon: 4 bytes (one momentum buffer)
              for the hidden matrices it handles, AdamW's 8 for the rest
    activations: the tensors autograd keeps for the backward pass, per token of the micro-batch,
              plus the gradient of the logits (6 bytes per vocabulary entry and token) at its peak

Under FSDP2 (`parallel="fsdp"`) each of the N devices keeps 1/N of the fp32 weights, gradients and
optimizer state, plus what is whole for a moment: the bf16 copy of the block being computed and of
the next one (prefetched), with their bf16 gradients before they are reduce-scattered, and the root's
(embeddings, final norm, output head), which stays gathered through the step.

Activations are not guessed from a textbook formula (which depends on every detail of the block):
they are measured, by running a 1-layer and a 2-layer model of the same widths forward on a short
sequence under bf16 autocast and counting every tensor saved for backward once. The difference is
one layer's cost per token; the rest is embeddings, final norm and the logits. Attention runs through
`scaled_dot_product_attention`, which never stores the T x T scores, so the cost is linear in T.
Measured on the CPU; CUDA's kernels save the same tensors up to small per-head statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lmforge.models.protocol import trainable_groups
from lmforge.models.transformer import GPT, GPTConfig


def saved_activation_bytes(model: GPT, seq: int) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass of `seq` tokens under
    bf16 autocast (each storage counted once; the parameters themselves excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    idx = torch.zeros(1, seq, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    return sum(storages.values())


def activation_bytes_per_token(cfg: GPTConfig, probe_seq: int = 32) -> tuple[float, float]:
    """(bytes per token per layer, bytes per token outside the layers) kept for backward.

    Measured at two sequence lengths, so what does not grow with tokens (autocast's bf16 copies of
    the weights, also saved for backward) drops out of the difference; and with small vocabularies
    (the logits' share grows linearly with the vocabulary), so a big model's probe stays cheap."""
    def per_token(n_layer: int, vocab: int) -> float:
        model = GPT(replace(cfg, n_layer=n_layer, vocab_size=vocab, block_size=2 * probe_seq, dropout=0.0))
        return (saved_activation_bytes(model, 2 * probe_seq) - saved_activation_bytes(model, probe_seq)) / probe_seq

    small = per_token(1, 512)
    per_layer = per_token(2, 512) - small
    per_vocab_entry = (per_token(1, 1024) - small) / 512
    return per_layer, small - per_layer + per_vocab_entry * (cfg.vocab_size - 512)


@dataclass
class TrainingFootprint:
    params: int
    weights: float  # bytes per device (fp32 weights and their bf16 copies)
    gradients: float
    optimizer: float
    activations: float
    flops_per_step: float  # whole step, all devices

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def training_footprint(cfg: GPTConfig, *, batch_size: int, seq_len: int, grad_accum: int = 1, world: int = 1,
                       optimizer: str = "muon", parallel: str = "ddp") -> TrainingFootprint:
    """Per-device memory and per-step FLOPs of training `cfg` with `batch_size` sequences of
    `seq_len` tokens per micro-step on each of `world` data-parallel devices, each holding the whole
    model (parallel="ddp") or 1/world of it (parallel="fsdp")."""
    with torch.device("meta"):  # shapes only: no memory for the weights of a big model
        model = GPT(cfg)
    n = model.num_params()  # a tied matrix counts once
    # The matrices Muon updates: the model's declared "matrix" group, as the optimizer splits them.
    hidden = sum(p.numel() for p in trainable_groups(model)["matrix"])
    opt_bytes = 8.0 * n if optimizer == "adamw" else 4.0 * hidden + 8.0 * (n - hidden)
    per_layer, rest = activation_bytes_per_token(cfg)
    tokens = batch_size * seq_len
    # Plus the backward pass's largest transient: the logits' gradient, in fp32 and then bf16.
    acts = tokens * (cfg.n_layer * per_layer + rest + 6.0 * cfg.vocab_size)
    flops = model.flops_per_token(seq_len) * tokens * grad_accum * world
    weights, gradients = 6.0 * n, 4.0 * n
    if parallel == "fsdp" and world > 1:
        block = max(sum(p.numel() for p in unit.parameters()) for unit in model.shard_units())
        gathered = 2.0 * (n - cfg.n_layer * block) + 2.0 * min(2, cfg.n_layer) * block  # bf16: root + 2 blocks
        weights = 4.0 * n / world + gathered
        gradients = 4.0 * n / world + gathered  # the same tensors' bf16 gradients, before reduce-scatter
        opt_bytes /= world
    elif parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be ddp or fsdp, got {parallel!r}")
    return TrainingFootprint(params=n, weights=weights, gradients=gradients, optimizer=opt_bytes,
                             activations=acts, flops_per_step=flops)


def footprint_lines(f: TrainingFootprint, *, batch_size: int, seq_len: int, grad_accum: int, world: int,
                    parallel: str = "ddp") -> list[str]:
    """The estimate as `--dry-run` prints it."""
    gib = 2.0 ** 30
    how = f"each holds 1/{world} of the model (fsdp)" if parallel == "fsdp" and world > 1 else (
        "each holds the whole model (ddp)" if world > 1 else "one process")
    return [f"batch: {batch_size} sequences x {seq_len} tokens x {grad_accum} accumulation steps x {world} processes "
            f"= {batch_size * seq_len * grad_accum * world:,} tokens per step; {how}",
            f"memory per device (estimate): {f.total / gib:.2f} GiB = weights {f.weights / gib:.2f} + gradients "
            f"{f.gradients / gib:.2f} + optimizer {f.optimizer / gib:.2f} + activations {f.activations / gib:.2f}",
            f"compute: {f.flops_per_step / 1e12:.2f} TFLOP per step (all devices)"]
