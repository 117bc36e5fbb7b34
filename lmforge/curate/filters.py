"""Heuristic quality filters of web text: the Gopher quality and repetition rules (Rae et al. 2021,
MassiveText, Appendix A and its Table A1), the C4 line rules (Raffel et al. 2020, sec. 2.2) and the
FineWeb rules (Penedo et al. 2024).

Each filter is a function `step(text, cfg) -> StepResult` with its settings in one `<Step>Config`
whose defaults are the papers' thresholds. Where the papers leave a definition open, the definitions
are datatrove's (the library FineWeb was built with, the reference the tests compare against): what a
"word" is, which denominator a fraction has, which rule is checked first. A filter stops at the first
rule that removes the document (as datatrove does), so a removed document's features are those
measured up to that rule.

Words. datatrove splits text into words with spaCy's English tokenizer, and its rules count every
token, punctuation included: "Hello, world!" is four words, two of them alphabetic. `split_words`
reproduces that tokenizer's rules (prefix, suffix and infix punctuation, contractions, abbreviations)
with one precompiled regular expression, about seven times faster than spaCy. It is not token-exact
(spaCy has thousands of special cases), but on the 697 Common Crawl documents of the development data
the filters' decisions agree with datatrove's on 99-100% of documents (tests/test_curate_filters.py).
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter

import regex

from lmforge.curate.types import StepResult

# ----------------------------------------------------------------------------- words


# Characters spaCy splits off the front of a word ("(hello" -> "(", "hello") and off its end. Not the
# hyphen, slash, backslash, '@' or bullet: spaCy keeps "-97.4", "//x", "•item" and "@user" whole.
_QUOTES = "'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉"
_PREFIX_CHARS = "§%=—–…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪$£€¥₹₽" + _QUOTES
_SUFFIX_CHARS = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪—–" + _QUOTES
# Symbols (©, °, arrows, shapes, dingbats, emoji) are split off wherever they stand: "45°N" -> "45" "°" "N".
_SYMBOLS = "¦©®°™\u2190-\u21ff\u2300-\u23ff\u2500-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff"
_PRE, _SUF = re.escape(_PREFIX_CHARS) + _SYMBOLS, re.escape(_SUFFIX_CHARS) + _SYMBOLS
_UPPER = "A-ZÀ-ÖØ-ÞА-ЯЁ"  # Latin-1 and Cyrillic capitals: enough for the period rule below
_ALPHA = "A-Za-zÀ-ÖØ-öø-ÿĀ-ſА-яЁё"
# One suffix token: an ellipsis, a contraction ('s 'm 'd 'll 're 've n't), a unit or currency after a
# number ("5km", "100%"), a period (unless it follows a lone capital, as in "J." or "AbC."), a quote or
# other closing punctuation.
_SUFFIX = (rf"(?:\.{{2,}}|['’][sSmd]|['’](?:ll|re|ve)|n['’]t"
           rf"|(?<=[0-9])(?:[$£€¥+%]|km|kg|mm|cm|m|g|am|pm)"
           rf"|(?<![^{_UPPER}][{_UPPER}])(?<!^[{_UPPER}])\.|[{_SUF}])")
_WORD_END = rf"(?={_SUFFIX}*(?:\s|$))"  # only suffixes remain before the next space
# Where spaCy splits inside a word: ellipses, hyphens and dashes after a letter or digit and before a
# letter ("e-mail", "10-fold"), operators between digits ("2019-07-17"), a period between a small and
# a capital letter, a comma between letters, and : < > = / before a letter ("Kč/noc").
_INFIX = (rf"[{_SYMBOLS}]|\.{{2,}}|…|(?<=[0-9])[-+*^](?=[0-9-])|(?<=[a-zà-öø-ÿа-яё])\.(?=[{_UPPER}])"
          rf"|(?<=[{_ALPHA}]),(?=[{_ALPHA}])|(?<=[{_ALPHA}0-9])(?:-+|–|—|~)(?=[{_ALPHA}])"
          rf"|(?<=[{_ALPHA}0-9])[:<>=/](?=[{_ALPHA}])")
_WORD_START = rf"(?<![^\s{_PRE}])"
# Abbreviations spaCy keeps with their period (a short list of its exceptions), single letters ("J.")
# and dotted initialisms ("U.S.", "e.g.").
_ABBREVIATION = (r"(?:[Mm]rs?|[Mm]s|Dr|St|Jr|Sr|Inc|Ltd|Co|Corp|Prof|Gen|Gov|Rev|Sen|Rep|vs"
                 r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)")
# spaCy also splits these words written without their apostrophe: "dont" -> "do" "nt", "im" -> "i" "m".
_NT_STEMS = (r"(?:[Dd]o|[Dd]oes|[Dd]id|[Ii]s|[Aa]re|[Ww]as|[Ww]ere|[Hh]ave|[Hh]as|[Hh]ad|[Cc]ould|[Ww]ould|[Ss]hould"
             r"|[Cc]a|[Ww]o|[Aa]i)")
_NO_APOSTROPHE = (rf"(?:{_NT_STEMS}nt|[Ii](?:m|ve|d)|[Cc]annot|[Yy]ou(?:re|ve|ll|d)|[Ss]?[Hh]es|[Ww]hats|[Tt]hats"
                  r"|[Tt]hey(?:re|ve|ll|d)|[Ww]eve|[Gg]onna)(?![^\W\d_])")
_TOKEN = re.compile(rf"""
    (?!{_NO_APOSTROPHE})[^\W\d_]+(?=\s|$|[,;:!?)\]"]{{1,3}}(?:\s|$))   # fast path: a plain word
  | (?:https?://|www\.)\S+?{_WORD_END}                                # a URL stays whole
  | {_WORD_START}(?:{_ABBREVIATION}|(?:[{_UPPER}]\.)*[{_UPPER}]|(?:[a-z]\.)*[a-z])\.(?!\.){_WORD_END}
  | {_WORD_START}and/or{_WORD_END}
  | \.{{2,}} | …+ | '' | \):|:\)|:\(                                    # ellipses, emoticons
  | {_SUFFIX}{_WORD_END}
  | {_INFIX}
  | {_WORD_START}{_NT_STEMS}(?=nt{_WORD_END})                            # "dont" -> "do" "nt"
  | {_WORD_START}(?:[Ii](?=(?:m|ve|d){_WORD_END})|[Cc]an(?=not{_WORD_END})|[Yy]ou(?=(?:re|ve|ll|d){_WORD_END})
                   |[Ss]?[Hh]e(?=s{_WORD_END})|(?:[Ww]hat|[Tt]hat)(?=s{_WORD_END})
                   |[Tt]hey(?=(?:re|ve|ll|d){_WORD_END})|[Ww]e(?=ve{_WORD_END})|[Gg]on(?=na{_WORD_END}))
  | [^\s{_PRE}]\S*?(?={_INFIX}|{_WORD_END})                            # any other word, up to its suffixes
  | \S                                                                # a prefix character
""", re.X)


@functools.lru_cache(maxsize=4)
def split_words(text: str) -> tuple[str, ...]:
    """The words of `text` as spaCy's English tokenizer (datatrove's word splitter) cuts them:
    punctuation is split off as words of its own. Cached: the Gopher and FineWeb filters of one
    document share one split."""
    return tuple(_TOKEN.findall(text))


# A word made of punctuation and symbols only ("," "--" "©"); datatrove's list of such characters is
# its own, this is the Unicode definition (categories P and S, and control characters).
_SYMBOLS_ONLY = regex.compile(r"[\p{P}\p{S}\p{Cc}]+")
_HAS_LETTER = re.compile(r"[^\W\d_]")  # \w without digits and '_': letters (and a few numerals)
_PUNCT_ONLY = regex.compile(r"\p{P}+")  # spaCy's is_punct: every character is punctuation


@functools.cache
def _terminal_punctuation() -> frozenset[str]:
    """The characters that end a sentence: Unicode's Sentence_Terminal property (. ! ? 。 । ؟ ...),
    the set FineWeb's and spaCy's lists are drawn from. Built on first use (about 0.1 s)."""
    every_char = "".join(map(chr, range(0x110000)))
    return frozenset(regex.findall(r"\p{Sentence_Terminal}", every_char))


@functools.cache
def _terminal_class() -> str:
    return "[" + re.escape("".join(sorted(_terminal_punctuation()))) + "]"


@functools.cache
def _line_ends_in_terminal() -> re.Pattern:
    return re.compile(_terminal_class() + "$", re.M)


@functools.cache
def _has_terminal() -> re.Pattern:
    return re.compile(_terminal_class())


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _count_duplicates(items) -> tuple[int, int]:
    """(repeated items, their characters): every occurrence of an item after its first."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


