"""Benchmark: lmforge's word2vec (lmforge/embed/word2vec.py) against gensim's Word2Vec, in one run.

Corpus: the 200 fairy-tale books of the development data (gutenberg/fairytales.txt, ~9.7M words),
tokenised once by lmforge (lowercase, runs of letters and digits, one paragraph per sentence) and
written one sentence per line; both read that file (lmforge with `unit="line"`, gensim through
LineSentence), so both see the same sentences, and the script checks that both built the same
vocabulary (same words, same counts). Same settings for both: skip-gram, min_count 5, 100
dimensions, window 5, 5 noise words, 5 epochs, sample 1e-3, learning rate 0.025 -> 0.0001, seed 1.

Rows: lmforge and gensim with 2 worker threads each (lmforge: Hogwild threads, one torch thread
each; gensim's default of 3 workers would oversubscribe 2 cores), and with 1 worker each (the
fairest speed comparison: one thread against one thread). Each row: Google analogy accuracy and
coverage (the questions whose four words are in the vocabulary), WordSim-353 Spearman rho and
coverage, both by lmforge/embed/evaluate.py (gensim's own evaluate_word_analogies /
evaluate_word_pairs on the same vectors are run too, as a check), training seconds, and
words/second = corpus words x epochs / training seconds. gensim's train() reads its file in every
epoch; lmforge encodes the corpus once before training (reported, not counted in its training time).

    python bench/word2vec.py [--max-words N] [--cbow] [--epochs 5] [--workers 2] [--no-single-worker]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.embed.config import CorpusOptions, Word2VecConfig  # noqa: E402
from lmforge.embed.evaluate import evaluate_analogies, evaluate_word_pairs  # noqa: E402
from lmforge.embed.vectors import WordVectors  # noqa: E402
from lmforge.embed.word2vec import build_corpus, read_sentences, train  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def need(relative: str) -> Path:
    p = shared_data() / relative
    if not p.exists():
        sys.exit(f"error: {p} not found (set LMFORGE_SHARED_DATA)")
    return p


def write_corpus(source: Path, out: Path, max_words: int | None) -> int:
    """The source's sentences, one per line, words separated by spaces; returns the word count."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for words in read_sentences([source], CorpusOptions(max_words=max_words)):
            f.write(" ".join(words) + "\n")
            n += len(words)
    return n


def evaluate(wv: WordVectors, questions: Path, pairs: Path) -> dict:
    a, s = evaluate_analogies(wv, questions), evaluate_word_pairs(wv, pairs)
    return {"analogy": a["accuracy"], "analogy_correct": a["correct"], "analogy_counted": a["counted"],
            "analogy_coverage": a["coverage"], "spearman": s["spearman"], "similarity_coverage": s["coverage"],
            "sections": {x["section"]: [x["correct"], x["counted"]] for x in a["sections"]}}


