"""Pretraining-data curation: the stage between raw web text and tokenized shards.

    lmforge data curate RAW... --out DIR [--config curate.toml] [--workers N] [--shard i/n]

One module per step, each with its settings as one dataclass whose defaults are the papers' numbers:

    extract.py    HTML / WARC / WET / jsonl / txt in, main text out (trafilatura or resiliparse)
    language.py   language identification (langid), a threshold on its probability
    filters.py    the Gopher quality and repetition rules, the C4 line rules, the FineWeb rules
    pii.py        e-mail and IP addresses replaced by placeholders
    dedup.py      exact (normalised hash) and near-duplicate (MinHash + LSH, verified by Jaccard)
    quality.py    a fastText-style classifier: reference-like text vs raw web text
    config.py     the steps side by side, read from TOML
    pipeline.py   the run: parallel, resumable, shardable; report.py writes DIR/report.md
"""