# ----------------------------------------------------------------------------- Gopher quality


@dataclass
class GopherQualityConfig:
    """Gopher's quality rules (Rae et al. 2021, Appendix A). A rule is switched off by a threshold it
    cannot cross (a minimum of 0, a maximum of inf)."""

    enabled: bool = True
    min_words: int = 50  # Gopher: 50 to 100,000 words (words with a letter or digit; datatrove)
    max_words: int = 100_000
    min_mean_word_length: float = 3.0  # Gopher: mean word length within 3..10 characters
    max_mean_word_length: float = 10.0
    max_hash_ratio: float = 0.1  # Gopher: symbol-to-word ratio at most 0.1 for '#' ...
    max_ellipsis_ratio: float = 0.1  # ... and for the ellipsis ('...' and '…')
    max_bullet_lines_frac: float = 0.9  # Gopher: at most 90% of lines start with a bullet
    bullets: tuple[str, ...] = ("•", "-")  # datatrove's bullet characters
    max_ellipsis_lines_frac: float = 0.3  # Gopher: at most 30% of lines end with an ellipsis
    min_alpha_words_frac: float = 0.8  # Gopher: 80% of words contain a letter
    min_stop_words: int = 2  # Gopher: at least 2 of the 8 stop words below (case-sensitive, as datatrove)
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")

    def __post_init__(self):
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError(f"min_mean_word_length ({self.min_mean_word_length}) is above max_mean_word_length "
                             f"({self.max_mean_word_length})")


