"""The decoder-only transformer, in one file that reads top to bottom.

One class per concept: norms, rotary embeddings, attention (grouped-query aware), the MLP variants,
the block, and the model. Everything a preset can change is a field of `GPTConfig`; presets are
named configs at the bottom of the file.

Layout follows the Llama naming (embed_tokens, layers.N.self_attn.q_proj, mlp.gate_proj, norm,
lm_head) so that weights map one-to-one onto Hugging Face checkpoints.

This file is long because the one model also computes what open-weight architectures compute
(Llama 3.1 RoPE scaling, Qwen2's q/k/v biases, Gemma-2's soft-capping, sliding windows and sandwich
norms) as config fields, and splitting the attention or the cache from the model they serve would
break the top-to-bottom reading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.moe import MoE, Tallies
from lmforge.models.protocol import LanguageModel, ModelConfig, ModelFamily


@dataclass(frozen=True)
class GPTConfig(ModelConfig):
    vocab_size: int = 4096
    block_size: int = 256  # context window in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); 1 = multi-query; else grouped-query
    n_embd: int = 256
    head_size: int | None = None  # None = n_embd // n_head; set when heads x size != n_embd (Qwen3, Gemma-2)
    mlp: str = "swiglu"  # "swiglu" | "geglu" (Gemma) | "gelu" | "relu2"
    mlp_hidden: int | None = None  # None = 4*n_embd (gelu/relu2) or ~8/3*n_embd rounded (swiglu)
    norm: str = "rms"  # "rms" | "layer"
    pos: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    # "llama3": Llama-3.1's long-context RoPE, low frequencies slowed by rope_factor, high ones kept,
    # a smooth blend between (wavelengths measured against rope_original_context)
    rope_scaling: str | None = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    qk_norm: bool = False  # normalise queries and keys per head before attention (stabilises training)
    tie_embeddings: bool = False
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 had them)
    qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma stores gains minus 1: offset 1)
    sandwich_norm: bool = False  # also normalise each branch's output before the residual add (Gemma-2)
    embed_scale: bool = False  # multiply token embeddings by sqrt(n_embd) (Gemma)
    attn_scale: float | None = None  # attention score scale; None = 1 / sqrt(head size)
    attn_softcap: float | None = None  # cap * tanh(score / cap) on attention scores (Gemma-2)
    logit_softcap: float | None = None  # the same on the output logits (Gemma-2)
    sliding_window: int | None = None  # the layers in window_layers attend to this many latest tokens
    window_layers: tuple[int, ...] = ()
    # Mixture of experts (lmforge/models/moe.py): n_experts > 0 makes every block's MLP a router over
    # n_experts expert MLPs of moe_hidden units, moe_top_k of them per token, plus moe_shared experts
    # every token goes through.
    n_experts: int = 0
    moe_top_k: int = 2
    moe_shared: int = 0
    moe_hidden: int | None = None  # None = hidden_dim
    moe_gate: str = "softmax"  # "softmax" | "sigmoid"
    moe_norm_topk: bool = True  # renormalise the chosen experts' weights to sum to 1
    moe_capacity: float | None = None  # capacity factor; None = dropless
    moe_balance: str = "aux"  # "aux" (Switch loss) | "bias" (DeepSeek-V3, loss-free) | "none"
    moe_aux_coef: float = 0.01
    moe_z_coef: float = 0.0  # router z-loss
    moe_bias_rate: float = 1e-3
    dropout: float = 0.0  # on the embeddings and each residual branch's output
    attn_dropout: float | None = None  # on the attention weights; None = dropout (nanoGPT's single knob)
    init_std: float = 0.02
    causal: bool = True  # False: every token attends to every other (masked diffusion, encoders)

    def __post_init__(self):
        def bad(msg):
            raise LmforgeError(f"invalid model config: {msg}")

        # a checkpoint's JSON gives a list; the config stays hashable and compares equal
        object.__setattr__(self, "window_layers", tuple(self.window_layers))

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_size is None and self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head} (set head_size)")
        if self.head_size is not None and self.head_size <= 0:
            bad(f"head_size must be positive, got {self.head_size}")
        kv = self.kv_heads
        if kv <= 0 or self.n_head % kv:
            bad(f"n_head={self.n_head} is not a multiple of n_kv_head={kv}")
        if self.mlp not in ("swiglu", "geglu", "gelu", "relu2"):
            bad(f"mlp must be swiglu, geglu, gelu or relu2, got {self.mlp!r}")
        if self.rope_scaling not in (None, "llama3"):
            bad(f"rope_scaling must be None or 'llama3', got {self.rope_scaling!r}")
        if self.norm_offset and self.norm != "rms":
            bad("norm_offset applies to RMSNorm only")
        for name in ("attn_softcap", "logit_softcap", "sliding_window"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.moe_top_k <= self.n_experts):
            bad(f"moe_top_k must be in 1..n_experts ({self.n_experts}), got {self.moe_top_k}")
        if self.n_experts and (self.moe_gate not in ("softmax", "sigmoid")
                               or self.moe_balance not in ("aux", "bias", "none")):
            bad(f"moe_gate must be softmax or sigmoid and moe_balance aux, bias or none; got "
                f"{self.moe_gate!r}, {self.moe_balance!r}")
        if self.moe_capacity is not None and self.moe_capacity <= 0:
            bad(f"moe_capacity must be positive, got {self.moe_capacity}")
        if self.window_layers and (self.sliding_window is None
                                   or not all(0 <= i < self.n_layer for i in self.window_layers)):
            bad(f"window_layers {list(self.window_layers)} need a sliding_window and indices below n_layer")
        if self.norm not in ("rms", "layer"):
            bad(f"norm must be rms or layer, got {self.norm!r}")
        if self.pos not in ("rope", "learned"):
            bad(f"pos must be rope or learned, got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            bad(f"rotary embeddings need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            bad(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    @property
    def expert_hidden(self) -> int:
        return self.hidden_dim if self.moe_hidden is None else self.moe_hidden

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp in ("swiglu", "geglu"):
            # Two input matrices instead of one: 2/3 of 4*d keeps the parameter count of a 4*d MLP.
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses precision in bf16.
        # The gain (Gemma's is 1 + w) in fp32 too: bf16 weights lose nothing and the kernel stays fused.
        gain = self.weight.float() + self.offset if self.offset else self.weight.float()
        return F.rms_norm(x.float(), (x.size(-1),), gain, self.eps).to(x.dtype)


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rms":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE) in the "rotate half" layout used by Llama checkpoints:
    the first and second halves of each head vector form the (x, y) pairs that get rotated."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        if cfg.rope_scaling == "llama3":
            inv_freq = llama3_frequencies(inv_freq, cfg)
        t = torch.arange(cfg.block_size, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x, positions: torch.Tensor):
        # x: (B, H, T, hd); positions: (T,) absolute positions of the T tokens
        return apply_rotary(x, self.cos[positions], self.sin[positions])


def llama3_frequencies(inv_freq: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: frequencies whose wavelength is longer than the original context /
    low_freq_factor are divided by rope_factor, those shorter than context / high_freq_factor are kept,
    and the ones between are blended linearly in context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = cfg.rope_original_context / wavelength  # how many times each wave fits in the old context
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    smooth = ((ratio - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow everything down, 1: keep
    return (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq


def apply_rotary(x, cos, sin):
    """Rotate x (..., T, hd) by the angles whose cos/sin are given (broadcastable to x)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attend(q, k, v, *, causal: bool, mask=None, scale: float | None = None, softcap: float | None = None,
           dropout: float = 0.0):
    """softmax(q k^T * scale [capped]) v over (..., heads, T, hd) tensors; mask (broadcastable, True =
    may attend) replaces the causal flag when given. Capped scores have no fused kernel, so they are
    spelled out (Gemma-2); everything else goes through SDPA."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              dropout_p=dropout, scale=scale)
    scores = (q @ k.transpose(-2, -1)).float() * (q.size(-1) ** -0.5 if scale is None else scale)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None and causal:
        mask = window_mask(q.size(-2), None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), dropout).to(v.dtype)
    return weights @ v


def window_mask(T: int, window: int | None, device) -> torch.Tensor:
    """(T, T) causal mask, True where query i may see key j: j <= i, and j > i - window if a window is set."""
    i = torch.arange(T, device=device)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    return mask


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """x through several linear layers that all read it (q/k/v; gate/up): `[layer(x) for layer in
    layers]`, computed as one stacked product when an inference engine has packed the layers for
    its CPU kernels (lmforge/inference/packed.py: fewer, larger products stream the weights faster)."""
    fused = getattr(layers[0], "forward_fused", None)
    return fused(x, layers) if fused is not None else [layer(x) for layer in layers]


class CausalSelfAttention(nn.Module):
    """Multi-head attention where n_kv_head key/value heads are shared by groups of query heads
    (n_kv_head = n_head: classic MHA; 1: multi-query). Fewer KV heads shrink the KV cache.
    A layer listed in cfg.window_layers sees only the latest cfg.sliding_window tokens."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.causal = cfg.causal
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.window = cfg.sliding_window if layer in cfg.window_layers else None

    def _mask(self, T: int, device) -> torch.Tensor | None:
        """The (T, T) mask of a windowed layer when the window cuts something off; else None (causal flag)."""
        if self.window is None or T <= self.window:
            return None
        if not self.causal:
            raise LmforgeError("sliding-window attention is only defined for causal models")
        return window_mask(T, self.window, device)

    def forward(self, x, rotary: Rotary | None, positions: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, step: CacheStep | None = None,
                key_mask: torch.Tensor | None = None):
        """Without kv: causal attention over x (training and plain inference). With kv (this layer's
        key/value cache buffers) and step: cached inference, see GPT.prefill and GPT.decode.
        key_mask (B, T) bool, bidirectional models only: False for padding, which no token attends to."""
        B, T, _ = x.shape
        # Head counts from the projections' widths, not the config: under tensor parallelism a rank
        # holds only its share of the heads (lmforge/train/parallel.py), and the code is the same.
        q, k, v = (y.view(B, T, -1, self.head_dim).transpose(1, 2)
                   for y in project(x, self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if kv is not None:
            return self._forward_cached(q, k, v, kv, step)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        if k.size(1) != q.size(1):
            # Expand shared KV heads to the query heads (a view-and-copy; SDPA's enable_gqa does the
            # same but not on every backend).
            rep = q.size(1) // k.size(1)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = self._mask(T, x.device)
        if key_mask is not None:
            if self.causal:  # right padding is never attended to by a causal model's real tokens anyway
                raise LmforgeError("a padding mask is for bidirectional attention (causal=False)")
            mask = key_mask[:, None, None, :]  # (B, 1, 1, T): every query, every head
        y = attend(q, k, v, causal=self.causal, mask=mask, scale=self.scale,
                   softcap=self.softcap, dropout=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)

    def _forward_cached(self, q, k, v, kv, step: CacheStep):
        B, _, T, hd = q.shape
        k_buf, v_buf = kv
        if step.cos is not None:  # rotary angles computed once per step for all layers
            q, k = apply_rotary(q, step.cos, step.sin), apply_rotary(k, step.cos, step.sin)
        if step.write is None:
            # Prefill: the rows' first T tokens go to slots 0..T-1 and attend causally among
            # themselves, exactly as in the uncached forward.
            k_buf[:, :, :T] = k
            v_buf[:, :, :T] = v
            if self.n_kv_head != self.n_head:
                rep = self.n_head // self.n_kv_head
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            y = attend(q, k, v, causal=True, mask=self._mask(T, q.device), scale=self.scale, softcap=self.softcap)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))
        # Decode, one token per row: store its key/value at the row's own slot, then attend to the
        # row's slots 0..position. Instead of copying the cached heads out to every query head,
        # the query heads sharing a KV head become that head's "query positions": (B, n_kv, rep, hd)
        # against (B, n_kv, L, hd), the same grouping as repeat_interleave (query head h uses KV
        # head h // rep). No causal mask is needed for a single query, only the length mask.
        # Indexed assignment, not scatter_: torch.compile updates the cache in place for it, while
        # its scatter_ copied the whole cache buffer twice per layer and step.
        rows, slots = step.write
        if slots.dim() == 2:
            return self._forward_cached_many(q, k, v, kv, step)
        k_buf[rows, :, slots] = k[:, :, 0].to(k_buf.dtype)
        v_buf[rows, :, slots] = v[:, :, 0].to(v_buf.dtype)
        keys = k_buf[:, :, :step.length].to(q.dtype)
        values = v_buf[:, :, :step.length].to(q.dtype)
        q = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, hd)
        mask = step.mask
        if self.window is not None:  # and no further back than the window
            mask = mask & (torch.arange(step.length, device=q.device) > slots[:, None] - self.window).view(B, 1, 1, -1)
        y = attend(q, keys, values, causal=False, mask=mask, scale=self.scale, softcap=self.softcap)
        return self.o_proj(y.reshape(B, 1, self.n_head * hd))

    def _forward_cached_many(self, q, k, v, kv, step: CacheStep):
        """T tokens per row at slots step.write[1] (B, T) (GPT.decode_many): the single-token decode
        generalised. Their keys/values go to those slots; each query sees the row's slots up to its
        own position (step.mask (B, 1, T, length)). The query heads sharing a KV head are again
        folded into that head's query rows, (B, n_kv, rep * T, hd), so the cache is not copied."""
        B, _, T, hd = q.shape
        k_buf, v_buf = kv
        rows, slots = step.write
        # Advanced indices around a slice put their (B, T) dims first: the values are (B, T, n_kv, hd).
        k_buf[rows, :, slots] = k.transpose(1, 2).to(k_buf.dtype)
        v_buf[rows, :, slots] = v.transpose(1, 2).to(v_buf.dtype)
        keys = k_buf[:, :, :step.length].to(q.dtype)
        values = v_buf[:, :, :step.length].to(q.dtype)
        rep = self.n_head // self.n_kv_head
        q = q.reshape(B, self.n_kv_head, rep * T, hd)  # head h = kv * rep + r: rows (r, t) of KV head kv
        mask = step.mask
        if self.window is not None:
            mask = mask & (torch.arange(step.length, device=q.device) > slots[..., None] - self.window)[:, None]
        mask = mask[:, :, None].expand(B, 1, rep, T, step.length).reshape(B, 1, rep * T, step.length)
        y = attend(q, keys, values, causal=False, mask=mask, scale=self.scale, softcap=self.softcap)
        return self.o_proj(y.view(B, self.n_head, T, hd).transpose(1, 2).reshape(B, T, self.n_head * hd))


