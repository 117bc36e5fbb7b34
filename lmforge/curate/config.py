"""One configuration for the whole curation run, composed of each step's own settings.

Every step declares its settings once, as a dataclass in its own module, with the papers' numbers as
defaults. This file only puts them side by side, in pipeline order, and reads a TOML file whose
tables are the step names:

    [language]
    languages = ["en", "de"]

    [gopher_quality]
    min_words = 30

    [dedup]
    enabled = false

An unknown table or key, or a value of the wrong type, is one error line naming it: a typo must not
silently leave a paper default in place.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.curate.dedup import DedupConfig
from lmforge.curate.extract import ExtractConfig
from lmforge.curate.filters import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from lmforge.curate.language import LanguageConfig
from lmforge.curate.pii import PiiConfig
from lmforge.curate.quality import QualityModelConfig


@dataclass
class CurateConfig:
    """The steps in the order they run. Per document, in worker processes: extract .. pii. Then once
    over all documents: dedup, quality_model."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    quality_model: QualityModelConfig = field(default_factory=QualityModelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, tables: dict, where: str = "config") -> CurateConfig:
        steps = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(tables) - set(steps))
        if unknown:
            raise LmforgeError(f"{where}: unknown step [{unknown[0]}] (steps: {', '.join(steps)})")
        built = {}
        for name, f in steps.items():
            step_cls = f.default_factory
            values = tables.get(name, {})
            if not isinstance(values, dict):
                raise LmforgeError(f"{where}: [{name}] must be a table of settings, got {values!r}")
            built[name] = _step_config(step_cls, values, f"{where}: [{name}]")
        return cls(**built)


def _step_config(step_cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(step_cls)}
    defaults = step_cls()
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise LmforgeError(f"{where}: unknown key {key!r} (keys: {', '.join(fields)})")
        kwargs[key] = _coerce(value, getattr(defaults, key), f"{where} {key}")
    try:
        return step_cls(**kwargs)
    except (ValueError, TypeError) as e:  # a step's own __post_init__ check
        raise LmforgeError(f"{where}: {e}") from None


def _coerce(value, default, where: str):
    """The TOML value in the type of the default: ints are accepted for floats, lists for tuples."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif default is None:  # an optional number, unset by default
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    else:
        ok = True
    if not ok:
        raise LmforgeError(f"{where} = {value!r} has the wrong type (expected {type(default).__name__})")
    return value


def load_config(path: str | os.PathLike | None = None) -> CurateConfig:
    """The paper defaults, overridden by the TOML file at `path` if one is given."""
    if path is None:
        return CurateConfig()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"curation config not found: {path}")
    try:
        tables = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid TOML: {e}") from None
    return CurateConfig.from_dict(tables, where=str(path))


def config_toml(cfg: CurateConfig) -> str:
    """The settings as a TOML file `load_config` reads back (every step, every key)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(json.dumps(x) for x in v) + "]"
        return repr(v)

    lines = []
    for name, table in cfg.to_dict().items():
        lines.append(f"[{name}]")
        for key, v in table.items():
            if v is None:  # TOML has no null: an unset optional stays out, commented
                lines.append(f"# {key} =")
            else:
                lines.append(f"{key} = {value(v)}")
        lines.append("")
    return "\n".join(lines)
