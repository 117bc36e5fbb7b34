"""The decoder-only transformer, in one file that reads top to bottom.

One class per concept: norms, rotary embeddings, attention (grouped-query aware), the MLP variants,
the block, and the model. Everything a preset can change is a field of `GPTConfig`; presets are
named configs at the bottom of the file.

Layout follows the Llama naming (embed_tokens, layers.N.self_attn.q_proj, mlp.gate_proj, norm,
lm_head) so that weights map one-to-one onto Hugging Face checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.protocol import LanguageModel, ModelConfig, ModelFamily


@dataclass(frozen=True)
class GPTConfig(ModelConfig):
    vocab_size: int = 4096
    block_size: int = 256  # context window in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); 1 = multi-query; else grouped-query
    n_embd: int = 256
    mlp: str = "swiglu"  # "swiglu" | "gelu" | "relu2"
    mlp_hidden: int | None = None  # None = 4*n_embd (gelu/relu2) or ~8/3*n_embd rounded (swiglu)
    norm: str = "rms"  # "rms" | "layer"
    pos: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    qk_norm: bool = False  # normalise queries and keys per head before attention (stabilises training)
    tie_embeddings: bool = False
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 had them)
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on the embeddings and each residual branch's output
    attn_dropout: float | None = None  # on the attention weights; None = dropout (nanoGPT's single knob)
    init_std: float = 0.02
    causal: bool = True  # False: every token attends to every other (masked diffusion, encoders)

    def __post_init__(self):
        def bad(msg):
            raise LmforgeError(f"invalid model config: {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        kv = self.kv_heads
        if kv <= 0 or self.n_head % kv:
            bad(f"n_head={self.n_head} is not a multiple of n_kv_head={kv}")
        if self.mlp not in ("swiglu", "gelu", "relu2"):
            bad(f"mlp must be swiglu, gelu or relu2, got {self.mlp!r}")
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
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            # Two input matrices instead of one: 2/3 of 4*d keeps the parameter count of a 4*d MLP.
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses precision in bf16.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).to(x.dtype)


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rms":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE) in the "rotate half" layout used by Llama checkpoints:
    the first and second halves of each head vector form the (x, y) pairs that get rotated."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x, positions: torch.Tensor):
        # x: (B, H, T, hd); positions: (T,) absolute positions of the T tokens
        return apply_rotary(x, self.cos[positions], self.sin[positions])


def apply_rotary(x, cos, sin):
    """Rotate x (..., T, hd) by the angles whose cos/sin are given (broadcastable to x)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where n_kv_head key/value heads are shared by groups of query heads
    (n_kv_head = n_head: classic MHA; 1: multi-query). Fewer KV heads shrink the KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.causal = cfg.causal

    def forward(self, x, rotary: Rotary | None, positions: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, step: CacheStep | None = None):
        """Without kv: causal attention over x (training and plain inference). With kv (this layer's
        key/value cache buffers) and step: cached inference, see GPT.prefill and GPT.decode."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if kv is not None:
            return self._forward_cached(q, k, v, kv, step)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        if self.n_kv_head != self.n_head:
            # Expand shared KV heads to the query heads (a view-and-copy; SDPA's enable_gqa does the
            # same but not on every backend).
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
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
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))
        # Decode, one token per row: store its key/value at the row's own slot, then attend to the
        # row's slots 0..position. Instead of copying the cached heads out to every query head,
        # the query heads sharing a KV head become that head's "query positions": (B, n_kv, rep, hd)
        # against (B, n_kv, L, hd), the same grouping as repeat_interleave (query head h uses KV
        # head h // rep). No causal mask is needed for a single query, only the length mask.
        # Indexed assignment, not scatter_: torch.compile updates the cache in place for it, while
        # its scatter_ copied the whole cache buffer twice per layer and step.
        rows, slots = step.write
        k_buf[rows, :, slots] = k[:, :, 0].to(k_buf.dtype)
        v_buf[rows, :, slots] = v[:, :, 0].to(v_buf.dtype)
        keys = k_buf[:, :, :step.length].to(q.dtype)
        values = v_buf[:, :, :step.length].to(q.dtype)
        q = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, hd)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)
        return self.o_proj(y.reshape(B, 1, self.n_head * hd))


class MLP(nn.Module):
    """Position-wise feed-forward: SwiGLU (Llama), GELU (GPT-2) or squared ReLU (Primer)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden_dim
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "gelu":
            h = F.gelu(self.up_proj(x), approximate="tanh")
        else:
            h = F.relu(self.up_proj(x)).square()
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = CausalSelfAttention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary, positions, kv=None, step=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rotary, positions, kv, step))
        x = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return x


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
    write: tuple[torch.Tensor, torch.Tensor] | None  # decode: (row, slot) of each row's new token; None: prefill
    length: int  # decode: number of slots attended to (the furthest row's position + 1)
    mask: torch.Tensor | None  # decode: (B, 1, 1, length), True where the row may attend; prefill: None


# ----------------------------------------------------------------------------- the model


class GPT(LanguageModel):
    family = "transformer"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                # norm gains start at 1, biases at 0
                nn.init.ones_(p) if name.endswith("norm.weight") or "layernorm" in name else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual-branch outputs scaled down so the residual stream's variance does not grow
                # with depth (GPT-2's 1/sqrt(2 * n_layer)).
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def context_limit(self) -> int:
        return self.config.block_size

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def output_head_names(self) -> list[str]:
        return [] if self.config.tie_embeddings else ["lm_head.weight"]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Token and position tables and the output head (tied or not) are lookups; every other
        matrix is a hidden weight; norm gains and biases are vectors."""
        tables = [self.embed_tokens.weight] + ([self.wpe.weight] if self.wpe is not None else [])
        if not self.config.tie_embeddings:
            tables.append(self.lm_head.weight)
        table_ids = {id(p) for p in tables}
        rest = [p for p in self.parameters() if id(p) not in table_ids]
        return {"matrix": [p for p in rest if p.ndim == 2], "embedding": tables,
                "vector": [p for p in rest if p.ndim != 2]}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab) in float32.
        With targets (B, T; -100 = ignore): the cross-entropy loss (`reduction` as in F.cross_entropy)."""
        logits = self.logits_from_hidden(self.hidden_states(idx))  # float32 softmax statistics even under bf16
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction=reduction)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (B, T, n_embd): the forward pass without the LM head (what a
        reward model's or value function's scalar head reads)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise LmforgeError(f"sequence of {T} tokens is longer than the model's context window "
                               f"({self.config.block_size})")
        positions = torch.arange(T, device=idx.device)
        x = self.embed_tokens(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, self.rotary, positions)
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
        x = self.embed_tokens(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v):
            x = layer(x, self.rotary, positions, (k_buf, v_buf), step)
        if last is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(B, device=idx.device), last.to(idx.device)]
        # Only the wanted positions go through the head: vocab x T logits would dominate a long prefill.
        return self.lm_head(self.norm(x)).float()

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
        x = self.embed_tokens(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos.view(B, 1))
        for layer, k_buf, v_buf in zip(self.layers, k_bufs, v_bufs):
            x = layer(x, self.rotary, pos.view(B, 1), (k_buf, v_buf), step)
        return self.lm_head(self.norm(x[:, -1])).float()

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tied weights counted once). non_embedding drops the token and
        position tables, the convention of scaling-law papers."""
        n = sum(p.numel() for p in self.parameters())
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
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


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
