"""Weight-only quantization of the linear layers: int8 per output channel, int4 in groups.

Only the weights shrink; activations stay float, so a quantized layer computes y = x @ dequant(W)^T + b.
One-token decode is bound by reading weights from memory, so fewer weight bytes is the speed-up. On
CPU the layers run on PyTorch's fused weight-only kernels, which dequantize inside the matmul:
  int8: torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]
  int4: torch._weight_int4pack_mm_for_cpu(x [M, K], w uint8 [N, K/2] (kernel layout), group_size,
                                          scales_and_zeros [K/group_size, N, 2]) -> [M, N]
Elsewhere (GPU, a build without the kernels, a shape they reject) the weights are dequantized and
passed to F.linear, which works on any device. One exception to "activations stay float": an int8
layer given a single token on a CPU (decode at batch 1) runs fbgemm's int8 x int8 product with the
token's activations rounded to int8 on the fly (`QuantLinear._decode_int8`; llama.cpp's q8_0 rounds
them in blocks of 32): 3x the speed of the weight-only kernel, for rounding that changed no measured loss.

Formats (N = out_features, K = in_features)
  int8  symmetric per output row: w[n, k] ~ scales[n] * q[n, k], q in [-127, 127].
  int4  asymmetric per group of `group_size` consecutive input columns:
        w ~ (q - 8) * scale + zero, q in [0, 15], so zero is the value that code 8 stands for (the
        convention of the fused kernel). Asymmetric because the kernel applies a zero point anyway,
        so it is free at run time, and spanning each group's [min, max] with all 16 levels gives a
        smaller step than a symmetric [-absmax, absmax] grid, which wastes levels on the side of zero
        the group does not reach.

Quantization is a transform of a built model (`quantize_model`, `prepare_quantized`); this module
does no file I/O, so it depends on nothing but torch. A quantized checkpoint
(`lmforge.train.checkpoint.save_quantized`) is an ordinary checkpoint folder whose state.json
holds "quantization": {"bits", "group_size", "include_lm_head"}. Its int4 codes are stored in a
plain layout (two codes per byte, the even column in the low nibble), never the kernel's private,
instruction-set-dependent one, so files move between machines.
"""
from __future__ import annotations

import functools
import itertools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the fused CPU kernel accepts
# Scales (and int4 zero points) are held in bf16, and the fused kernels run in bf16: they want
# activations and scales in one dtype, and their fp32 path is far slower (768x3072 matvec, one
# thread, AVX512: int8 141 us in bf16 vs 1962 us in fp32; fp32 nn.Linear 185 us).
SCALE_DTYPE = torch.bfloat16
DENSE_MIN_ROWS = 16  # int8 on CPU: from this many rows (tokens) on, dense bf16 beats the kernel
_EPS = 1e-12  # floor for scales, so all-zero rows and constant groups do not divide by zero


# ----------------------------------------------------------------------------- quantizers


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scales bf16 [N]) with w ~ q * scales[:, None]."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=_EPS).to(SCALE_DTYPE)
    # Round against the scales as stored, so the codes fit the grid the kernel will use.
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes uint8 [N, K] in 0..15, scales_and_zeros bf16 [K/group_size, N, 2])."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    # 16 levels spanning [lo, hi]; scale and zero rounded to bf16 first, codes fitted to them.
    scale = ((hi - lo) / 15).clamp(min=_EPS).to(SCALE_DTYPE).float()
    zero = (lo + 8 * scale).to(SCALE_DTYPE).float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    # [K/g, N, 2] is the layout the kernel reads; it is also what we store.
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(SCALE_DTYPE).contiguous()
    return q.reshape(N, K).to(torch.uint8), scales_and_zeros


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_int4 up to rounding: codes [N, K] -> weights [N, K] in `dtype`."""
    N, K = codes.shape
    sz = scales_and_zeros.to(dtype)
    scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [N, K/g, 1]
    q = codes.reshape(N, K // group_size, group_size).to(dtype)
    return ((q - 8) * scale + zero).reshape(N, K)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Plain layout: codes uint8 [N, K] (0..15) -> [N, K/2], column 2j in the low nibble, 2j+1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------- the CPU kernels' int4 layout


def _to_kernel_layout(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] on CPU -> the uint8 [N, K/2] tensor _weight_int4pack_mm_for_cpu reads.
    (inner_k_tiles only matters for the CUDA layout; the CPU op checks it but does not use it.)"""
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All 4-bit values of a uint8 tensor, flat, low nibble of each byte first."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)