class MLP(nn.Module):
    """Position-wise feed-forward: SwiGLU (Llama), GeGLU (Gemma), GELU (GPT-2) or squared ReLU (Primer)."""

    def __init__(self, cfg: GPTConfig, hidden: int | None = None):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden_dim if hidden is None else hidden
        if self.kind in ("swiglu", "geglu"):
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, valid=None):  # valid: see MoE.forward (a dense MLP treats every token alike)
        if self.kind in ("swiglu", "geglu"):
            return self.down_proj(self.activate(*project(x, self.gate_proj, self.up_proj)))
        return self.down_proj(self.activate(None, self.up_proj(x)))

    def activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return F.silu(gate) * up
        if self.kind == "geglu":
            return F.gelu(gate, approximate="tanh") * up
        return F.gelu(up, approximate="tanh") if self.kind == "gelu" else F.relu(up).square()

    @staticmethod
    def grouped(experts: nn.ModuleList, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor | None:
        """Every expert of a mixture at once: x (rows, dim) sorted by expert, ends[e] (int32) the end of
        expert e's rows. One grouped product per projection (F.grouped_mm over the stacked weights)
        instead of a loop of small ones, and every shape static, so torch.compile compiles the layer
        once. Rows past ends[-1] come back unspecified. None where the grouped kernel does not run
        (projections that are not plain bias-free nn.Linear, such as an inference engine's packed or
        quantized layers or LoRA adapters; CUDA before sm80 or outside bf16): the caller loops."""
        first = experts[0]
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(first, "gate_proj") else ("up_proj", "down_proj")
        layers = [[getattr(e, n) for e in experts] for n in names]
        if any(type(m) is not nn.Linear or m.bias is not None for ms in layers for m in ms):
            return None
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if kind != "cpu" and not (kind == "cuda" and dtype == torch.bfloat16
                                  and torch.cuda.get_device_capability(x.device) >= (8, 0)):
            return None

        def run(rows, modules):  # rows @ W_e.T for each expert's rows
            weights = torch.stack([m.weight for m in modules]).to(dtype)
            return F.grouped_mm(rows, weights.transpose(-2, -1), offs=ends)

        x = x.to(dtype)
        hidden = [run(x, ms) for ms in layers[:-1]]
        gate, up = hidden if len(hidden) == 2 else (None, hidden[0])
        return run(first.activate(gate, up), layers[-1])


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). (Llama's names: the
    post_attention_layernorm is the norm in front of the MLP.) With sandwich_norm each branch's output
    is normalised again before it is added (Gemma-2's post-attention and post-feed-forward norms)."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = CausalSelfAttention(cfg, layer)
        self.attn_out_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.mlp_out_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary, positions, kv=None, step=None, valid=None, key_mask=None):
        x = x + self.drop(self.attn_out_norm(self.self_attn(self.input_layernorm(x), rotary, positions, kv, step,
                                                            key_mask)))
        x = x + self.drop(self.mlp_out_norm(self.mlp(self.post_attention_layernorm(x), valid)))
        return x


