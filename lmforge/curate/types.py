"""What every curation step returns: the text it passes on, why it removed the document (if it
did), and what it measured (the report draws histograms of these); and what the run counts of each
step."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple


class StepResult(NamedTuple):
    text: str  # the text passed to the next step (a line filter or a scrubber may have changed it)
    reason: str | None  # None keeps the document; otherwise a short slug: why it was removed
    features: dict[str, float]  # measured quantities, named without the step's prefix


@dataclass
class StepCount:
    """Documents and UTF-8 bytes entering and leaving one step, and why the others were removed."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: Counter = dataclasses.field(default_factory=Counter)

    def add(self, other: dict) -> None:
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
            setattr(self, key, getattr(self, key) + other[key])
        self.reasons.update(other["reasons"])

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reasons": dict(self.reasons.most_common())}