def gopher_quality(text: str, cfg: GopherQualityConfig) -> StepResult:
    """Gopher's quality rules, in datatrove's order. Word counts and mean length are over words that
    are not pure punctuation; the symbol ratios and the letter fraction are over all words."""
    words = split_words(text)
    f: dict[str, float] = {}
    # Most words are letters or digits only (isalnum); the regex decides the rest.
    lengths = [len(w) for w in words if w.isalnum() or not _SYMBOLS_ONLY.fullmatch(w)]
    f["words"] = n = len(lengths)
    if n < cfg.min_words or n > cfg.max_words:
        return StepResult(text, "word_count", f)
    f["mean_word_length"] = mean = _ratio(sum(lengths), n)
    if mean < cfg.min_mean_word_length or mean > cfg.max_mean_word_length:
        return StepResult(text, "mean_word_length", f)
    n_all = len(words)
    f["hash_ratio"] = _ratio(text.count("#"), n_all)
    if f["hash_ratio"] > cfg.max_hash_ratio:
        return StepResult(text, "hash_ratio", f)
    f["ellipsis_ratio"] = _ratio(text.count("...") + text.count("…"), n_all)
    if f["ellipsis_ratio"] > cfg.max_ellipsis_ratio:
        return StepResult(text, "ellipsis_ratio", f)
    lines = text.splitlines()
    bullets = cfg.bullets
    f["bullet_lines_frac"] = _ratio(sum(1 for s in lines if s.lstrip().startswith(bullets)), len(lines))
    if f["bullet_lines_frac"] > cfg.max_bullet_lines_frac:
        return StepResult(text, "bullet_lines", f)
    f["ellipsis_lines_frac"] = _ratio(sum(1 for s in lines if s.rstrip().endswith(("...", "…"))), len(lines))
    if f["ellipsis_lines_frac"] > cfg.max_ellipsis_lines_frac:
        return StepResult(text, "ellipsis_lines", f)
    with_letter = sum(1 for w in words if w.isalpha() or _HAS_LETTER.search(w))
    f["alpha_words_frac"] = _ratio(with_letter, n_all)
    if f["alpha_words_frac"] < cfg.min_alpha_words_frac:
        return StepResult(text, "alpha_words", f)
    f["stop_words"] = len(set(cfg.stop_words).intersection(words))
    if f["stop_words"] < cfg.min_stop_words:
        return StepResult(text, "stop_words", f)
    return StepResult(text, None, f)


