"""Linear layers whose weights are prepacked for oneDNN, for CPU inference.

A decode step multiplies one activation row (or a few) by every weight matrix: a matrix-vector
product, bound by reading the weights. `F.linear` hands it to a general GEMM that reads a row-major
matrix at a fraction of the memory bandwidth (768 x 12288, 2 threads: ~13 GB/s fp32, ~10 GB/s bf16).
oneDNN's own layout, packed once, lets its kernel stream the weights (the same matrix: ~40 GB/s fp32,
~34 GB/s bf16; the same results up to summation order). This is what `torch.compile`'s freezing does
for inference, without freezing the model: the layer repacks when its weight changes (trained in
between, loaded, cast), and computes as `F.linear` whenever gradients are on.

The cost is memory: the packed copy doubles the linear layers' weights while the engine holds the
model. `pack_linears` converts the model's nn.Linear layers in place; they stay nn.Linear (same
parameters, same state_dict), so everything else that looks for linear layers still finds them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """nn.Linear with a oneDNN-packed copy of its weight, used for CPU inference (no gradients)."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != w.dtype
                or torch.compiler.is_compiling()  # a compiled step: inductor picks its own kernels
                or type(w.data) is not torch.Tensor):  # a sharded (DTensor) weight: not one matrix here
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version, w.dtype, None if self.bias is None else self.bias.dtype)
        if key != self._packed_key:
            self._pack(key)
        if self._packed is None:
            return F.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    @torch.no_grad()
    def _pack(self, key: tuple) -> None:
        """Pack the current weight; keep it only if the packed product agrees with F.linear (a private
        op that rejects or mishandles this shape or dtype must cost speed, not correctness)."""
        self._packed_key, self._packed = key, None
        w = self.weight
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            x = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()
        except (RuntimeError, NotImplementedError):
            return
        want = F.linear(x, w.detach()).float()
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
            self._packed = packed

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor, which cannot be copied or pickled; a copy of the
        # layer packs its own weight at its first inference call.
        state = dict(super().__getstate__())
        state["_packed"] = state["_packed_key"] = None
        return state

    def unpack(self) -> None:
        """Drop the packed copy (it is made again at the next inference call)."""
        self._packed = self._packed_key = None


def pack_linears(model: nn.Module) -> nn.Module:
    """Make every nn.Linear of the model a PackedLinear, in place (and return the model). A no-op
    without oneDNN; the packing itself happens at each layer's first inference call on a CPU."""
    if _mkldnn_available():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = PackedLinear  # same object, same parameters: nothing else has to know
    return model
