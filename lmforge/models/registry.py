"""The registry of model families: name -> how to build the model, its config class and presets.

A checkpoint records its family's name next to the config (`state.json`: "model_family",
"model_config"); `build_model` turns the two back into a model. Checkpoints from before families
existed have no "model_family" and are transformers.

Built-in families are imported only when first asked for (so importing the registry pulls in no
model code, and a family module, which imports only protocol.py, never imports the registry back);
`register` adds one from anywhere (a plugin, a test).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lmforge.common import LmforgeError

if TYPE_CHECKING:  # the protocol imports torch; the registry's names are needed without it (`lmforge --help`)
    from lmforge.models.protocol import ModelFamily

DEFAULT_FAMILY = "transformer"  # also what a checkpoint without "model_family" holds

# name -> module defining FAMILY (imported on first use)
_BUILTIN = {
    "transformer": "lmforge.models.transformer",
    "lstm": "lmforge.models.lstm",
    "ngram": "lmforge.models.ngram",
    "diffusion": "lmforge.models.diffusion",
    "encoder": "lmforge.models.encoder",
}


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    return sorted(set(_FAMILIES) | set(_BUILTIN))


def get_family(name: str | None) -> ModelFamily:
    name = name or DEFAULT_FAMILY
    if name not in _FAMILIES and name in _BUILTIN:
        family = importlib.import_module(_BUILTIN[name]).FAMILY
        _FAMILIES.setdefault(family.name, family)
    if name not in _FAMILIES:
        raise LmforgeError(f"unknown model family {name!r}; choose from {', '.join(family_names())}")
    return _FAMILIES[name]


def build_model(family: str | None, config):
    """The model of `family` for `config` (a config object, or the dict a checkpoint stores)."""
    fam = get_family(family)
    if isinstance(config, dict):
        config = fam.config_from_dict(config)
    return fam.model_class(config)


def family_of(model) -> str:
    """The registered family name of a model (what a checkpoint records)."""
    name = getattr(model, "family", "")
    if not name:
        raise LmforgeError(f"{type(model).__name__} is not a registered lmforge model family")
    return name