def make_mlp(cfg: GPTConfig) -> nn.Module:
    """The block's feed-forward layer: one MLP, or a mixture of expert MLPs (lmforge/models/moe.py)."""
    if not cfg.n_experts:
        return MLP(cfg)
    shared = MLP(cfg, cfg.moe_shared * cfg.expert_hidden) if cfg.moe_shared else None
    return MoE(cfg.n_embd, cfg.n_experts, cfg.moe_top_k, lambda: MLP(cfg, cfg.expert_hidden), shared=shared,
               gate=cfg.moe_gate, norm_topk=cfg.moe_norm_topk, capacity=cfg.moe_capacity, balance=cfg.moe_balance,
               aux_coef=cfg.moe_aux_coef, z_coef=cfg.moe_z_coef, bias_rate=cfg.moe_bias_rate)


# ----------------------------------------------------------------------------- key/value cache


class KVCache:
    """Keys and values of the tokens seen so far, for B rows: one preallocated
    (B, n_kv_head, max_len, head_dim) buffer pair per layer. Slot i of a row holds its token at
    position i. Only the n_kv_head shared heads are stored (a GQA model's cache is
    n_head / n_kv_head times smaller); attention expands them to the query heads."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        # Zeros, not empty: a masked slot still enters attention as 0 * value, and 0 * NaN is NaN.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the listed rows (in that order), e.g. to drop finished sequences from a batch."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]

    def extend(self, other: KVCache) -> None:
        """Append another cache's rows (same length of buffers), e.g. requests joining a running batch."""
        if other.max_len != self.max_len:
            raise LmforgeError(f"cannot join caches of {self.max_len} and {other.max_len} slots")
        self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
        self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]


