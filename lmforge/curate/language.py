"""Language identification with the model that ships inside the `langid` package (Lui & Baldwin
2012: a naive Bayes classifier over byte 1- to 4-grams, 97 languages).

The model is langid's; the feature extraction is vectorised here. langid walks its byte-n-gram
automaton one byte at a time in Python (about 120 documents/s on Common Crawl text); the automaton
only remembers the last 4 bytes (its deepest state is 4 bytes from the start), so the state after
byte i is the state reached from the start state on bytes i-3..i alone, and numpy computes that for
every position at once in 4 table look-ups. Predictions and probabilities equal langid's own
`classify` (tests/test_curate_quality.py checks it) at about 40x its speed.

Probabilities are normalised over the 97 languages (langid's `norm_probs=True`): the threshold
`min_score` applies to P(language | text). The default 0.65 is FineWeb's threshold on fastText's
language score; langid's probabilities are sharper (most documents of one language score > 0.99), so
the same number removes mainly short or mixed-language documents.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lmforge.curate.types import StepResult

UNDETERMINED = "und"  # ISO 639-2 for "undetermined": text without a single byte n-gram feature
# The keys `language_meta` fills in a document's metadata.
LANGUAGE_META = ("language", "language_score")


@dataclass
class LanguageConfig:
    enabled: bool = True
    # ISO 639-1 codes to keep (langid's codes: "en", "de", "zh", ...); empty: keep every document, still labelled
    languages: tuple[str, ...] = ("en",)
    # a kept document's language must have at least this probability (FineWeb: 0.65 on fastText's score)
    min_score: float = 0.65
    # classify the first max_chars characters only: bounded time on book-length documents; on the 697
    # Common Crawl documents of the development data 10k characters decide exactly as the whole text
    max_chars: int = 10_000

    def __post_init__(self):
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be a probability in [0, 1], got {self.min_score}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")
        for code in self.languages:
            if code not in _LANGID_CODES:
                raise ValueError(f"unknown language code {code!r}; langid knows: {' '.join(sorted(_LANGID_CODES))}")


# langid's 97 languages, listed so a config can be checked without loading the model
_LANGID_CODES = frozenset(
    "af am an ar as az be bg bn br bs ca cs cy da de dz el en eo es et eu fa fi fo fr ga gl gu he hi hr ht hu hy "
    "id is it ja jv ka kk km kn ko ku ky la lb lo lt lv mg mk ml mn mr ms mt nb ne nl nn no oc or pa pl ps pt qu "
    "ro ru rw se si sk sl sq sr sv sw ta te th tl tr ug uk ur vi vo wa xh zh zu".split())


class _Model:
    """langid's tables rearranged for whole-array look-ups."""

    def __init__(self):
        import langid.langid as lid

        ident = lid.LanguageIdentifier.from_modelstring(lid.model, norm_probs=True)
        # the automaton: next state = nextmove[state * 256 + byte]
        self.nextmove = np.frombuffer(ident.tk_nextmove, dtype=np.dtype(ident.tk_nextmove.typecode)).astype(np.int32)
        self.n_states = len(self.nextmove) // 256
        self.depth = _max_depth(self.nextmove.reshape(self.n_states, 256))
        # Each state emits some features and each feature adds a row of log P(feature | language); summing a
        # state's rows once makes a document's score (counts of states) @ (per-state rows).
        ptc = np.asarray(ident.nb_ptc, dtype=np.float64)
        self.state_ptc = np.zeros((self.n_states, ptc.shape[1]), dtype=np.float64)
        for state, features in ident.tk_output.items():
            if features:
                self.state_ptc[state] = ptc[list(features)].sum(axis=0)
        self.prior = np.asarray(ident.nb_pc, dtype=np.float64)
        self.classes = [str(c) for c in ident.nb_classes]
        assert set(self.classes) == _LANGID_CODES, "the langid model's languages changed"

    def log_scores(self, data: bytes) -> np.ndarray | None:
        """log P(text, language) up to a constant, or None when the text emits no feature."""
        b = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        n = b.size
        # state[i] after feeding bytes i-depth+1 .. i, oldest first; positions near the start get fewer bytes,
        # exactly as the automaton started at the beginning of the text
        state = np.zeros(n, dtype=np.int32)
        for k in range(self.depth - 1, -1, -1):
            state[k:] = self.nextmove[(state[k:] << 8) + b[: n - k]]
        counts = np.bincount(state, minlength=self.n_states)
        visited = np.flatnonzero(counts)
        rows = self.state_ptc[visited]
        if not rows.any():
            return None
        return counts[visited] @ rows + self.prior


def _max_depth(table: np.ndarray) -> int:
    """The longest shortest path from the start state: how many trailing bytes decide the state."""
    depth = np.full(table.shape[0], -1)
    depth[0] = 0
    frontier, d = np.array([0]), 0
    while frontier.size:
        reached = np.unique(table[frontier].ravel())
        frontier = reached[depth[reached] < 0]
        d += 1
        depth[frontier] = d
    return int(depth.max())


@functools.lru_cache(maxsize=1)
def _model() -> _Model:
    # loaded once per process, on first use (about a second): worker processes each build their own
    return _Model()


@functools.lru_cache(maxsize=1)  # the step and `language_meta` on the same document classify it once
def detect(text: str, max_chars: int = 10_000) -> tuple[str, float]:
    """(language code, its probability) of the first max_chars characters of text; ("und", 0.0) for
    text without any feature langid knows (empty, whitespace)."""
    scores = _model().log_scores(text[:max_chars].encode("utf-8", "replace"))
    if scores is None:
        return UNDETERMINED, 0.0
    best = int(np.argmax(scores))
    # softmax of the best class, computed from differences so long texts do not overflow
    return _model().classes[best], float(1.0 / np.exp(scores - scores[best]).sum())


def identify_language(text: str, cfg: LanguageConfig) -> StepResult:
    """Keep the document when its most probable language is one of cfg.languages with probability at
    least cfg.min_score. Reasons: "language" (another language), "language_score" (a kept language, but
    not probable enough). With no languages listed every document is kept."""
    lang, prob = detect(text, cfg.max_chars)
    features = {"score": prob}
    if not cfg.languages:
        return StepResult(text, None, features)
    if lang not in cfg.languages:
        return StepResult(text, "language", features)
    if prob < cfg.min_score:
        return StepResult(text, "language_score", features)
    return StepResult(text, None, features)


def language_meta(text: str, cfg: LanguageConfig) -> dict:
    """What to record in the document's metadata: {"language": code, "language_score": probability}.
    Free right after `identify_language` on the same text (the last detection is remembered)."""
    lang, prob = detect(text, cfg.max_chars)
    return {"language": lang, "language_score": round(prob, 4)}
