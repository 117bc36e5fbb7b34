"""The settings of word2vec training and of reading its corpus, declared once (see
lmforge.common.setting): `lmforge embed word2vec` derives its options from these fields. No numpy or
torch here, so the command line can build its options without loading them."""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.common import setting


@dataclass
class Word2VecConfig:
    """The settings of word2vec training, declared once: `lmforge embed word2vec` derives its options
    from them (lmforge.cli.common.add_options). The defaults are gensim's."""

    model: str = setting("sg", "sg: skip-gram (each context word predicts the word); cbow: the mean of the "
                         "context predicts the word", choices=("sg", "cbow"))
    dim: int = setting(100, "vector dimension", check="positive")
    window: int = setting(5, "largest context distance; each word draws its window from 1..window",
                          check="positive")
    negative: int = setting(5, "noise words per example, drawn from unigram^0.75", check="positive")
    epochs: int = setting(5, "passes over the corpus", check="positive")
    min_count: int = setting(5, "drop words seen fewer times", check="positive")
    max_vocab: int | None = setting(None, "keep at most this many words, the most frequent", check="positive")
    sample: float = setting(1e-3, "subsampling threshold t: a word of frequency f is kept with probability "
                            "(sqrt(f/t)+1)*t/f; 0 keeps every word", check="nonneg")
    lr: float = setting(0.025, "initial SGD learning rate, decayed linearly to --min-lr", check="positive")
    min_lr: float = setting(1e-4, "learning rate at the end of the run", check="nonneg")
    batch_size: int = setting(1024, "examples per update ((context, word) pairs for skip-gram, windows for "
                              "CBOW); the original updates after every example: large batches run faster "
                              "but the summed updates of frequent words overshoot (8192 diverged on 10M "
                              "words of fairy tales)", check="positive")
    workers: int = setting(1, "threads updating the vectors at once without locks (Hogwild, as the C tool and "
                           "gensim); runs then differ slightly; 1 is reproducible bit for bit", check="positive")
    seed: int = setting(1, "random seed (initialisation, subsampling, windows, noise words)", check="seed")
    progress: bool = setting(True, "progress bar")


@dataclass
class CorpusOptions:
    """How text files become sentences of words."""

    unit: str = setting("paragraph", "what a sentence is in plain text: a paragraph (up to a blank line) or a "
                        "line (as word2vec's C tool and gensim's LineSentence read)", choices=("paragraph", "line"))
    text_field: str = setting("text", "the text field of .jsonl/.json/.parquet records")
    max_words: int | None = setting(None, "read at most this many words of the data", check="positive")
