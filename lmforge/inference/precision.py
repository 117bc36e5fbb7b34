"""The dtype a model's weights are stored and computed in, chosen once for inference.

Decoding one token reads every weight once, so its speed is set by the bytes the weights take: bf16
halves them. Autocast does not: it keeps the fp32 weights and casts each one to bf16 at every step,
which reads the fp32 copy *and* writes a bf16 one (measured slower than plain fp32 on a CPU). Casting
the weights once, at load, is what inference engines do (llama.cpp stores f16/bf16 tensors in the
file); then a step reads 2 bytes per weight and nothing is converted per step.

What stays fp32: the buffers a model does not save (rotary cos/sin tables, computed from the config):
they are tiny, and bf16 angles at long positions would be visibly wrong. Norms normalise in fp32
whatever their gains' dtype (lmforge/models/transformer.py `RMSNorm`), and every family returns fp32
logits, so sampling is the same code in both dtypes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.common import LmforgeError
from lmforge.inference.packed import pack_linears
from lmforge.quantize import QuantLinear

ENGINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def engine_dtype(name: str) -> torch.dtype:
    """The torch dtype of an engine dtype name ("fp32" or "bf16"), or one clear error."""
    if name not in ENGINE_DTYPES:
        raise LmforgeError(f"engine dtype must be {' or '.join(ENGINE_DTYPES)}, got {name!r}")
    return ENGINE_DTYPES[name]


def weight_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating parameters (None without any, e.g. a counted n-gram model);
    a model that mixes dtypes reports its first parameter's."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


@torch.no_grad()
def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the model's floating parameters and saved buffers in `dtype`, in place (and return the
    model). Unsaved buffers (rotary tables) keep their dtype, and so does a quantized layer (its
    codes are integers and its scales are in the dtype its fused kernel computes in). Casting to the
    dtype the weights already have costs nothing."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # .data: a tied weight is one Parameter and stays shared
        if isinstance(module, QuantLinear):
            continue
        unsaved = module._non_persistent_buffers_set
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype and name not in unsaved:
                setattr(module, name, b.to(dtype))
    return model


def prepare_for_inference(model: nn.Module, dtype: str | None = None, *, compile: bool = False) -> nn.Module:
    """What every decoder (Engine, Scheduler, Speculator) does to the model it is given, in place:
    cast the weights to `dtype` once ("fp32"/"bf16"; None: as stored) and, unless the decode step is
    compiled (inductor picks its own kernels), pack the linear layers for CPU inference
    (lmforge/inference/packed.py). Returns the model."""
    if dtype is not None:
        cast_weights(model, engine_dtype(dtype))
    if not compile:
        pack_linears(model)
    return model
