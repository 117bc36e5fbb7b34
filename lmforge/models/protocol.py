"""The model protocol: everything the rest of lmforge may assume about a language model.

Every model family (the transformer, the LSTM, counted n-grams, and whatever comes next) is a
`LanguageModel`. The Trainer, the inference engine, the server's scheduler, the evaluation harness,
`score`, `sample`, `chat` and `serve` use only what is written here, never a family's internals
(attribute names such as `embed_tokens`, the shape of its cache, its config fields). A new family
implements these members and registers a `ModelFamily` (lmforge/models/registry.py).

Shape
    config            a dataclass with `vocab_size`, `to_dict()` and `from_dict()`; it is what a
                      checkpoint records (with `family`) to rebuild the model
    vocab_size        = config.vocab_size
    context_limit     the longest sequence the model can read, or None (an LSTM or an n-gram has no
                      window); callers ask `tokens_left(model, used)` and `scoring_window(model)`
                      instead of special-casing None (and train on DEFAULT_SEQ_LEN-token windows by default)
    device            where its tensors live

Training
    forward(idx, targets=None, reduction="mean")
                      idx (B, T) ids -> float32 logits (B, T, vocab); with targets (B, T, -100 =
                      ignore) the cross-entropy instead (F.cross_entropy's `reduction`). Scoring a
                      continuation is this log-softmax gathered at the continuation's ids.
    likelihood        "exact": forward's loss is the model's negative log-likelihood; "bound": it is a
                      one-sample Monte-Carlo estimate of an upper bound on it (masked diffusion), so
                      validation averages several draws per window and reports "loss_bound" /
                      "bpb_bound" with their standard error instead of "loss" / "bpb"
                      (lmforge/eval/lm.py `split_loss`); "masked": forward's loss is a masked-
                      language-model loss (an encoder), not about the text's probability at all, so
                      validation reports "mlm_loss" and "mlm_accuracy", and scoring refuses the model
    trainable         True: gradient training by the shared Trainer, with
    param_groups()    {"matrix": [...], "embedding": [...], "vector": [...]}: hidden weight matrices
                      (Muon when --optimizer muon, else AdamW with weight decay), lookup tables and
                      output heads (AdamW, no decay), gains and biases (AdamW, no decay). Declared by
                      the model; `check_param_groups` proves every trainable parameter is in exactly
                      one group.
    fit(tokens, ...)  trainable False (a counted model): estimate the model from a 1-D array of
                      training token ids instead
    hidden_states(idx) (B, T, hidden_size) features a head reads (reward model, PPO value head);
                      a family without features raises LmforgeError
    output_head_names()
                      names (as in `state_dict`) of the parameters only the output layer uses, none
                      shared with hidden_states (an untied output head; [] when it is tied to the
                      embedding): a head that reads hidden states alone freezes them and leaves them
                      out of its checkpoint (an unused trainable parameter breaks DDP)
    logits_from_hidden(h)
                      the output layer alone: forward(idx) == logits_from_hidden(hidden_states(idx)),
                      so PPO's shared critic reads the policy's trunk without a second pass

Generation (a decode state: "cache" for short)
    generation        "autoregressive": one token at a time through the decode state below (the
                      engine, the server's scheduler, chat and tools); "diffusion": whole blocks at
                      once with the samplers of lmforge/inference/diffusion.py, and everything that
                      decodes token by token refuses the model up front (`require_decoding`);
                      "none": it does not generate text (an encoder), and everything that does refuses it
    new_cache(batch_size, max_len=None, dtype=None)
                      an empty decode state for batch_size rows of up to max_len tokens (None: the
                      whole context window; families without a window ignore it). The state has
                      `batch_size`, `keep(rows)` (keep these rows, in this order, repeats allowed)
                      and `extend(other)` (append another state's rows).
    prefill(idx, cache, last=None)
                      idx (B, T) right-padded prompts; row b's real tokens end at position last[b]
                      (default T - 1). Fills the state; returns float32 logits (B, vocab) for each
                      row's next token.
    decode(idx, cache, positions, step_fn=None)
                      idx (B, 1): each row's next token, at position positions[b]; advances the state
                      by that token; returns float32 logits (B, vocab). step_fn: a compiled version
                      of the family's `decode_step` if it has one (`engine.compiled_decode_step`).
    decode_many(idx, cache, start)
                      optional (speculative decoding, lmforge/inference/speculative.py): idx (B, T)
                      holds T consecutive tokens of each row at positions start..start+T-1 (start an
                      int, or one per row); writes their state to those slots, each token seeing
                      its row's slots 0..its own position; returns float32 logits (B, T, vocab).
                      The state must be positional (slot i = the token at position i), so that
                      rolling back a rejected draft costs nothing: later slots are overwritten
                      before anything attends to them. A family without it (a recurrent state
                      cannot be rolled back) can be neither the target nor the draft of speculation.

    shard_units(), tensor_parallel_plan(), pipeline_stage(i, n)
                      how parallelism applied from outside splits the model (lmforge/train/parallel.py):
                      the submodules FSDP2 shards one by one, which linear layers tensor parallelism
                      splits by output columns or input rows, and the slice pipeline stage i runs
    after_step()      called by the Trainer after every optimizer step (a mixture of experts moves
                      its balancing biases here, from the step's loads summed over processes)
    train_metrics()   the model's own numbers since the previous log, logged beside the loss (a
                      mixture of experts: "lm_loss" without its balancing loss, "moe_aux_loss", each
                      expert's share of the tokens, the max violation); forward's training loss
                      already includes any auxiliary loss, so that is the only channel it needs

Accounting
    num_params(non_embedding=False, active=False), flops_per_token(seq_len=None): active (and the
                      FLOPs) count only the experts a token goes through
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from lmforge.common import LmforgeError

PARAM_GROUPS = ("matrix", "embedding", "vector")

# The training (and validation) window of a model without a context window, unless one is given.
DEFAULT_SEQ_LEN = 256

# An unlimited model still scores long texts in windows of this many tokens (a window bounds the
# logits held in memory, not what the model can see).
UNLIMITED_SCORING_WINDOW = 1024


class ModelConfig:
    """What every family's config dataclass inherits: the dict a checkpoint stores, and back (an
    unknown field is one clear error, not a TypeError)."""

    def to_dict(self) -> dict:
        # as JSON gives it back (tuples become lists), so a config read from a file compares equal
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LmforgeError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)


class DecodeState(Protocol):
    """What callers may do with a model's decode state (a KV cache, an LSTM's (h, c), an n-gram's
    last n-1 tokens)."""

    @property
    def batch_size(self) -> int: ...

    def keep(self, rows: torch.Tensor) -> None: ...

    def extend(self, other: DecodeState) -> None: ...


class LanguageModel(nn.Module):
    """Base class of every family: the defaults of the protocol above."""

    family: ClassVar[str] = ""
    trainable: ClassVar[bool] = True
    likelihood: ClassVar[str] = "exact"
    generation: ClassVar[str] = "autoregressive"
    config: Any

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_limit(self) -> int | None:
        return None

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError(f"{type(self).__name__} declares no parameter groups")

    def fit(self, tokens, **kwargs) -> dict:
        raise LmforgeError(f"the {self.family} family is trained by gradient descent, not fitted")

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        raise LmforgeError(f"the {self.family} family has no hidden states for a reward or value head")

    @property
    def hidden_size(self) -> int:
        raise LmforgeError(f"the {self.family} family has no hidden states for a reward or value head")

    def output_head_names(self) -> list[str]:
        return []

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        raise LmforgeError(f"the {self.family} family has no hidden states for a reward or value head")

    def shard_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards one by one (a transformer's blocks); default none: the whole
        model is one unit (lmforge/train/parallel.py)."""
        return []

    def tensor_parallel_plan(self) -> dict[str, str]:
        """{linear layer name: "colwise" | "rowwise"} for tensor parallelism; default none."""
        return {}

    def pipeline_stage(self, index: int, n_stages: int) -> nn.Module:
        """The module pipeline stage `index` of `n_stages` runs (ids or activations in, activations or
        logits out); a family that cannot be cut into stages says so."""
        raise LmforgeError(f"the {self.family} family cannot be split into pipeline stages")

    def after_step(self) -> None:
        """Called by the Trainer after every optimizer step (MoE bias balancing); default nothing."""

    def train_metrics(self) -> dict[str, float]:
        """The model's own training numbers since the previous log (MoE: LM loss without the balancing
        loss, expert loads, max violation); default none."""
        return {}

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6 per weight of every linear map (forward + backward)."""
        return 6.0 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))


def check_param_groups(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    """Every trainable parameter of `model` in exactly one known group, and nothing else."""
    unknown = set(groups) - set(PARAM_GROUPS)
    if unknown:
        raise LmforgeError(f"unknown parameter groups {sorted(unknown)}; the groups are {', '.join(PARAM_GROUPS)}")
    names = {id(p): n for n, p in model.named_parameters()}
    where: dict[int, str] = {}
    for group, params in groups.items():
        for p in params:
            if id(p) not in names:
                raise LmforgeError(f"parameter group {group!r} holds a tensor that is not a parameter of the model")
            if id(p) in where:
                raise LmforgeError(f"parameter {names[id(p)]} is in groups {where[id(p)]!r} and {group!r}")
            where[id(p)] = group
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in where]
    if left:
        raise LmforgeError(f"parameters in no group: {left[:5]}")


def trainable_groups(model) -> dict[str, list[nn.Parameter]]:
    """The model's declared groups, checked, restricted to parameters that require gradients."""
    groups = model.param_groups()
    check_param_groups(model, groups)
    return {g: [p for p in groups.get(g, []) if p.requires_grad] for g in PARAM_GROUPS}


