"""The LSTM language model: token embeddings, a stack of LSTM layers, and a softmax over the vocabulary.

The recurrent baseline next to the transformer. There is no attention and no context window: the
whole past is folded into each layer's (h, c) state, and that fixed-size state is the entire decode
state, however long the text grows. Training still uses the shared Trainer on fixed windows of
seq_len tokens, each window starting from a zero state (the windows are drawn at random positions,
so there is no previous window to carry a state over from); inference then runs on for as long as
asked.

The recurrence itself is `torch.nn.LSTM` (one fused kernel per layer, oneDNN on CPU); this file
adds the embedding, the head, the decode state and the bookkeeping the protocol asks for.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lmforge.common import LmforgeError
from lmforge.models.protocol import LanguageModel, ModelConfig, ModelFamily


@dataclass(frozen=True)
class LSTMConfig(ModelConfig):
    vocab_size: int = 4096
    n_layer: int = 2
    n_embd: int = 256  # token embedding size: the first layer's input
    n_hidden: int = 512  # size of every layer's h and c
    dropout: float = 0.0  # on the embeddings, between layers, and on the top layer's output
    # The output head shares the embedding table; when n_hidden != n_embd a learned projection
    # n_hidden -> n_embd sits in front of it (the table needs inputs of its own width).
    tie_embeddings: bool = False
    # Initial scales (normal). Unit-variance embeddings give the first layer's gates inputs about as
    # large as its recurrent ones. Measured (the 300-step runs of `param_groups`, Muon), validation
    # nats/token for embedding / head std: 0.02 / 0.02 -> 2.05, 1 / 0.02 -> 1.65, 1 / 0.09 -> 1.56,
    # 1 / 0.3 -> 1.48, 1 / 0.5 -> 1.47, 1 / 1 -> 1.47, 1 / 3 -> 1.51.
    embed_std: float = 1.0
    init_std: float = 0.5  # the untied head; the LSTM matrices keep nn.LSTM's U(+-1/sqrt(n_hidden))
    # Initial bias of the forget gate: 1 makes a fresh LSTM keep about 73% of its cell each step
    # instead of half, so gradients reach further back early in training (Jozefowicz et al., 2015).
    forget_bias: float = 1.0

    def __post_init__(self):
        def bad(msg):
            raise LmforgeError(f"invalid lstm config: {msg}")

        for name in ("vocab_size", "n_layer", "n_embd", "n_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("embed_std", "init_std"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if not math.isfinite(self.forget_bias):
            bad(f"forget_bias must be a finite number, got {self.forget_bias}")


# ----------------------------------------------------------------------------- decode state


class LSTMState:
    """What an LSTM remembers of B rows: every layer's h and c, each (n_layer, B, n_hidden) in
    nn.LSTM's layout (the batch is dimension 1). It never grows: a row of a million tokens takes
    the same memory as a row of one."""

    def __init__(self, h: torch.Tensor, c: torch.Tensor):
        self.h, self.c = h, c

    @property
    def batch_size(self) -> int:
        return self.h.size(1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the listed rows, in that order (a row may be listed twice: it is copied)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.h.device)
        self.h = self.h.index_select(1, rows)
        self.c = self.c.index_select(1, rows)

    def extend(self, other: LSTMState) -> None:
        """Append another state's rows (from the same model) after this one's."""
        if not isinstance(other, LSTMState) or other.h.shape[::2] != self.h.shape[::2]:
            raise LmforgeError("cannot join decode states of different LSTM models")
        self.h = torch.cat([self.h, other.h.to(self.h.dtype)], dim=1)
        self.c = torch.cat([self.c, other.c.to(self.c.dtype)], dim=1)


# ----------------------------------------------------------------------------- the model


class LSTMLM(LanguageModel):
    family = "lstm"

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        # nn.LSTM's own dropout acts between layers only (and warns when there is one layer); the
        # embedding and top-output dropouts above complete the usual recipe (Zaremba et al., 2014).
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_hidden, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        head_in = cfg.n_hidden
        self.out_proj = None
        if cfg.tie_embeddings and cfg.n_hidden != cfg.n_embd:
            self.out_proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=False)
            head_in = cfg.n_embd
        self.lm_head = nn.Linear(head_in, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self):
        cfg = self.config
        # nn.LSTM's own default for its matrices (uniform, 1/sqrt(hidden)), done here so that every
        # tensor's initialisation is visible in one place and follows the global seed in this order.
        bound = 1.0 / math.sqrt(cfg.n_hidden)
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -bound, bound)
            else:
                nn.init.zeros_(p)
                if name.startswith("bias_ih"):
                    # Gates are stacked in the order input, forget, cell, output: the second quarter
                    # is the forget gate. (bias_ih and bias_hh are summed; one of them suffices.)
                    p.data[cfg.n_hidden:2 * cfg.n_hidden] = cfg.forget_bias
        if self.out_proj is not None:
            nn.init.uniform_(self.out_proj.weight, -bound, bound)
        nn.init.normal_(self.embed_tokens.weight, 0.0, cfg.embed_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    @property
    def hidden_size(self) -> int:
        return self.config.n_hidden

    def output_head_names(self) -> list[str]:
        """Parameters only the output head uses: the untied head, the tied head's projection."""
        return ([] if self.config.tie_embeddings else ["lm_head.weight"]) + (
            ["out_proj.weight"] if self.out_proj is not None else [])

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The LSTM's input and recurrent matrices (weight_ih_l*, weight_hh_l*: the four gates stacked,
        4*n_hidden rows) and the tied head's projection are hidden matrices, so Muon's under
        --optimizer muon; the embedding table and the untied head are lookups; the biases vectors.

        Muon on the gate blocks is a measured choice, not a default: 300 steps of a 2-layer
        64 -> 128 LSTM on byte-level stdlib source (batch 16 x 64, default learning rates, two seeds)
        reached 1.466 / 1.482 validation nats per token with Muon on these matrices against
        1.670 / 1.686 with AdamW on them. Muon orthogonalises each stacked 4-gate block as one
        matrix; it still wins. Its Newton-Schulz step costs ~0.15 s per optimizer step for the `cpu`
        preset on this project's CPU (8% of a step at batch 32 x 256, 24% at batch 8)."""
        matrix = [p for name, p in self.lstm.named_parameters() if name.startswith("weight")]
        if self.out_proj is not None:
            matrix.append(self.out_proj.weight)
        embedding = [self.embed_tokens.weight]
        if not self.config.tie_embeddings:
            embedding.append(self.lm_head.weight)
        vector = [p for name, p in self.lstm.named_parameters() if name.startswith("bias")]
        return {"matrix": matrix, "embedding": embedding, "vector": vector}

    # ------------------------------------------------------------------ training

    def _recur(self, x, state=None):
        """nn.LSTM over x (B, T, n_embd), or a PackedSequence of it, from state (default: zeros).

        On CPU the recurrence runs in fp32 even under bf16 autocast: measured on this project's
        2-core CPU (h=512, 8 x 256 tokens), nn.LSTM under bf16 autocast took 5x longer forward and
        3.4x longer forward + backward than in fp32, while the head's large matmul still gains from
        bf16. Other devices keep autocast as it is (untested here: no GPU)."""
        data = x.data if isinstance(x, PackedSequence) else x
        ctx = torch.autocast("cpu", enabled=False) if data.device.type == "cpu" else contextlib.nullcontext()
        with ctx:
            if state is not None:
                w = self.lstm.weight_hh_l0.dtype  # the state may be stored in another dtype (Engine bf16)
                state = (state[0].to(w), state[1].to(w))
            return self.lstm(x, state)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The top layer's outputs (B, T, n_hidden), from a zero state: the forward pass without the
        head (what a reward model's or value function's scalar head reads)."""
        out, _ = self._recur(self.drop(self.embed_tokens(idx)))
        return self.drop(out)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on `hidden_states` (the tied head's projection first)."""
        if self.out_proj is not None:
            hidden = self.out_proj(hidden)
        return self.lm_head(hidden).float()  # softmax statistics in fp32 even under bf16 autocast

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab) in float32.
        With targets (B, T; -100 = ignore): the cross-entropy loss (`reduction` as in F.cross_entropy)."""
        logits = self.logits_from_hidden(self.hidden_states(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction=reduction)

    # ------------------------------------------------------------------ cached inference

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> LSTMState:
        """A zero state (the state before any token) for batch_size rows. max_len is ignored: the
        state has the same size whatever the length."""
        w = self.embed_tokens.weight
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        shape = (self.config.n_layer, batch_size, self.config.n_hidden)
        return LSTMState(torch.zeros(shape, device=w.device, dtype=dtype),
                         torch.zeros(shape, device=w.device, dtype=dtype))

    def prefill(self, idx: torch.Tensor, cache: LSTMState, last: torch.Tensor | None = None) -> torch.Tensor:
        """Run the rows' prompts idx (B, T), right-padded, row b's real tokens being idx[b, :last[b]+1]
        (default: all T), from a zero state. The cache then holds each row's state after exactly its
        own tokens; returns float32 logits (B, vocab) for each row's next token.

        Unlike causal attention, a recurrence would carry the padding into the state, so the rows are
        packed (pack_padded_sequence): nn.LSTM stops each row at its length, and its final (h, c)
        are every row's state at its own last real token."""
        B, T = idx.shape
        if cache.batch_size != B:
            raise LmforgeError(f"prefill of {B} rows into a decode state of {cache.batch_size}")
        lengths = torch.full((B,), T) if last is None else last.detach().to("cpu", torch.long) + 1
        if lengths.numel() != B or lengths.min() < 1 or lengths.max() > T:
            raise LmforgeError(f"prefill: last must give each of the {B} rows a position in 0..{T - 1}")
        x = self.drop(self.embed_tokens(idx))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, c) = self._recur(packed)  # back in the rows' original order
        cache.h, cache.c = h.to(cache.h.dtype), c.to(cache.c.dtype)
        return self.logits_from_hidden(self.drop(h[-1]))

    def decode(self, idx: torch.Tensor, cache: LSTMState, positions=None, step_fn=None) -> torch.Tensor:
        """One step: idx (B, 1) holds each row's next token; the state advances by it. Returns float32
        logits (B, vocab). positions and step_fn are part of the protocol but unused here: a
        recurrence does not need to know where it is, and there is no compiled step."""
        if idx.dim() != 2 or idx.size(1) != 1 or idx.size(0) != cache.batch_size:
            raise LmforgeError(f"decode takes ({cache.batch_size}, 1) token ids, got {tuple(idx.shape)}")
        out, (h, c) = self._recur(self.drop(self.embed_tokens(idx)), (cache.h, cache.c))
        cache.h, cache.c = h.to(cache.h.dtype), c.to(cache.c.dtype)
        return self.logits_from_hidden(self.drop(out[:, -1]))

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count (a tied table counted once); non_embedding drops the input table, as for
        the transformer (a tied table counts as the head and stays)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward, 2 per multiply-add): 6 per
        weight of every matrix multiply, i.e. 6 * 4h(in + h) per layer (the four gates' input and
        recurrent matrices, in = n_embd for the first layer, h after) plus the head (and the tied
        head's projection). Gate nonlinearities and the embedding lookup are not counted. seq_len
        does not matter: without attention a token costs the same wherever it is."""
        cfg = self.config
        h = cfg.n_hidden
        lstm = sum(4 * h * ((cfg.n_embd if layer == 0 else h) + h) for layer in range(cfg.n_layer))
        head = cfg.vocab_size * (cfg.n_embd if self.out_proj is not None else h)
        proj = h * cfg.n_embd if self.out_proj is not None else 0
        return 6.0 * (lstm + head + proj)


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, LSTMConfig] = {
    # Tiny shapes for tests and smoke runs.
    "tiny": LSTMConfig(vocab_size=512, n_layer=2, n_embd=32, n_hidden=64),
    # The default for a 5-minute run on a 2-core CPU with a 4096-token vocabulary (7M parameters,
    # 35 MFLOPs/token): measured ~3,000 training tokens/s at batch 8 x 256 and ~4,000 at batch 32
    # (Muon, --dtype auto, eager, on a shared machine), about the transformer `cpu` preset's rate,
    # so a 5-minute run sees ~1M tokens. Dropout 0, like that preset; on a 1 MB corpus seen several
    # times pass --set dropout=0.2, as the transformer's benchmark does (not measured for the LSTM).
    "cpu": LSTMConfig(vocab_size=4096, n_layer=2, n_embd=256, n_hidden=512),
}


FAMILY = ModelFamily("lstm", LSTMLM, LSTMConfig, PRESETS, default_preset="cpu",
                     description="LSTM language model (no context window; fixed-size decode state)")
