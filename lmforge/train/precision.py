"""Precision and compilation policy of the training step: which autocast dtype and whether to
torch.compile, per device (measured on this project's CPU; see docs/benchmarks.md)."""
from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.common import LmforgeError


def autocast_dtype(device: str, dtype: str) -> torch.dtype | None:
    """The autocast dtype for a device, or None for plain fp32.

    'auto' picks bf16 where matmuls run faster in it (CUDA with bf16 support, and CPUs: measured
    here at ~2x fp32 matmul throughput with AVX-512 BF16, see docs/benchmarks.md). fp16 is never
    chosen: it needs loss scaling and is extremely slow on CPU."""
    if dtype == "fp32":
        return None
    if dtype == "bf16":
        return torch.bfloat16
    if dtype != "auto":
        raise LmforgeError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device == "cpu":
        return torch.bfloat16
    return None


def use_compile(setting: str | bool, device: str, model: nn.Module | None = None) -> bool:
    """Whether to torch.compile the training step. 'auto' compiles on CUDA, and on a CPU unless the
    model drops out attention weights (dropout on the residual branches is fine). Measured on this
    project's 2-core CPU (docs/benchmarks.md): the compiled bf16 step of the `cpu` preset runs 1.47x
    faster than eager without dropout and 1.19x with residual dropout 0.2, which repays a cold
    compilation (~40-60 s) within a 5-minute run; dropout on the attention weights takes SDPA off its
    fused kernel (eager 1.4x slower) and inductor's CPU random masks take most of the compiled gain.
    A mixture of experts compiles to one graph like a dense model (its row buffer's size is fixed by
    the batch, lmforge/models/moe.py): 382 ms per compiled step against 456 eager for bench/moe.py's
    8 experts on the `cpu` preset, with residual dropout 0.2 (bench/moe_step.py, docs/benchmarks.md)."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "on", "off"):
        raise LmforgeError(f"compile must be auto, on or off, got {setting!r}")
    if setting == "auto":
        kind = device.split(":")[0]
        cfg = getattr(model, "config", None)
        attn = getattr(cfg, "attn_dropout", None)  # the transformer's own knob; else the one dropout
        dropout = float((getattr(cfg, "dropout", 0.0) if attn is None else attn) or 0.0)
        return kind == "cuda" or (kind == "cpu" and dropout == 0.0)
    return setting == "on"
