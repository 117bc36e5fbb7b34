"""Retrieval: training lmforge's retrievers and evaluating any of them.

    lmforge retrieval train-biencoder --checkpoint ENCODER_RUN --dataset scifact --out RUN
    lmforge retrieval train-reranker  --checkpoint ENCODER_RUN --dataset scifact --out RUN
    lmforge retrieval eval --dataset squad|scifact|PATH --retriever bm25 [minilm biencoder:RUN ...]
                           [--rerank RUN [--rerank-depth 20]] [--max-queries N] [--k 1 5 20]
                           [--ndcg-k 10] [--mrr-k 10] [--out results.json]
    lmforge eval retrieval ...     the same command (an alias: main() rewrites it)

--dataset: `squad` is SQuAD v1.1 dev (questions -> their paragraphs, all 2067 paragraphs as the
corpus), `scifact` BEIR SciFact (test qrels), both from $LMFORGE_SHARED_DATA or ../shared/data; a
PATH is a BEIR-layout folder or a SQuAD-format JSON file (.json or .json.gz). Prints a markdown
table: recall@k, MRR@k, nDCG@k, queries per second and index build time per retriever. With
--rerank, every retriever also gets a row with its top --rerank-depth re-ordered by the re-ranker.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import positive_int
from lmforge.common import LmforgeError

RETRIEVERS = ("bm25", "minilm", "biencoder:RUN")


def retriever_name(text: str) -> str:
    if text in ("bm25", "minilm") or (text.startswith("biencoder:") and len(text) > len("biencoder:")):
        return text
    raise argparse.ArgumentTypeError(f"unknown retriever {text!r}: expected bm25, minilm or biencoder:RUN")


def cmd_train(args):
    from lmforge.cli.common import main_log, options_from_args, print_result, train_config
    from lmforge.stages.options import RetrieverOptions
    from lmforge.stages.retriever import train_retriever
    from lmforge.train.distributed import cleanup_distributed

    opts = options_from_args(RetrieverOptions, args, checkpoint=args.checkpoint, dataset=args.dataset)
    print_result(train_retriever(args.kind, opts, train_config(args), log=main_log()))
    cleanup_distributed()


def cmd_eval(args):
    from lmforge.retrieval.datasets import load_dataset, subsample
    from lmforge.retrieval.evaluate import evaluate_retriever, make_retriever, markdown_table, ranx_metrics
    from lmforge.retrieval.metrics import default_metrics

    metrics = default_metrics(sorted(set(args.k)), args.ndcg_k, args.mrr_k)
    dataset = subsample(load_dataset(args.dataset, args.split), args.max_queries)
    print(dataset.summary())
    results = []
    reranker = None
    if args.rerank:
        from lmforge.retrieval.biencoder import Reranker

        reranker = Reranker(args.rerank)
    runs = [(name, False) for name in dict.fromkeys(args.retriever)]  # in the order given, each once
    if reranker is not None:
        runs = [(name, rr) for name, _ in runs for rr in (False, True)]
    for name, rerank in runs:
        retriever = make_retriever(name, backend=args.backend, show_progress=not args.no_progress)
        if rerank:
            from lmforge.retrieval.biencoder import RerankedRetriever

            retriever = RerankedRetriever(retriever, reranker, args.rerank_depth)
        r = evaluate_retriever(retriever, dataset, metrics, show_progress=not args.no_progress)
        if args.check_ranx:
            try:
                reference = ranx_metrics(r["run"], dataset.qrels, metrics)
            except ImportError:
                raise LmforgeError("--check-ranx needs ranx: pip install ranx") from None
            r["ranx_max_abs_diff"] = max(abs(reference[m] - r["metrics"][m]) for m in metrics)
        print(f"{r['description']}: index {r['index_seconds']:.1f} s, {r['queries_per_second']:.1f} queries/s"
              + (f", max |ours - ranx| = {r['ranx_max_abs_diff']:.2e}" if args.check_ranx else ""))
        results.append(r)
    print()
    print(markdown_table(results, metrics))
    if args.out:
        out = Path(args.out)
        if out.parent != Path("."):
            out.parent.mkdir(parents=True, exist_ok=True)
        keep = [{k: v for k, v in r.items() if k != "run" or args.save_run} for r in results]
        out.write_text(json.dumps({"dataset": dataset.name, "metrics": metrics, "results": keep}, indent=1) + "\n")
        print(f"wrote {out}")


def add_commands(sub):
    p = sub.add_parser("retrieval", help="retrieval evaluation: BM25 and dense retrievers on SQuAD / BEIR")
    rsub = p.add_subparsers(dest="retrieval_command", metavar="ACTION")
    e = rsub.add_parser("eval", help="recall@k, MRR, nDCG, queries/s and index build time (alias: lmforge eval "
                                     "retrieval)")
    e.add_argument("--dataset", required=True, metavar="squad|scifact|PATH",
                   help="squad (SQuAD v1.1 dev), scifact (BEIR SciFact) from $LMFORGE_SHARED_DATA or ../shared/data, "
                        "or a BEIR-layout folder / SQuAD-format .json[.gz] file")
    e.add_argument("--split", default="test", help="the BEIR qrels split (qrels/SPLIT.tsv; default test); SQuAD: "
                   "test/all (every question), train or heldout (even / odd-numbered articles' questions)")
    e.add_argument("--retriever", nargs="+", default=["bm25"], type=retriever_name, metavar="|".join(RETRIEVERS),
                   help="one or more, each a row of the table (default bm25); minilm = all-MiniLM-L6-v2; "
                        "biencoder:RUN = a `lmforge retrieval train-biencoder` run")
    e.add_argument("--rerank", metavar="RUN", help="a `lmforge retrieval train-reranker` run: adds a row per "
                   "retriever with its top --rerank-depth re-ranked")
    e.add_argument("--rerank-depth", type=positive_int, default=20, help="documents re-ranked per query (default 20)")
    e.add_argument("--backend", default="auto", choices=("auto", "numpy", "faiss"),
                   help="exact search of the dense retriever (auto: faiss when installed)")
    e.add_argument("--max-queries", type=positive_int, default=None, metavar="N",
                   help="a deterministic sample of N queries (by a hash of their ids); default all")
    e.add_argument("--k", type=positive_int, nargs="+", default=[1, 5, 20], help="recall@k cut-offs (default 1 5 20)")
    e.add_argument("--ndcg-k", type=positive_int, default=10, help="nDCG cut-off (default 10)")
    e.add_argument("--mrr-k", type=positive_int, default=10, help="MRR cut-off (default 10)")
    e.add_argument("--check-ranx", action="store_true", help="also compute the metrics with ranx and print the "
                                                             "largest difference")
    e.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON")
    e.add_argument("--save-run", action="store_true", help="with --out: include the run (top documents per query)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    from lmforge.cli.common import add_options, add_train_args
    from lmforge.stages import options

    for kind, action, text in (
            ("biencoder", "train-biencoder", "train a bi-encoder from an encoder run: InfoNCE with in-batch and "
                                             "BM25-mined hard negatives"),
            ("cross-encoder", "train-reranker", "train a cross-encoder re-ranker from an encoder run: listwise "
                                                "over each query's positive and hard negatives")):
        t = rsub.add_parser(action, help=text)
        t.add_argument("--checkpoint", required=True,
                       help="the encoder to start from (lmforge pretrain --arch encoder)")
        t.add_argument("--dataset", required=True, metavar="squad|scifact|PATH",
                       help="training judgements: as for eval (with --split, default train)")
        defaults = options.RERANKER_DEFAULTS if kind == "cross-encoder" else {}
        add_options(add_train_args(t, defaults=options.RETRIEVER_TRAIN_DEFAULTS), options.RetrieverOptions,
                    [f for f in ("split", "batch_size", "hard_negatives", "query_len", "passage_len", "temperature",
                                 "val_fraction", "max_val", "resume") if kind == "biencoder" or f != "temperature"],
                    defaults=defaults)
        t.set_defaults(func=cmd_train, kind=kind)