# ----------------------------------------------------------------------------- Gopher repetition


@dataclass
class GopherRepetitionConfig:
    """Gopher's repetition rules (Rae et al. 2021, Table A1): a document is removed when any fraction
    exceeds its maximum. Denominators are datatrove's: the characters of the whole text."""

    enabled: bool = True
    max_dup_line_frac: float = 0.30  # lines that repeat an earlier line, over all lines
    max_dup_para_frac: float = 0.30  # paragraphs (split on blank lines) that repeat an earlier one
    max_dup_line_char_frac: float = 0.20  # characters in those repeated lines
    max_dup_para_char_frac: float = 0.20
    max_top_2gram_char_frac: float = 0.20  # characters in the most frequent word 2-gram, times its count
    max_top_3gram_char_frac: float = 0.18
    max_top_4gram_char_frac: float = 0.16
    max_dup_5gram_char_frac: float = 0.15  # characters in word 5-grams seen earlier in the document
    max_dup_6gram_char_frac: float = 0.14
    max_dup_7gram_char_frac: float = 0.13
    max_dup_8gram_char_frac: float = 0.12
    max_dup_9gram_char_frac: float = 0.11
    max_dup_10gram_char_frac: float = 0.10


_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")


def _ngrams(words: tuple[str, ...], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


def _top_ngram_chars(words: tuple[str, ...], n: int) -> int:
    """Characters of the most frequent n-gram (words joined by spaces) times its count; among equally
    frequent n-grams the first seen, as datatrove's Counter.most_common."""
    counts = Counter(_ngrams(words, n))
    if not counts:
        return 0
    gram, count = max(counts.items(), key=itemgetter(1))
    return (sum(map(len, gram)) + n - 1) * count


def _repeated_ngrams(words: tuple[str, ...], n: int, candidates: list[int] | None):
    """(positions, n-grams) of the n-grams that occur more than once, in text order. An n-gram can only
    repeat where its first n-1 words repeat, so `candidates` (the (n-1)-gram answer) bounds the search."""
    if candidates is None:
        grams = _ngrams(words, n)
        positions: range | list[int] = range(len(grams))
    else:
        positions = [i for i in candidates if i + n <= len(words)]
        grams = [words[i:i + n] for i in positions]
    counts = Counter(grams)
    repeated = list(map((1).__lt__, map(counts.__getitem__, grams)))  # counts[g] > 1, without a Python loop
    return list(compress(positions, repeated)), list(compress(grams, repeated))


def _dup_ngram_chars(positions: list[int], grams: list[tuple[str, ...]], n: int) -> int:
    """Characters (spaces excluded) of the n-grams that repeat an earlier one, scanning left to right
    and jumping n words past a repeat so that its words count once (datatrove's definition). The scan
    only needs the n-grams that occur more than once: the others never repeat anything."""
    seen: set[tuple[str, ...]] = set()
    chars = skip_until = 0
    for i, gram in zip(positions, grams):
        if i < skip_until:
            continue
        if gram in seen:
            chars += sum(map(len, gram))
            skip_until = i + n
        else:
            seen.add(gram)
    return chars


def gopher_repetition(text: str, cfg: GopherRepetitionConfig) -> StepResult:
    """Gopher's repetition rules in datatrove's order: paragraphs, lines, top n-grams, repeated n-grams."""
    f: dict[str, float] = {}
    if not text:
        return StepResult(text, "empty", f)
    size = len(text)
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    n, chars = _count_duplicates(paragraphs)
    f["dup_para_frac"] = n / len(paragraphs)
    if f["dup_para_frac"] > cfg.max_dup_para_frac:
        return StepResult(text, "dup_para_frac", f)
    f["dup_para_char_frac"] = chars / size
    if f["dup_para_char_frac"] > cfg.max_dup_para_char_frac:
        return StepResult(text, "dup_para_char_frac", f)
    lines = _LINE_BREAKS.split(text)
    n, chars = _count_duplicates(lines)
    f["dup_line_frac"] = n / len(lines)
    if f["dup_line_frac"] > cfg.max_dup_line_frac:
        return StepResult(text, "dup_line_frac", f)
    f["dup_line_char_frac"] = chars / size
    if f["dup_line_char_frac"] > cfg.max_dup_line_char_frac:
        return StepResult(text, "dup_line_char_frac", f)
    words = split_words(text)
    for n in (2, 3, 4):
        frac = f[f"top_{n}gram_char_frac"] = _top_ngram_chars(words, n) / size
        if frac > getattr(cfg, f"max_top_{n}gram_char_frac"):
            return StepResult(text, f"top_{n}gram", f)
    candidates = None
    for n in range(5, 11):
        candidates, grams = _repeated_ngrams(words, n, candidates)
        frac = f[f"dup_{n}gram_char_frac"] = _dup_ngram_chars(candidates, grams, n) / size
        if frac > getattr(cfg, f"max_dup_{n}gram_char_frac"):
            return StepResult(text, f"dup_{n}gram", f)
    return StepResult(text, None, f)


# ----------------------------------------------------------------------------- C4


@dataclass
class C4Config:
    """C4's rules (Raffel et al. 2020, sec. 2.2, and the TFDS c4_utils code datatrove follows). Lines
    are cut from the text; the page goes if too few sentences remain. The bad-words list is not used."""

    enabled: bool = True
    remove_citations: bool = True  # Wikipedia markers "[1]", "[edit]", "[citation needed]" are deleted
    terminal_punct: tuple[str, ...] = (".", "?", "!", '"', "'")  # C4: keep lines ending in one of these
    require_terminal_punct: bool = True  # (an ellipsis "..." does not count)
    min_words_per_line: int = 3  # C4: keep lines of at least 3 words (split on whitespace)
    max_word_length: int = 1000  # C4 code: drop lines with a word longer than 1000 characters
    drop_javascript_lines: bool = True  # C4: drop lines mentioning "javascript"
    drop_policy_lines: bool = True  # C4 code: drop lines with a cookie / terms / privacy phrase below
    policy_phrases: tuple[str, ...] = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                                       "use of cookies", "use cookies")
    drop_lorem_ipsum: bool = True  # C4: drop the page if a kept line has "lorem ipsum"
    drop_curly_bracket: bool = True  # C4: drop the page if a kept line has "{" (code)
    min_sentences: int = 5  # C4: drop pages with fewer than 5 sentences in the kept lines


