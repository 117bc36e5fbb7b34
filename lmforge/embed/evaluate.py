"""The two standard intrinsic evaluations of word vectors, for any word -> vector mapping (lmforge's
word2vec, gensim's KeyedVectors, a dict: see lmforge.embed.vectors.as_word_vectors).

* **Analogies** (Mikolov et al. 2013, questions-words.txt: `: section` lines, then four words per
  line, "a b c d" meaning a is to b as c is to d). A question counts when all four words are among
  the `restrict_vocab` most frequent words; the answer is the word closest to b - a + c (3CosAdd on
  unit vectors, a, b and c excluded) among those same words; accuracy = correct / questions counted,
  coverage = questions counted / questions. This is gensim's `evaluate_word_analogies` convention
  exactly: its default restrict_vocab is 300,000 (not 30,000), case-insensitive (words compared
  upper-cased; a word with several case variants takes the vector of the most frequent one).
* **Word similarity** (WordSim-353, SimLex-999: "word1 <tab> word2 <tab> score", `#` lines are
  comments): Spearman's rho (and Pearson's r) between the human scores and the cosine similarities of
  the pairs whose two words are among the `restrict_vocab` most frequent; coverage = pairs counted /
  pairs. gensim's `evaluate_word_pairs` convention.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError
from lmforge.embed.vectors import WordVectors, as_word_vectors

RESTRICT_VOCAB = 300_000  # gensim's default for both evaluations
ANALOGY_FILE, SIMILARITY_FILE = "questions-words.txt", "wordsim353.tsv"


def default_eval_dir() -> Path:
    """The evaluation sets of the development data: $LMFORGE_SHARED_DATA/word-eval, else
    ../shared/data/word-eval beside the repository."""
    root = os.environ.get("LMFORGE_SHARED_DATA")
    return (Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "data") / "word-eval"


def _read_lines(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"evaluation file not found: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def read_analogies(path) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """(section name, questions) in file order; a question is (a, b, c, d)."""
    sections: list[tuple[str, list]] = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        if line.startswith(":"):
            sections.append((line[1:].strip(), []))
            continue
        words = line.split()
        if len(words) != 4:
            raise LmforgeError(f"{path}:{lineno}: expected four words, got {line.strip()!r}")
        if not sections:
            raise LmforgeError(f"{path}:{lineno}: a question before the first ': section' line")
        sections[-1][1].append(tuple(words))
    if not any(qs for _, qs in sections):
        raise LmforgeError(f"{path} contains no analogy questions")
    return sections


def read_word_pairs(path) -> list[tuple[str, str, float]]:
    """(word1, word2, human score) per line; tab-separated (else whitespace); `#` lines skipped."""
    pairs = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        try:
            a, b, score = (p.strip() for p in parts)
            pairs.append((a, b, float(score)))
        except ValueError:
            raise LmforgeError(f"{path}:{lineno}: expected 'word1<tab>word2<tab>score', got {line.strip()!r}") from None
    if not pairs:
        raise LmforgeError(f"{path} contains no word pairs")
    return pairs


def _candidates(wv: WordVectors, restrict_vocab: int, case_insensitive: bool):
    """The words questions may use and answers may be: the first restrict_vocab rows. Returns
    (key -> row, canon) where key is the word (upper-cased if case_insensitive) and canon[r] is the row
    that stands for row r's key (its most frequent case variant)."""
    n = min(restrict_vocab, len(wv))
    rows: dict[str, int] = {}
    canon = np.arange(n)
    for r, w in enumerate(wv.words[:n]):
        key = w.upper() if case_insensitive else w
        canon[r] = rows.setdefault(key, r)
    return rows, canon


def evaluate_analogies(vectors, questions, restrict_vocab: int = RESTRICT_VOCAB, case_insensitive: bool = True,
                       batch: int = 256) -> dict:
    """Analogy accuracy and coverage (overall and per section); `questions` is a questions-words.txt
    path or read_analogies' result."""
    wv = as_word_vectors(vectors)
    sections = read_analogies(questions) if isinstance(questions, (str, os.PathLike)) else questions
    rows, canon = _candidates(wv, restrict_vocab, case_insensitive)
    unit = wv.unit[:len(canon)]
    variants = bool((canon != np.arange(len(canon))).any())
    fold = str.upper if case_insensitive else (lambda w: w)
    out_sections, all_correct, all_counted, all_questions = [], 0, 0, 0
    for name, qs in sections:
        idx = [[rows.get(fold(w), -1) for w in q] for q in qs]
        idx = np.array([i for i in idx if min(i) >= 0], dtype=np.int64).reshape(-1, 4)
        correct = 0
        for s in range(0, len(idx), batch):
            a, b, c, d = idx[s:s + batch].T
            scores = (unit[b] - unit[a] + unit[c]) @ unit.T  # ranking is the cosine's: the query's length is common
            if variants:  # no case variant of a, b or c may be the answer
                row = canon[None, :]
                scores[(row == a[:, None]) | (row == b[:, None]) | (row == c[:, None])] = -np.inf
            else:
                q = np.arange(len(a))
                scores[q, a] = scores[q, b] = scores[q, c] = -np.inf
            correct += int((canon[scores.argmax(1)] == d).sum())
        out_sections.append({"section": name, "correct": correct, "counted": len(idx), "questions": len(qs),
                             "accuracy": correct / len(idx) if len(idx) else 0.0})
        all_correct, all_counted, all_questions = all_correct + correct, all_counted + len(idx), all_questions + len(qs)
    return {"accuracy": all_correct / all_counted if all_counted else 0.0, "correct": all_correct,
            "counted": all_counted, "questions": all_questions, "coverage": all_counted / max(all_questions, 1),
            "restrict_vocab": restrict_vocab, "sections": out_sections}


def evaluate_word_pairs(vectors, pairs, restrict_vocab: int = RESTRICT_VOCAB, case_insensitive: bool = True) -> dict:
    """Spearman's rho and Pearson's r between human scores and cosine similarities, with coverage;
    `pairs` is a file path or read_word_pairs' result."""
    from scipy.stats import pearsonr, spearmanr

    wv = as_word_vectors(vectors)
    pairs = read_word_pairs(pairs) if isinstance(pairs, (str, os.PathLike)) else pairs
    rows, _ = _candidates(wv, restrict_vocab, case_insensitive)
    fold = str.upper if case_insensitive else (lambda w: w)
    found = [(rows[fold(a)], rows[fold(b)], s) for a, b, s in pairs if fold(a) in rows and fold(b) in rows]
    if len(found) < 2:
        raise LmforgeError(f"only {len(found)} of {len(pairs)} word pairs have both words in the vocabulary")
    ia, ib, gold = (np.array(x) for x in zip(*found))
    cosine = (wv.unit[ia] * wv.unit[ib]).sum(1)
    return {"spearman": float(spearmanr(gold, cosine).statistic), "pearson": float(pearsonr(gold, cosine).statistic),
            "counted": len(found), "pairs": len(pairs), "coverage": len(found) / len(pairs),
            "restrict_vocab": restrict_vocab}
