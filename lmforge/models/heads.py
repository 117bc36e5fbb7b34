"""A language model with heads, by composition: `self.model = ...` plus head modules, as Hugging Face
builds its task models. The reward model and PPO's actor-critic (lmforge.stages), the bi-encoder and
the cross-encoder re-ranker (lmforge.retrieval, lmforge.stages.retriever) are all `ModelWithHead`s.

To the Trainer, the engine and checkpoints a `ModelWithHead` looks like the model it wraps (its
family, config, device, context window), and its checkpoint is that model's (its tensors under their
own names, so `load_model` reads it) plus the heads' tensors under the heads' names and a "head"
record in state.json saying which prefixes are the heads' (`head_record`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn

LM_PREFIX = "model."  # where the wrapped language model's tensors sit in the module (not in the checkpoint)


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class ModelWithHead(nn.Module):
    """A language model `self.model` plus head modules (`head_modules`: attribute names). Its
    state dict names the language model's tensors as the model itself does and the heads' by their
    attributes (`score_head.weight`, `critic.layers.0...`), without `unused` ones: the output layers
    of trunks read only for their hidden states, which are frozen."""

    head_kind: ClassVar[str]
    head_modules: ClassVar[tuple[str, ...]]
    loads_as_language_model: ClassVar[bool]  # does the checkpoint hold the whole wrapped model?

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.unused: set[str] = set()

    def _freeze_output_layer(self, trunk: nn.Module, prefix: str = "") -> None:
        """Freeze the output layer of a trunk read only for its hidden states, and keep it out of
        the checkpoint."""
        params = dict(trunk.named_parameters(remove_duplicate=False))
        for name in trunk.output_head_names():
            params[name].requires_grad_(False)
            self.unused.add(prefix + name)

    # -------------------------------------------------------------- what callers see: the wrapped model

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def context_limit(self) -> int | None:
        return self.model.context_limit

    @property
    def device(self) -> torch.device:
        return self.model.device

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trunks' own groups; a head's matrices are hidden weights, its biases vectors."""
        groups = {g: list(ps) for g, ps in self.model.param_groups().items()}
        for name in self.head_modules:
            module = getattr(self, name)
            if module is None:
                continue
            if hasattr(module, "param_groups"):  # a second trunk (PPO's critic)
                for g, ps in module.param_groups().items():
                    groups.setdefault(g, []).extend(ps)
                continue
            for p in module.parameters():
                groups.setdefault("matrix" if p.ndim == 2 else "vector", []).append(p)
        return groups

    def head_record(self) -> dict:
        """What state.json records of the head ("head"), so loading knows which tensors are not the
        language model's."""
        return {"kind": self.head_kind, "prefixes": [n + "." for n in self.head_modules],
                "loads_as_language_model": self.loads_as_language_model}

    # -------------------------------------------------------------- the checkpoint layout

    def _checkpoint_name(self, key: str) -> str:
        return key[len(LM_PREFIX):] if key.startswith(LM_PREFIX) else key

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        out = OrderedDict() if destination is None else destination
        for key, value in super().state_dict(keep_vars=keep_vars).items():
            name = self._checkpoint_name(key)
            if name not in self.unused:
                out[prefix + name] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the checkpoint layout of `state_dict` (or a plain language model's state dict: the
        trunk's tensors, its output layer ignored where it is unused here)."""
        heads = tuple(n + "." for n in self.head_modules)
        ours = {(k if k.startswith(heads) else LM_PREFIX + k): v for k, v in state_dict.items() if k not in self.unused}
        result = super().load_state_dict(ours, strict=False, assign=assign)
        missing = [n for n in map(self._checkpoint_name, result.missing_keys) if n not in self.unused]
        unexpected = [self._checkpoint_name(k) for k in result.unexpected_keys]
        if strict and (missing or unexpected):
            raise RuntimeError(f"state dict does not fit {type(self).__name__}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        return LoadResult(missing, unexpected)
