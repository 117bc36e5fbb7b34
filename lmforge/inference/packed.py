"""Linear layers whose weights are prepacked for oneDNN, for CPU inference.

A decode step multiplies one activation row (or a few) by every weight matrix: a matrix-vector
product, bound by reading the weights. `F.linear` hands it to a general GEMM that reads a row-major
matrix at a fraction of the memory bandwidth (768 x 12288, 2 threads: ~13 GB/s fp32, ~10 GB/s bf16).
oneDNN's own layout, packed once, lets its kernel stream the weights (the same matrix: ~40 GB/s fp32,
~34 GB/s bf16; the same results up to summation order). This is what `torch.compile`'s freezing does
for inference, without freezing the model: the layer repacks when its weight changes (trained in
between, loaded, cast), and computes as `F.linear` whenever gradients are on.

Layers that read the same input (q/k/v, gate/up) are packed as one stacked matrix when the model
calls them through `project` (lmforge/models/transformer.py). The cost is memory: the packed copy
doubles the linear layers' weights while the engine holds the model. `pack_linears` converts the
model's nn.Linear layers in place; they stay nn.Linear (same parameters, same state_dict), so
everything else that looks for linear layers still finds them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this call must take F.linear: gradients on, not a CPU tensor, mixed dtypes, a compiled
    step (inductor picks its own kernels), or a sharded (DTensor) weight, which is not one matrix here."""
    return (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != w.dtype
            or torch.compiler.is_compiling() or type(w.data) is not torch.Tensor)


def _state_key(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.data_ptr(), t._version, t.dtype)


class PackedLinear(nn.Linear):
    """nn.Linear with a oneDNN-packed copy of its weight, used for CPU inference (no gradients).

    `forward_fused` multiplies several layers that read the same input (q/k/v, gate/up) as one packed
    matrix: a decode step then makes fewer, larger products, which stream the weights faster (on this
    CPU, oneDNN reads a 256–2048-row bf16 matrix at ~15 GB/s and a 12,288-row one at ~34 GB/s)."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None
    _packed_bias: torch.Tensor | None = None
    _packed_sizes: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fused(x, (self,))[0]

    def forward_fused(self, x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
        """x through each of `layers` (this one first): one packed product when all of them are packed
        layers of one dtype and this call may take the packed path; else each layer on its own."""
        if len(layers) > 1 and any(type(m) is not PackedLinear for m in layers):
            return [m(x) for m in layers]  # e.g. one of them quantized or LoRA-wrapped: each on its own
        if any(_plain(x, m.weight) for m in layers):
            return [F.linear(x, m.weight, m.bias) for m in layers]
        key = tuple((_state_key(m.weight), _state_key(m.bias)) for m in layers)
        if key != self._packed_key:
            self._pack(key, layers)
        if self._packed is None:
            return [F.linear(x, m.weight, m.bias) for m in layers]
        y = torch.ops.mkldnn._linear_pointwise(x, self._packed, self._packed_bias, "none", [], "")
        return list(y.split(self._packed_sizes, dim=-1)) if len(layers) > 1 else [y]

    @torch.no_grad()
    def _pack(self, key: tuple, layers: tuple[nn.Module, ...]) -> None:
        """Pack the layers' current weights, stacked; keep the result only if the packed product agrees
        with F.linear (a private op that rejects or mishandles this shape or dtype must cost speed,
        not correctness)."""
        self._packed_key, self._packed, self._packed_bias = key, None, None
        w = torch.cat([m.weight.detach() for m in layers]) if len(layers) > 1 else self.weight.detach()
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat([m.bias.detach().to(w.dtype) if m.bias is not None
                              else w.new_zeros(m.out_features) for m in layers])
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            x = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()
        except (RuntimeError, NotImplementedError):
            return
        want = F.linear(x, w).float()
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
            self._packed, self._packed_bias = packed, bias
            self._packed_sizes = [m.out_features for m in layers]

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor, which cannot be copied or pickled; a copy of the
        # layer packs its own weight at its first inference call.
        state = dict(super().__getstate__())
        state["_packed"] = state["_packed_key"] = state["_packed_bias"] = None
        return state

    def unpack(self) -> None:
        """Drop the packed copy (it is made again at the next inference call)."""
        self._packed = self._packed_key = self._packed_bias = None


def pack_linears(model: nn.Module) -> nn.Module:
    """Make every nn.Linear of the model a PackedLinear, in place (and return the model). A no-op
    without oneDNN; the packing itself happens at each layer's first inference call on a CPU."""
    if _mkldnn_available():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = PackedLinear  # same object, same parameters: nothing else has to know
    return model