def gensim_check(wv: WordVectors, questions: Path, pairs: Path) -> dict:
    """gensim's own evaluation of the same vectors (an independent reference for ours)."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors(wv.dim)
    kv.add_vectors(wv.words, wv.vectors)
    score, _ = kv.evaluate_word_analogies(str(questions))
    return {"analogy": score, "spearman": float(kv.evaluate_word_pairs(str(pairs))[1][0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-words", type=int, default=None, help="use the first N words of the corpus")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="worker threads of both (and a row with 1 worker each)")
    ap.add_argument("--batch-size", type=int, default=Word2VecConfig.batch_size)
    ap.add_argument("--cbow", action="store_true", help="also compare CBOW (with --workers only)")
    ap.add_argument("--no-single-worker", action="store_true", help="skip the rows with 1 worker")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "word2vec"))
    args = ap.parse_args()

    import gensim
    import torch
    from gensim.models import Word2Vec as GensimWord2Vec
    from gensim.models.word2vec import LineSentence

    source = need("gutenberg/fairytales.txt")
    questions, pairs = need("word-eval/questions-words.txt"), need("word-eval/wordsim353.tsv")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus_file = out / "corpus.txt"
    t = time.perf_counter()
    n_words = write_corpus(source, corpus_file, args.max_words)
    print(f"corpus: {source.name}, {n_words:,} words -> {corpus_file} ({time.perf_counter() - t:.0f} s)", flush=True)

    settings = dict(dim=100, window=5, negative=5, epochs=args.epochs, min_count=5, sample=1e-3, lr=0.025,
                    min_lr=1e-4, seed=1)
    t = time.perf_counter()
    corpus = build_corpus(read_sentences([corpus_file], CorpusOptions(unit="line")), settings["min_count"])
    encode_seconds = time.perf_counter() - t
    print(f"lmforge vocabulary: {len(corpus.words):,} words; corpus encoded once in {encode_seconds:.1f} s", flush=True)

    rows = {}
    for model in ["sg"] + (["cbow"] if args.cbow else []):
        for workers in [args.workers] + ([] if args.no_single_worker or model != "sg" else [1]):
            torch.set_num_threads(1)  # the workers are the parallelism (with one worker: one thread, as gensim's)
            cfg = Word2VecConfig(model=model, batch_size=args.batch_size, workers=workers, progress=False, **settings)
            print(f"== lmforge {model}, workers={workers}", flush=True)
            m = train(corpus, cfg)
            label = f"lmforge {model} (workers={workers})"
            rows[label] = {"seconds": m.stats["train_seconds"], "words_per_s": m.stats["words_per_second"],
                           **evaluate(m.wv, questions, pairs), "gensim_eval": gensim_check(m.wv, questions, pairs)}
            print(f"  {rows[label]['seconds']:.0f} s, analogy {100 * rows[label]['analogy']:.2f}%, "
                  f"rho {rows[label]['spearman']:.4f}", flush=True)

        for workers in [args.workers] + ([] if args.no_single_worker or model != "sg" else [1]):
            print(f"== gensim {gensim.__version__} {model}, workers={workers}", flush=True)
            g = GensimWord2Vec(vector_size=settings["dim"], window=settings["window"], negative=settings["negative"],
                               epochs=settings["epochs"], min_count=settings["min_count"], sample=settings["sample"],
                               alpha=settings["lr"], min_alpha=settings["min_lr"], seed=settings["seed"],
                               sg=int(model == "sg"), workers=workers)
            g.build_vocab(LineSentence(str(corpus_file)))
            same = {w: int(c) for w, c in zip(corpus.words, corpus.counts)} == \
                {w: int(g.wv.get_vecattr(w, "count")) for w in g.wv.index_to_key}
            if not same or g.corpus_total_words != corpus.raw_words:
                sys.exit("error: gensim built a different vocabulary or corpus from the same file")
            t = time.perf_counter()
            g.train(LineSentence(str(corpus_file)), total_examples=g.corpus_count, epochs=g.epochs)
            seconds = time.perf_counter() - t
            gwv = WordVectors(list(g.wv.index_to_key), g.wv.vectors)
            label = f"gensim {model} (workers={workers})"
            rows[label] = {"seconds": seconds, "words_per_s": g.corpus_total_words * g.epochs / seconds,
                           **evaluate(gwv, questions, pairs), "gensim_eval": gensim_check(gwv, questions, pairs)}
            print(f"  {seconds:.0f} s, analogy {100 * rows[label]['analogy']:.2f}%, "
                  f"rho {rows[label]['spearman']:.4f}", flush=True)

    meta = {"corpus": str(source), "words": corpus.raw_words, "vocab": len(corpus.words), "settings": settings,
            "batch_size": args.batch_size, "encode_seconds": encode_seconds, "gensim": gensim.__version__,
            "torch": torch.__version__, "cpus": os.cpu_count()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    print(f"\n{corpus.raw_words:,} words ({source.name}), vocabulary {len(corpus.words):,} (min_count 5), "
          f"dim 100, window 5, 5 negatives, {args.epochs} epochs, sample 1e-3, lr 0.025 -> 0.0001\n")
    print("| row | analogy accuracy (coverage) | WordSim-353 ρ (coverage) | gensim's evaluate_*: accuracy / ρ "
          "| training s | words/s |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {100 * r['analogy']:.2f}% ({r['analogy_correct']}/{r['analogy_counted']}; "
              f"{100 * r['analogy_coverage']:.1f}%) | {r['spearman']:.3f} ({100 * r['similarity_coverage']:.1f}%) "
              f"| {100 * r['gensim_eval']['analogy']:.2f}% / {r['gensim_eval']['spearman']:.3f} "
              f"| {r['seconds']:.0f} | {r['words_per_s']:,.0f} |")
    for label, r in rows.items():
        if label.startswith("lmforge"):
            theirs = rows[label.replace("lmforge", "gensim")]
            speed = r["words_per_s"] / theirs["words_per_s"]
            print(f"{label} - gensim: analogy {100 * (r['analogy'] - theirs['analogy']):+.2f} points, "
                  f"rho {r['spearman'] - theirs['spearman']:+.3f}, speed x{speed:.2f}")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