_CITATION = re.compile(r"\[(?:\d*|edit|citation needed)\]")
_C4_LINE_RULES = ("long_word", "no_terminal_punct", "few_words", "javascript", "policy")


def _count_sentences(line: str) -> int:
    """Sentences in a line as spaCy's rule-based sentencizer counts them: a sentence ends at a word
    that is a sentence-final mark ("." "!" "?" ...) and the next one starts at the following word that
    is not punctuation. "Mr." or "3.14" end nothing: they are one word."""
    if not _has_terminal().search(line, 0, len(line) - 1):
        return 1  # no mark before the last character: one sentence, decided without splitting words
    terminal = _terminal_punctuation()
    count, after_mark = 1, False
    for word in _TOKEN.findall(line):  # not split_words: lines would evict whole documents from its cache
        if word in terminal:
            after_mark = True
        elif after_mark and not _PUNCT_ONLY.fullmatch(word):
            count += 1
            after_mark = False
    return count


def c4_lines(text: str, cfg: C4Config) -> StepResult:
    """C4's line filter: each line is stripped, cleaned of citation markers and kept only if it passes
    every line rule; the page is dropped for "lorem ipsum" or "{" in a kept line, or for fewer than
    `min_sentences` sentences in what is kept. The text passed on is the kept lines."""
    lines = text.splitlines()
    removed = dict.fromkeys(_C4_LINE_RULES, 0)  # every counter in every document's features
    kept: list[str] = []
    sentences = 0
    ends = tuple(cfg.terminal_punct)
    policy = tuple(cfg.policy_phrases)

    def features() -> dict[str, float]:
        return {"lines": len(lines), "lines_kept": len(kept), "sentences": sentences,
                **{f"lines_{k}": v for k, v in removed.items()}}

    for line in lines:
        line = line.strip()
        words = line.split()
        if any(len(w) > cfg.max_word_length for w in words):
            removed["long_word"] += 1
            continue
        if cfg.remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if cfg.require_terminal_punct and (not line.endswith(ends) or line.endswith("...")):
            removed["no_terminal_punct"] += 1
            continue
        if len(words) < cfg.min_words_per_line:
            removed["few_words"] += 1
            continue
        lower = line.lower()
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
            return StepResult(text, "lorem_ipsum", features())
        if cfg.drop_javascript_lines and "javascript" in lower:
            removed["javascript"] += 1
            continue
        if cfg.drop_curly_bracket and "{" in line:
            return StepResult(text, "curly_bracket", features())
        if cfg.drop_policy_lines and any(p in lower for p in policy):
            removed["policy"] += 1
            continue
        sentences += _count_sentences(line)
        kept.append(line)
    if sentences < cfg.min_sentences:
        return StepResult(text, "too_few_sentences", features())
    return StepResult("\n".join(kept).strip(), None, features())