class CacheStep(NamedTuple):
    """What every layer needs to know about one cached forward step (computed once per step)."""
    cos: torch.Tensor | None  # rotary angles of the step's tokens; None with learned positions
    sin: torch.Tensor | None
    # decode: (row, slot) of each row's new token, (B,) each; decode_many: rows (B, 1) and slots (B, T);
    # None: prefill
    write: tuple[torch.Tensor, torch.Tensor] | None
    length: int  # decode: number of slots attended to (the furthest row's position + 1)
    mask: torch.Tensor | None  # decode: (B, 1, T, length), True where the token may attend; prefill: None


# ----------------------------------------------------------------------------- the model


class GPT(Tallies, LanguageModel):
    family = "transformer"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A mixture's LM loss (without the balancing losses) summed since the last log, and the number
        # of forwards (see Tallies).
        self.tallies = ("_lm_stats",)
        self._lm_stats = torch.zeros(2)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                # norm gains start at 1 (offset + weight), biases at 0
                if name.endswith("norm.weight") or "layernorm" in name:
                    nn.init.constant_(p, 1.0 - self.config.norm_offset)
                else:
                    nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual-branch outputs scaled down so the residual stream's variance does not grow
                # with depth (GPT-2's 1/sqrt(2 * n_layer)).
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ mixture of experts

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]


    def after_step(self) -> None:
        for m in self.moe_layers():
            m.after_step()

    # ------------------------------------------------------------------ parallelism (applied from outside)

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)

    def pipeline_stage(self, index: int, n_stages: int) -> nn.Module:
        """Stage `index` of `n_stages` for pipeline parallelism: consecutive blocks (as even as they
        divide), the first stage also embedding the tokens, the last also producing the logits."""
        if not 0 <= index < n_stages <= self.config.n_layer:
            raise LmforgeError(f"cannot cut {self.config.n_layer} blocks into {n_stages} pipeline stages")
        if self.config.tie_embeddings and n_stages > 1:
            raise LmforgeError("a model whose output head is tied to its embedding cannot be cut into pipeline "
                               "stages (the first and the last stage would share one weight)")
        bounds = [round(i * self.config.n_layer / n_stages) for i in range(n_stages + 1)]
        return GPTStage(self, index == 0, index == n_stages - 1, bounds[index], bounds[index + 1])

    def tensor_parallel_plan(self) -> dict[str, str]:
        """Megatron's split: q/k/v and gate/up by output columns (each rank a share of the heads and of
        the MLP's units), o and down by input rows (their partial sums all-reduced). A mixture of experts'
        experts are not split (expert parallelism is another plan)."""
        plan = {}
        for i, layer in enumerate(self.layers):
            plan.update({f"layers.{i}.self_attn.{x}_proj": "colwise" for x in "qkv"})
            plan[f"layers.{i}.self_attn.o_proj"] = "rowwise"
            if isinstance(layer.mlp, MLP):
                ups = [x for x in ("gate", "up") if hasattr(layer.mlp, f"{x}_proj")]
                plan.update({f"layers.{i}.mlp.{x}_proj": "colwise" for x in ups})
                plan[f"layers.{i}.mlp.down_proj"] = "rowwise"
        return plan

    def train_metrics(self) -> dict[str, float]:
        """Since the last log: the LM loss without the balancing losses, the balancing loss, each expert's
        share of the routed tokens (mean over layers), and the max violation (worst layer and mean)."""
        stats = [s for s in (m.pop_stats() for m in self.moe_layers()) if s is not None]
        if not stats:
            return {}
        (lm, n), self._lm_stats = self._lm_stats.tolist(), torch.zeros_like(self._lm_stats)
        out = {"lm_loss": lm / max(n, 1), "moe_aux_loss": sum(s["aux_loss"] for s in stats),
               "moe_max_violation": max(s["max_violation"] for s in stats),
               "moe_mean_violation": sum(s["max_violation"] for s in stats) / len(stats)}
        for e in range(self.config.n_experts):
            out[f"moe_share_{e}"] = sum(s["share"][e] for s in stats) / len(stats)
        return {k: round(v, 6) for k, v in out.items()}

    @property
    def context_limit(self) -> int:
        return self.config.block_size

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def output_head_names(self) -> list[str]:
        return [] if self.config.tie_embeddings else ["lm_head.weight"]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Token and position tables and the output head (tied or not) are lookups; so are MoE routers
        (a small classifier over experts, trained like the output head: AdamW, no decay); every other
        matrix is a hidden weight, each expert's on its own (Muon orthogonalises per expert); norm
        gains and biases are vectors."""
        tables = [self.embed_tokens.weight] + ([self.wpe.weight] if self.wpe is not None else [])
        if not self.config.tie_embeddings:
            tables.append(self.lm_head.weight)
        tables += [m.router.weight for m in self.moe_layers()]
        table_ids = {id(p) for p in tables}
        rest = [p for p in self.parameters() if id(p) not in table_ids]
        return {"matrix": [p for p in rest if p.ndim == 2], "embedding": tables,
                "vector": [p for p in rest if p.ndim != 2]}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab) in float32.
        With targets (B, T; -100 = ignore): the cross-entropy loss (`reduction` as in F.cross_entropy)."""
        valid = targets != -100 if targets is not None and self.config.n_experts else None
        logits = self.logits_from_hidden(self.hidden_states(idx, valid))  # float32 statistics even under bf16
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction=reduction)
        if self.training and self.config.n_experts and reduction == "mean":
            one = torch.ones_like(loss, dtype=torch.float)
            self._lm_stats = self._lm_stats + torch.stack([loss.detach().float(), one])
            loss = loss + sum(m.aux_loss for m in self.moe_layers())  # the routers' balancing losses
        return loss

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (scaled by sqrt(n_embd) for Gemma, in their own dtype as Gemma does) plus
        learned position embeddings if the model has them."""
        x = self.embed_tokens(idx)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        return x

    def hidden_states(self, idx: torch.Tensor, valid: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, n_embd): the forward pass without the LM head (what a
        reward model's or value function's scalar head reads). valid (B, T): the tokens MoE routers
        count toward their loads and losses (default all, or the attention mask's). attention_mask
        (B, T) bool, bidirectional models only: False for padding, attended to by no token."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise LmforgeError(f"sequence of {T} tokens is longer than the model's context window "
                               f"({self.config.block_size})")
        positions = torch.arange(T, device=idx.device)
        x = self.drop(self.embed(idx, positions))
        valid = attention_mask if valid is None else valid
        for layer in self.layers:
            x = layer(x, self.rotary, positions, valid=valid, key_mask=attention_mask)
        return self.norm(x)

    # ------------------------------------------------------------------ cached inference

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty key/value cache for batch_size rows of up to max_len tokens (default: the context
        window), on the model's device."""
        if not self.config.causal:
            raise LmforgeError("a bidirectional transformer has no key/value cache: every token's state "
                               "depends on the tokens after it")
        max_len = self.config.block_size if max_len is None else max_len
        w = self.embed_tokens.weight
        if dtype is None:
            dtype = w.dtype if w.is_floating_point() else torch.float32
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=dtype)

    def prefill(self, idx: torch.Tensor, cache: KVCache, last: torch.Tensor | None = None) -> torch.Tensor:
        """Start cached inference: idx (B, T) are the rows' first tokens, at positions 0..T-1; their
        keys and values fill cache slots 0..T-1. Returns float32 logits (B, vocab) of the token at
        position last[b] of each row (default: T - 1), i.e. the prediction for the next position.

        Rows of different lengths are right-padded (any id will do): causal attention means a real
        token never sees the padding after it, and a padded slot is overwritten by the row's own
        next token before anything attends to it (see decode)."""
        B, T = idx.shape
        if T > min(self.config.block_size, cache.max_len):
            raise LmforgeError(f"sequence of {T} tokens does not fit the context window "
                               f"({self.config.block_size}) or the cache ({cache.max_len})")
        positions = torch.arange(T, device=idx.device)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.cos[:T], self.rotary.sin[:T]
        step = CacheStep(cos, sin, None, T, None)
        x = self.embed(idx, positions)
        for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v):
            x = layer(x, self.rotary, positions, (k_buf, v_buf), step)
        if last is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(B, device=idx.device), last.to(idx.device)]
        # Only the wanted positions go through the head: vocab x T logits would dominate a long prefill.
        return self.logits_from_hidden(self.norm(x))

    def decode(self, idx: torch.Tensor, cache: KVCache, positions: list[int], step_fn=None) -> torch.Tensor:
        """One cached step: idx (B, 1) holds each row's next token, at position positions[b] (the
        number of tokens the row already has in the cache). Its key and value go to that slot and it
        attends to the row's slots 0..positions[b]. Returns float32 logits (B, vocab).

        step_fn: a compiled `decode_step` to run instead of the plain one (see Engine(compile=True))."""
        length = max(positions) + 1
        if length > min(self.config.block_size, cache.max_len):
            raise LmforgeError(f"position {length - 1} is outside the context window "
                               f"({self.config.block_size}) or the cache ({cache.max_len})")
        pos = torch.tensor(positions, device=idx.device)
        return (step_fn or self.decode_step)(idx, pos, length, cache.k, cache.v)

    def decode_many(self, idx: torch.Tensor, cache: KVCache, start: int | list[int]) -> torch.Tensor:
        """Several cached steps at once (speculative decoding verifies a draft with it): idx (B, T)
        holds T consecutive tokens of each row, at positions start..start+T-1 (start: one int, or one
        per row). Their keys and values go to those slots, overwriting whatever was there (a
        rejected draft's), and each token attends to its row's slots 0..its position. Returns
        float32 logits (B, T, vocab): the prediction after each of the T tokens."""
        B, T = idx.shape
        starts = [start] * B if isinstance(start, int) else [int(s) for s in start]
        if len(starts) != B or min(starts) < 0:
            raise LmforgeError(f"decode_many needs one start position >= 0 per row, got {start}")
        length = max(starts) + T
        if length > min(self.config.block_size, cache.max_len):
            raise LmforgeError(f"position {length - 1} is outside the context window "
                               f"({self.config.block_size}) or the cache ({cache.max_len})")
        pos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        cos = sin = None
        if self.rotary is not None:
            cos = self.rotary.cos[pos].view(B, 1, T, -1)
            sin = self.rotary.sin[pos].view(B, 1, T, -1)
        mask = (torch.arange(length, device=idx.device) <= pos[..., None]).view(B, 1, T, length)
        step = CacheStep(cos, sin, (torch.arange(B, device=idx.device)[:, None], pos), length, mask)
        x = self.embed(idx, pos)
        for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v):
            x = layer(x, self.rotary, pos, (k_buf, v_buf), step)
        return self.logits_from_hidden(self.norm(x))

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, length: int,
                    k_bufs: list[torch.Tensor], v_bufs: list[torch.Tensor]) -> torch.Tensor:
        """The tensor work of `decode`, without checks or Python lists, so that torch.compile can
        turn a whole step into one graph: pos (B,) are the rows' positions, length = max(pos) + 1
        the number of cache slots attended to, k_bufs/v_bufs the cache's per-layer buffers."""
        B = idx.size(0)
        cos = sin = None
        if self.rotary is not None:
            cos = self.rotary.cos[pos].view(B, 1, 1, -1)
            sin = self.rotary.sin[pos].view(B, 1, 1, -1)
        write = (torch.arange(B, device=idx.device), pos)
        # Rows at different positions: each sees only its own slots 0..pos (the rest is padding or
        # another row's future). The mask is built even when all rows line up, so the compiled step
        # has one shape of graph.
        mask = (torch.arange(length, device=idx.device) <= pos[:, None]).view(B, 1, 1, length)
        step = CacheStep(cos, sin, write, length, mask)
        x = self.embed(idx, pos.view(B, 1))
        for layer, k_buf, v_buf in zip(self.layers, k_bufs, v_bufs):
            x = layer(x, self.rotary, pos.view(B, 1), (k_buf, v_buf), step)
        return self.logits_from_hidden(self.norm(x[:, -1]))

    # ------------------------------------------------------------------ accounting

    def inactive_expert_params(self) -> int:
        """Parameters of the experts a token does not go through (n_experts - top_k per MoE layer)."""
        cfg = self.config
        per_expert = sum(p.numel() for m in self.moe_layers()[:1] for p in m.experts[0].parameters())
        return per_expert * (cfg.n_experts - cfg.moe_top_k) * len(self.moe_layers())

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count (shared tied weights counted once). non_embedding drops the token and
        position tables, the convention of scaling-law papers; active counts, of a mixture of experts,
        only the top_k experts a token goes through."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= self.inactive_expert_params()
        if non_embedding:
            n -= self.embed_tokens.weight.numel() if not self.config.tie_embeddings else 0
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 per weight of every matrix
        multiply (all linear layers including the output head), plus attention's QK^T and AV products,
        12 * n_layer * n_head * head_dim * T (the PaLM accounting, full causal T as is customary)."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        # a token goes through top_k of the experts: only their weights count
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul_params -= self.inactive_expert_params()
        return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


