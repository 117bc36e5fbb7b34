"""The `lmforge` command line, one module per command group, in pipeline order:

    lmforge speedrun                          every stage in order (cli/speedrun.py)
    lmforge tokenizer train|encode|decode|export-hf, data prepare        (cli/data.py)
    lmforge pretrain                          any model family, under torchrun too (cli/pretrain.py)
    lmforge scaling sweep|fit|predict         IsoFLOP sweeps and Chinchilla fits (cli/scaling.py)
    lmforge sft | lora merge | synthetic | tool                          (cli/posttrain.py)
    lmforge reward train|score | dpo | grpo | ppo                        (cli/align.py)
    lmforge sample | generate | chat | score  text from a checkpoint      (cli/generate.py)
    lmforge eval | judge | report-card                                   (cli/evaluate.py)
    lmforge serve                             OpenAI-compatible API and chat page (cli/serve.py)
    lmforge export | import | quantize        Hugging Face / ARPA interop, int8/int4 (cli/interop.py)
    lmforge embed word2vec|neighbors|analogy|eval|export   word vectors (cli/embed.py)
    lmforge retrieval eval (alias: eval retrieval)   BM25 / dense retrieval metrics (cli/retrieval.py)
    lmforge rag-sft-data | rag-eval           answering from retrieved passages: SFT data, EM/F1 (cli/rag_eval.py)
    lmforge rag index|search                  build and search a RAG passage index (cli/rag.py)

The modules share argument types and option groups through cli/common.py and never import each
other; each imports heavy libraries only inside its command handlers, so `lmforge --help` stays fast.
Errors caused by input (missing files, mismatched tokenizer, bad option values) print one line
starting with `error:` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from lmforge.cli import (
    align,
    data,
    embed,
    evaluate,
    generate,
    interop,
    posttrain,
    pretrain,
    rag,
    rag_eval,
    retrieval,
    scaling,
    serve,
    speedrun,
)
from lmforge.common import LmforgeError

COMMAND_GROUPS = (speedrun, data, pretrain, scaling, posttrain, align, generate, evaluate, serve, interop, embed,
                  retrieval, rag, rag_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge",
                                description="A hackable LLM stack: every stage of building a language model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "retrieval"]:  # `lmforge eval retrieval ...` is `lmforge retrieval eval ...`
        argv = ["retrieval", "eval", *argv[2:]]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `lmforge` or `lmforge tokenizer` without an action: show the relevant help, fail.
        try:
            parser.parse_args(argv + ["--help"])
        except SystemExit:
            pass
        return 2
    try:
        args.func(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output folder, a folder where a file should be, disk full...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
