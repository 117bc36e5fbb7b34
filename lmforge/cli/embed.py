"""Word embeddings: train word2vec, ask the vectors questions, evaluate them.

    lmforge embed word2vec --data corpus.txt --out runs/w2v [--sg | --cbow] [--dim 100 --window 5 ...]
    lmforge embed neighbors runs/w2v king [-k 10]
    lmforge embed analogy runs/w2v man king woman [-k 10]      man is to king as woman is to ?
    lmforge embed eval runs/w2v [--analogies FILE] [--similarity FILE]
    lmforge embed export runs/w2v vectors.txt                  the word2vec text format

VECTORS (the first argument of the queries) is a folder written by `lmforge embed word2vec` or a
file in the word2vec text format.
"""
from __future__ import annotations

from pathlib import Path

from lmforge.cli.common import add_options, options_from_args, positive_int
from lmforge.common import LmforgeError

VECTORS_HELP = "a folder written by `lmforge embed word2vec`, or a word2vec text-format file"


def load_vectors(path: str):
    from lmforge.embed.word2vec import Word2Vec, read_word2vec_text

    p = Path(path)
    if p.is_file():
        return read_word2vec_text(p)
    return Word2Vec.load(p).wv


def cmd_word2vec(args):
    from lmforge.embed.config import CorpusOptions, Word2VecConfig
    from lmforge.embed.word2vec import read_sentences, summary, train_word2vec

    cfg = options_from_args(Word2VecConfig, args)
    corpus_options = options_from_args(CorpusOptions, args)
    model, _ = train_word2vec(read_sentences(args.data, corpus_options), cfg)
    out = model.save(args.out)
    print(f"{cfg.model}: {summary(model)}")
    print(f"saved to {out}/ (vectors.safetensors, vocab.json)")


def _print_words(rows):
    width = max((len(w) for w, _ in rows), default=0)
    for word, score in rows:
        print(f"{word:<{width}}  {score:.4f}")


def cmd_neighbors(args):
    _print_words(load_vectors(args.vectors).neighbors(args.word, args.k))


def cmd_analogy(args):
    _print_words(load_vectors(args.vectors).analogy(args.a, args.b, args.c, args.k))


def cmd_eval(args):
    import json

    from lmforge.embed import evaluate as ev

    analogies, similarity = args.analogies, args.similarity
    if analogies is None and similarity is None:
        folder = ev.default_eval_dir()
        analogies, similarity = folder / ev.ANALOGY_FILE, folder / ev.SIMILARITY_FILE
        if not analogies.is_file() or not similarity.is_file():
            raise LmforgeError(f"no {ev.ANALOGY_FILE} and {ev.SIMILARITY_FILE} in {folder}; give --analogies FILE "
                               "and/or --similarity FILE, or set LMFORGE_SHARED_DATA to a folder with word-eval/")
    wv = load_vectors(args.vectors)
    results = {}
    if analogies is not None:
        r = ev.evaluate_analogies(wv, analogies, restrict_vocab=args.restrict_vocab)
        results["analogies"] = {"file": str(analogies), **r}
        print(f"analogies ({Path(analogies).name}): accuracy {100 * r['accuracy']:.2f}% "
              f"({r['correct']}/{r['counted']}), coverage {100 * r['coverage']:.1f}% of {r['questions']} questions")
        if args.sections:
            for s in r["sections"]:
                print(f"  {s['section']:<28} {100 * s['accuracy']:6.2f}% ({s['correct']}/{s['counted']} "
                      f"of {s['questions']})")
    if similarity is not None:
        r = ev.evaluate_word_pairs(wv, similarity, restrict_vocab=args.restrict_vocab)
        results["similarity"] = {"file": str(similarity), **r}
        print(f"similarity ({Path(similarity).name}): Spearman {r['spearman']:.4f}, Pearson {r['pearson']:.4f}, "
              f"coverage {100 * r['coverage']:.1f}% ({r['counted']}/{r['pairs']} pairs)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


def cmd_export(args):
    from lmforge.embed.word2vec import Word2Vec

    out = Word2Vec.load(args.vectors).export_text(args.out)
    print(f"wrote {out}")


def add_commands(sub):
    from lmforge.embed.config import CorpusOptions, Word2VecConfig

    p = sub.add_parser("embed", help="word embeddings: train word2vec, nearest neighbours, analogies, evaluation")
    esub = p.add_subparsers(dest="embed_command", metavar="ACTION")

    w = esub.add_parser("word2vec", help="train word2vec (skip-gram or CBOW with negative sampling)")
    w.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="text files (.txt, .txt.gz), .jsonl[.gz]/.json/.parquet (field --text-field), folders, globs")
    w.add_argument("--out", required=True, metavar="DIR", help="output folder (vectors.safetensors, vocab.json)")
    g = w.add_argument_group("word2vec")
    add_options(g, Word2VecConfig)
    g.add_argument("--sg", dest="model", action="store_const", const="sg", help="skip-gram: same as --model sg")
    g.add_argument("--cbow", dest="model", action="store_const", const="cbow", help="CBOW: same as --model cbow")
    add_options(w.add_argument_group("data"), CorpusOptions)
    w.set_defaults(func=cmd_word2vec)

    n = esub.add_parser("neighbors", help="the words nearest to a word (cosine similarity)")
    n.add_argument("vectors", help=VECTORS_HELP)
    n.add_argument("word")
    n.add_argument("-k", type=positive_int, default=10, help="how many (default 10)")
    n.set_defaults(func=cmd_neighbors)

    a = esub.add_parser("analogy", help="a is to b as c is to ? (the words nearest to b - a + c)")
    a.add_argument("vectors", help=VECTORS_HELP)
    a.add_argument("a")
    a.add_argument("b")
    a.add_argument("c")
    a.add_argument("-k", type=positive_int, default=10, help="how many answers (default 10)")
    a.set_defaults(func=cmd_analogy)

    e = esub.add_parser("eval", help="Google analogy accuracy and word-similarity Spearman correlation")
    e.add_argument("vectors", help=VECTORS_HELP)
    e.add_argument("--analogies", default=None, metavar="FILE",
                   help="questions-words.txt format; without --analogies and --similarity both default to "
                        "word-eval/ of $LMFORGE_SHARED_DATA or ../shared/data")
    e.add_argument("--similarity", default=None, metavar="FILE", help="word pairs with scores (wordsim353.tsv format)")
    e.add_argument("--restrict-vocab", type=positive_int, default=300_000,
                   help="only the most frequent N words are asked and answered (default 300000, gensim's)")
    e.add_argument("--sections", action="store_true", help="analogy accuracy per section")
    e.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON")
    e.set_defaults(func=cmd_eval)

    x = esub.add_parser("export", help="write the vectors in the word2vec text format")
    x.add_argument("vectors", help="a folder written by `lmforge embed word2vec`")
    x.add_argument("out", metavar="FILE")
    x.set_defaults(func=cmd_export)