class GPTStage(nn.Module):
    """A slice of a GPT for pipeline parallelism (GPT.pipeline_stage): token ids -> hidden states on
    the first stage, hidden states -> hidden states in between, -> float32 logits on the last."""

    def __init__(self, model: GPT, first: bool, last: bool, lo: int, hi: int):
        super().__init__()
        self.first, self.last = first, last
        self.embed_tokens = model.embed_tokens if first else None
        self.wpe = model.wpe if first else None
        self.drop = model.drop
        self.rotary = model.rotary
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self._model = [model]  # for embed and logits_from_hidden, not registered (its weights are not all ours)

    def forward(self, x):
        T = x.size(1)
        positions = torch.arange(T, device=x.device)
        if self.first:
            x = self.drop(self._model[0].embed(x, positions))
        for layer in self.layers:
            x = layer(x, self.rotary, positions)
        if self.last:
            x = self._model[0].logits_from_hidden(self.norm(x))
        return x


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, GPTConfig] = {
    # Tiny shapes for tests and smoke runs.
    "tiny": GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
    # The default: a modern small model that trains in minutes on a laptop CPU
    # (RoPE, RMSNorm, SwiGLU, GQA, QK-norm, untied head). Its dropout (off unless set) never touches
    # the attention weights: on a CPU that takes SDPA off its fused kernel (a step 1.4x slower) and
    # did not generalise better in 5-minute runs (docs/benchmarks.md).
    "cpu": GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                     qk_norm=True, attn_dropout=0.0),
    # The classic GPT-2 / nanoGPT shape, kept as the baseline: learned positions, LayerNorm with
    # biases, GELU, tied embeddings. Size of GPT-2 small (124M) by default.
    "gpt2-classic": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                              mlp="gelu", norm="layer", pos="learned", tie_embeddings=True, bias=True),
    # Llama-style models for GPUs.
    "d12": GPTConfig(vocab_size=32768, block_size=2048, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                     qk_norm=True),
    "d20": GPTConfig(vocab_size=65536, block_size=2048, n_layer=20, n_head=10, n_kv_head=10,
                     n_embd=1280, qk_norm=True),
}


FAMILY = ModelFamily("transformer", GPT, GPTConfig, PRESETS, default_preset="cpu",
                     description="decoder-only transformer (RoPE/learned positions, GQA, SwiGLU/GELU)")


def get_config(preset: str, **overrides) -> GPTConfig:
    return FAMILY.config(preset, **overrides)