def _from_kernel_layout(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of _to_kernel_layout: the codes uint8 [N, K] held in a kernel-layout tensor.

    The kernel's layout is private to PyTorch and differs between CPU instruction sets (AVX512 and
    AVX2 interleave rows differently), so rather than hard-code it we observe it: pack probe
    matrices whose codes spell out each element's own index n*K + k, four bits per probe, and read
    back where every index landed. Used when saving or leaving the CPU, never per forward call."""
    itype = torch.int32 if N * K < 2**31 else torch.int64  # halves the temporaries for big layers
    index = torch.arange(N * K, dtype=itype)
    source = torch.zeros(N * K, dtype=itype)  # slot -> flat index of the code it holds
    for shift in range(0, max(1, (N * K - 1).bit_length()), 4):
        probe = ((index >> shift) & 15).to(torch.uint8).view(N, K)
        source |= _nibbles(_to_kernel_layout(probe)).to(itype) << shift
    codes = torch.empty(N * K, dtype=torch.uint8)
    codes[source] = _nibbles(packed.cpu())
    return codes.view(N, K).to(packed.device)


@functools.cache
def kernel_available(bits: int) -> bool:
    """Whether this torch build has the fused CPU kernel for `bits` and it runs (tried once, tiny)."""
    try:
        x = torch.ones(1, 64, dtype=SCALE_DTYPE)
        if bits == 8:
            y = torch._weight_int8pack_mm(x, torch.ones(16, 64, dtype=torch.int8), torch.ones(16, dtype=x.dtype))
        else:
            codes = torch.full((16, 64), 9, dtype=torch.uint8)  # (9 - 8) * 1 + 0 = 1
            sz = torch.stack([torch.ones(2, 16), torch.zeros(2, 16)], dim=-1).to(x.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x, _to_kernel_layout(codes), 32, sz)
        return bool(torch.equal(y.float(), torch.full((1, 16), 64.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# ----------------------------------------------------------------------------- the layer


class QuantLinear(nn.Module):
    """nn.Linear with its weight held as int8 or int4 codes plus float scales (the bias stays float).

    Buffers: int8 - qweight int8 [N, K], scales bf16 [N];
             int4 - qweight uint8 [N, K/2], scales_and_zeros bf16 [K/group_size, N, 2].
    On CPU an int4 qweight is held in the fused kernel's layout (`kernel_layout`); state_dict() always
    gives, and load_state_dict() always takes, the plain layout."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int | None = 32,
                 bias: bool = False):
        super().__init__()
        check_shape(in_features, bits, group_size)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        if bits == 8:
            self.group_size = None
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, dtype=SCALE_DTYPE))
        else:
            self.group_size = group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales_and_zeros",
                                 torch.zeros(in_features // group_size, out_features, 2, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel_layout = False  # int4 only: qweight is in the CPU kernel's layout
        self.use_kernel = False
        self._packed = None  # int8 only: fbgemm's packed copy of the weight for one-token decode
        self._path_device = None  # the device the path above was chosen for
        self._fused = self._fused_key = self._fused_sizes = None  # forward_fused's stacked copy

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = 32) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        w = linear.weight
        if bits == 8:
            q.qweight, q.scales = quantize_int8(w)
        else:
            codes, q.scales_and_zeros = quantize_int4(w, group_size)
            q.qweight = pack_int4(codes)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        q.to(w.device)
        q.select_path()
        return q

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"bias={self.bias is not None}, kernel={self.use_kernel}")

    # ------------------------------------------------------------------ weights

    def int4_codes(self) -> torch.Tensor:
        """int4 codes uint8 [N, K] in 0..15, whatever layout qweight is held in."""
        if self.kernel_layout:
            return _from_kernel_layout(self.qweight, self.out_features, self.in_features)
        return unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] the layer computes with."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        return dequantize_int4(self.int4_codes(), self.scales_and_zeros, self.group_size, dtype)

    @torch.no_grad()
    def select_path(self) -> None:
        """Choose fused kernel or dequantize fallback for the device the weights are on, converting
        the int4 layout to match. Called after quantizing, after loading, and when the layer moved."""
        device = self.qweight.device
        self._path_device = device
        want = device.type == "cpu" and kernel_available(self.bits)
        if self.bits == 8:
            # The kernels are private ops with shape rules of their own; one that rejects or mishandles
            # this shape must cost speed, not correctness, hence the checks against the plain matmul.
            weight = self.dequantize()
            self.use_kernel = want and self._kernel_agrees(weight)
            self._packed = _pack_int8(self.qweight, self.scales) if device.type == "cpu" else None
            if self._packed is not None and not self._agrees(self._decode_int8, weight):
                self._packed = None
            return
        if want == self.use_kernel:
            return
        codes = self.int4_codes()
        if want and self.out_features % 16 == 0:  # the int4 packing op requires it
            self.qweight, self.kernel_layout, self.use_kernel = _to_kernel_layout(codes), True, True
            if self._kernel_agrees(dequantize_int4(codes, self.scales_and_zeros, self.group_size)):
                return
        self.qweight, self.kernel_layout, self.use_kernel = pack_int4(codes), False, False

    def _kernel_agrees(self, weight: torch.Tensor) -> bool:
        return self._agrees(self._kernel_matmul, weight, rows=2)

    def _agrees(self, matmul, weight: torch.Tensor, rows: int = 1) -> bool:
        x = torch.randn(rows, self.in_features, generator=torch.Generator().manual_seed(0))
        try:
            y = matmul(x)
        except RuntimeError:
            return False
        ref = F.linear(x.to(y.dtype).float(), weight.float())
        # Loose: bf16 outputs differ in the 3rd digit, a wrong layout or a rejected shape by O(1).
        tol = 2e-2 * float(ref.abs().max())
        return y.shape == ref.shape and bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=tol))

    # ------------------------------------------------------------------ forward

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] float on CPU -> [M, N], computed in the scales' dtype (bf16 unless the model was cast)."""
        if self.bits == 8:
            return torch._weight_int8pack_mm(x2.to(self.scales.dtype).contiguous(), self.qweight, self.scales)
        sz = self.scales_and_zeros
        return torch._weight_int4pack_mm_for_cpu(x2.to(sz.dtype).contiguous(), self.qweight, self.group_size, sz)

    def _decode_int8(self, x2: torch.Tensor) -> torch.Tensor:
        """One token [1, K] through fbgemm: the activations are quantized to int8 on the fly (one scale
        for the token, as llama.cpp's q8_0 quantizes them in blocks) and multiplied with the int8
        weights in integer arithmetic, so the step reads one byte per weight at close to memory speed
        (768 x 49152, 2 threads: 3x the weight-only kernel below). The price is the activations'
        rounding: about 0.5% of the output's scale on random data, a tolerance the tests state."""
        return torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._packed, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight.device != self._path_device:  # moved by .to() since the path was chosen
            self.select_path()
        x2 = x.reshape(-1, self.in_features)
        if self._packed is not None and x2.shape[0] == 1 and not torch.compiler.is_compiling():
            # Several rows would share one activation scale here (fbgemm quantizes the whole input with
            # one), so only a single token takes this path; a batch reads each weight once for all rows.
            # (Not inside torch.compile, which cannot trace fbgemm's packed weight object.)
            y = self._decode_int8(x2)
        elif self.bits == 8 and (not self.use_kernel or x2.shape[0] >= DENSE_MIN_ROWS):
            # A dense matmul on the codes cast to float; per-row scales commute with it, so they scale
            # the output. On CPU this is the prefill path: the kernel's cost grows row by row, and a
            # bf16 GEMM beats it from ~16 rows on (768x3072, 64 rows: 1.9 ms vs 4.2 ms; fp32 3.6 ms).
            dt = self.scales.dtype if self.use_kernel else x.dtype
            y = F.linear(x2.to(dt), self.qweight.to(dt)) * self.scales.to(dt)
        elif self.use_kernel:
            y = self._kernel_matmul(x2)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_fused(self, x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
        """x through `layers` (this one first; all read x: q/k/v, gate/up, see `project` in
        lmforge/models/transformer.py): for a single token whose layers all take the fbgemm int8 path,
        one product over their stacked codes (fewer, larger products stream the weights faster);
        otherwise each layer on its own."""
        x2 = x.reshape(-1, self.in_features)
        if (len(layers) == 1 or x2.shape[0] != 1 or torch.compiler.is_compiling()
                or any(type(m) is not QuantLinear or m._packed is None or m.qweight.device != m._path_device
                       for m in layers)):
            return [m(x) for m in layers]
        key = tuple((m.qweight.data_ptr(), m.qweight._version, m.scales.data_ptr(), m.scales._version) for m in layers)
        if key != self._fused_key:  # the same codes and scales as the members' own packed copies, stacked
            self._fused_key, self._fused_sizes = key, [m.out_features for m in layers]
            self._fused = _pack_int8(torch.cat([m.qweight for m in layers]), torch.cat([m.scales for m in layers]))
        if self._fused is None:
            return [m(x) for m in layers]
        y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._fused, False).to(x.dtype)
        out = []
        for m, part in zip(layers, y.split(self._fused_sizes, dim=-1)):
            if m.bias is not None:
                part = part + m.bias.to(part.dtype)
            out.append(part.reshape(*x.shape[:-1], m.out_features))
        return out

    # ------------------------------------------------------------------ state dict: always the plain layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:
            destination[prefix + "qweight"] = pack_int4(self.int4_codes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.kernel_layout:  # loading replaces the codes, so just return to the plain layout
            self.qweight = torch.zeros(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                       device=self.qweight.device)
        self.kernel_layout = self.use_kernel = False  # choose again for the new weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.select_path()


def _pack_int8(qweight: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed form of int8 codes with per-row scales (None where this torch has no fbgemm)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():
            # PyTorch deprecates its quantized tensor types in favour of torchao; lmforge pins torch
            # exactly, and where the op is gone this returns None and the kernel below is used.
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(qweight.cpu(), scales.double().cpu(), zeros, 0)
            return torch.ops.quantized.linear_prepack(q, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def check_shape(in_features: int, bits: int, group_size: int | None) -> None:
    if bits == 8:
        return
    if bits != 4:
        raise LmforgeError(f"bits must be 8 or 4, got {bits}")
    if group_size not in INT4_GROUP_SIZES:
        raise LmforgeError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise LmforgeError(f"int4 group size {group_size} does not divide a layer's input size "
                           f"{in_features}; choose a smaller group size")


# ----------------------------------------------------------------------------- whole models


def _targets(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers to quantize. A head tied to the embedding table gets a quantized copy of
    its own: the table stays float for lookups, which read one row per token, while the head reads
    all of it at every token (GPT-2 small: a third of the model's bytes), so the copy costs memory
    (a quarter of the table at int8) and buys speed."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and not (name == "lm_head" and not include_lm_head)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantization_config(model: nn.Module) -> dict | None:
    """{"bits", "group_size", "include_lm_head"} of a quantized model, None for a float one."""
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not qs:
        return None
    kinds = {(m.bits, m.group_size) for m in qs}
    if len(kinds) > 1:
        raise LmforgeError(f"model mixes quantization settings {sorted(kinds, key=str)}")
    bits, group_size = kinds.pop()
    return {"bits": bits, "group_size": group_size,
            "include_lm_head": isinstance(getattr(model, "lm_head", None), QuantLinear)}


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 32,
                   include_lm_head: bool = True) -> nn.Module:
    """Replace the model's nn.Linear layers by QuantLinear in place (and return the model).
    group_size applies to int4 only (int8 has one scale per output row)."""
    targets = _targets(model, include_lm_head)
    for _, m in targets:  # check every layer before changing any, so an error leaves the model whole
        check_shape(m.in_features, bits, group_size)
    existing = quantization_config(model)
    if existing and (existing["bits"], existing["group_size"]) != (bits, group_size if bits == 4 else None):
        raise LmforgeError(f"model is already quantized ({existing}); quantize the float model instead")
    for name, m in targets:
        _replace(model, name, QuantLinear.from_linear(m, bits, group_size))
    return model


def prepare_quantized(model: nn.Module, quantization: dict) -> nn.Module:
    """Give a freshly built float model the quantized layers described by a checkpoint's
    "quantization" entry, with empty weights, ready for load_state_dict (no quantization work)."""
    bits, group_size = quantization["bits"], quantization.get("group_size")
    targets = _targets(model, quantization.get("include_lm_head", True))
    for _, m in targets:
        check_shape(m.in_features, bits, group_size)
    for name, m in targets:
        _replace(model, name, QuantLinear(m.in_features, m.out_features, bits, group_size, bias=m.bias is not None))
    return model


def _tensors(modules) -> int:
    """Bytes of the distinct parameters and buffers of `modules` (their own, not their children's)."""
    seen, total = set(), 0
    for m in modules:
        for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            if t.data_ptr() not in seen:  # tied weights are one tensor
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (including non-persistent ones such as the
    rotary tables), counting shared tensors once."""
    return _tensors(model.modules())


def linear_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the linear layers alone (float or quantized): what quantization shrinks."""
    return _tensors(m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear)))