# ----------------------------------------------------------------------------- FineWeb


@dataclass
class FineWebConfig:
    """FineWeb's own rules (Penedo et al. 2024), over the non-blank lines split on "\\n"."""

    enabled: bool = True
    min_line_punct_frac: float = 0.12  # FineWeb: at least 12% of lines end in terminal punctuation
    line_punct_exclude_zero: bool = False  # datatrove's option: keep documents where no line does
    max_short_line_frac: float = 0.67  # FineWeb: at most 67% of lines ...
    short_line_chars: int = 30  # ... are 30 characters or shorter
    # FineWeb's write-up says 0.1; datatrove's default, the one its FineWeb pipeline ran with, is 0.01
    max_dup_line_char_frac: float = 0.01
    max_newline_word_ratio: float = 0.3  # datatrove: newlines per word at most 0.3 (list-like pages)


def fineweb(text: str, cfg: FineWebConfig) -> StepResult:
    """FineWeb's rules in datatrove's order: line punctuation, short lines, duplicated line characters,
    newlines per word."""
    f: dict[str, float] = {}
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return StepResult(text, "empty", f)
    n = len(lines)
    # Blank lines cannot end in punctuation, so counting over all lines counts the non-blank ones.
    f["line_punct_frac"] = frac = len(_line_ends_in_terminal().findall(text)) / n
    if frac < cfg.min_line_punct_frac and not (frac == 0 and cfg.line_punct_exclude_zero):
        return StepResult(text, "line_punct", f)
    f["short_line_frac"] = sum(1 for line in lines if len(line) <= cfg.short_line_chars) / n
    if f["short_line_frac"] > cfg.max_short_line_frac:
        return StepResult(text, "short_lines", f)
    f["dup_line_char_frac"] = _count_duplicates(lines)[1] / (len(text) - text.count("\n"))
    if f["dup_line_char_frac"] > cfg.max_dup_line_char_frac:
        return StepResult(text, "dup_line_chars", f)
    f["newline_word_ratio"] = text.count("\n") / len(split_words(text))
    if f["newline_word_ratio"] > cfg.max_newline_word_ratio:
        return StepResult(text, "newline_ratio", f)
    return StepResult(text, None, f)
