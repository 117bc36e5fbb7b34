"""Retrieval-augmented answering on SQuAD: the fine-tuning data and the evaluation (lmforge/rag.py).

    lmforge rag-sft-data --squad FILE --out rag.jsonl [--split train] [--k 4] [--refusal-share 0.2]
                         [--distractors bm25|random] [--passages-in tool|inline] [--seed 0]
    lmforge rag-eval --checkpoint RUN [--squad FILE] [--index INDEX] [--max-questions N]
                     [--mode none retrieval gold] [--k 5] [--out results.json]

rag-sft-data writes conversations for `lmforge sft --data rag.jsonl` (mix it with other sources
there: `--data rag.jsonl*0.5`). rag-eval answers held-out questions greedily with no passages, with
the passages retrieved (from INDEX, or by default BM25 over the file's paragraphs) and with the gold
paragraph alone (the ceiling), and prints exact match and F1 per mode. --squad defaults to SQuAD
v1.1 dev from $LMFORGE_SHARED_DATA (or ../shared/data).
"""
from __future__ import annotations

import json
from pathlib import Path

from lmforge.cli.common import checked, nonneg_int, positive_int


def _squad_path(arg) -> Path:
    from lmforge.common import LmforgeError
    from lmforge.retrieval.datasets import NAMED, shared_data

    path = Path(arg) if arg else shared_data() / NAMED["squad"]
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file (give --squad FILE, SQuAD v1.1 JSON, or set LMFORGE_SHARED_DATA)")
    return path


def cmd_rag_sft_data(args):
    from lmforge.posttrain.conversations import write_jsonl
    from lmforge.rag import REFUSAL, squad_rag_conversations

    fit = None
    if args.fit_to:
        from lmforge.models.protocol import tokens_left
        from lmforge.train.checkpoint import checkpoint_shapes, load_checkpoint_tokenizer

        _, _, shapes = checkpoint_shapes(args.fit_to)
        fit = (load_checkpoint_tokenizer(args.fit_to), tokens_left(shapes, 0))
    convs = squad_rag_conversations(_squad_path(args.squad), split=args.split, k=args.k,
                                    refusal_share=args.refusal_share, distractors=args.distractors,
                                    style=args.passages_in, seed=args.seed, max_examples=args.max_examples, fit=fit)
    path = write_jsonl(args.out, convs)
    refusals = sum(c[-1]["content"] == REFUSAL for c in convs)
    print(f"wrote {len(convs)} conversations ({refusals} answered with the refusal) from the {args.split} "
          f"articles to {path}")


def cmd_rag_eval(args):
    from lmforge.rag import (
        SquadBM25,
        evaluate_answers,
        load_index,
        load_squad_questions,
        results_table,
        sample_questions,
    )
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    squad = _squad_path(args.squad)
    questions, paragraphs = load_squad_questions(squad, args.split)
    questions = sample_questions(questions, args.max_questions)
    modes = list(dict.fromkeys(args.mode))
    retriever = None
    if "retrieval" in modes:
        retriever = load_index(args.index) if args.index else SquadBM25(paragraphs)
    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    where = args.index or "BM25 over the file's paragraphs"
    print(f"{len(questions)} {args.split} questions of {squad.name}; retrieval: {where}, k={args.k}")
    results = evaluate_answers(model, tok, questions, modes=modes, retriever=retriever, k=args.k,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               progress=not args.no_progress, examples=args.examples)
    print(results_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "squad": str(squad), "split": args.split,
                                   "retrieval": where, "k": args.k, "modes": results}, indent=1) + "\n")
        print(f"wrote {out}")


def add_commands(sub) -> None:
    from lmforge.rag import MODES

    d = sub.add_parser("rag-sft-data", help="SFT conversations for answering from retrieved passages (SQuAD)")
    d.add_argument("--squad", default=None, metavar="FILE", help="SQuAD v1.1 JSON (.json or .json.gz); "
                   "default: the dev set in $LMFORGE_SHARED_DATA")
    d.add_argument("--out", required=True, metavar="FILE.jsonl")
    d.add_argument("--split", choices=["train", "heldout", "all"], default="train",
                   help="articles to use: train (even-numbered, the default), heldout (odd) or all")
    d.add_argument("--k", type=positive_int, default=4, help="passages per question (default 4)")
    d.add_argument("--refusal-share", type=checked(float, lambda v: 0 <= v <= 1, "a share from 0 to 1"), default=0.2,
                   help="share of questions shown without their paragraph, answered with the refusal (default 0.2)")
    d.add_argument("--distractors", choices=["bm25", "random"], default="bm25",
                   help="the other passages: the question's BM25 neighbours (default) or random paragraphs")
    d.add_argument("--passages-in", choices=["tool", "inline"], default="tool",
                   help="tool: a tool-result block (lmforge's chat template, the default); inline: in the user's "
                        "message (for a model imported with its own template)")
    d.add_argument("--seed", type=nonneg_int, default=0)
    d.add_argument("--max-examples", type=positive_int, default=None)
    d.add_argument("--fit-to", metavar="RUN", default=None,
                   help="the run to be fine-tuned: fit each conversation into its context window with its tokenizer, "
                        "as chat and the server do (passages dropped or shortened; an answer whose passage would "
                        "lose it is left out)")
    d.set_defaults(func=cmd_rag_sft_data)

    e = sub.add_parser("rag-eval", help="SQuAD exact match and F1 with no passages, retrieved ones and the gold one")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--squad", default=None, metavar="FILE", help="SQuAD v1.1 JSON; default: the dev set in "
                   "$LMFORGE_SHARED_DATA")
    e.add_argument("--index", default=None, metavar="INDEX",
                   help="retrieve from this index (lmforge rag index); default: BM25 over the file's paragraphs")
    e.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                   help="whose questions: heldout (odd-numbered articles, never in rag-sft-data's default), "
                        "train or all")
    e.add_argument("--max-questions", type=positive_int, default=200,
                   help="a fixed sample of this many questions (default 200)")
    e.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    e.add_argument("--k", type=positive_int, default=5, help="passages retrieved per question (default 5)")
    e.add_argument("--max-new-tokens", type=positive_int, default=32)
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--examples", type=nonneg_int, default=3, help="replies per mode kept in --out")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="write the results as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_rag_eval)