def require_decoding(model, what: str) -> None:
    """One clear error when `what` (chat, the server, ...) needs token-by-token decoding and the
    model generates otherwise."""
    generation = getattr(model, "generation", "autoregressive")
    if generation == "none":
        raise LmforgeError(f"{what} needs a model that generates text; the {model.family} family only reads text "
                           "(contextual vectors, text embeddings, classification heads)")
    if generation != "autoregressive":
        raise LmforgeError(
            f"{what} decodes token by token, and a {model.family} model fills whole blocks of tokens at once "
            "with its samplers: use `lmforge sample`, `lmforge generate` with --steps N, or `lmforge chat` "
            "(after `lmforge sft`, which pads its replies LLaDA-style)")


def require_text_probabilities(model, what: str) -> None:
    """One clear error when `what` (scoring, benchmarks) needs the probability of a text and the model
    assigns none (an encoder: its loss is about masked tokens)."""
    if getattr(model, "likelihood", "exact") == "masked":
        raise LmforgeError(f"{what} needs the probability of a text, and the {model.family} family assigns none "
                           "(evaluate it with `lmforge eval --data-dir`: masked-token loss and accuracy)")


def tokens_left(model, used: int) -> int:
    """How many more tokens fit after `used` of them: the rest of the context window, or (a model
    without one) as many as anyone asks for."""
    limit = model.context_limit
    return sys.maxsize if limit is None else limit - used


def scoring_window(model) -> int:
    """The window long texts are scored in: the context window, or a fixed size without one."""
    return model.context_limit or UNLIMITED_SCORING_WINDOW


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_class: Callable[[Any], Any]  # config -> model (a LanguageModel)
    config_class: type  # dataclass with from_dict / to_dict
    presets: dict[str, Any] = field(default_factory=dict)  # preset name -> config
    default_preset: str = ""
    description: str = ""

    def config(self, preset: str | None = None, **overrides):
        """A preset's config with the given fields replaced (None values are ignored)."""
        preset = preset or self.default_preset
        if preset not in self.presets:
            raise LmforgeError(f"unknown {self.name} preset {preset!r}; choose from {', '.join(self.presets)}")
        return replace(self.presets[preset], **{k: v for k, v in overrides.items() if v is not None})

    def config_from_dict(self, d: dict):
        try:
            return self.config_class.from_dict(d)
        except (TypeError, ValueError) as e:
            raise LmforgeError(f"not a valid {self.name} configuration: {e}") from None
