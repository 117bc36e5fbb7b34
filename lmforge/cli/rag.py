"""Retrieval-augmented generation, the index side:

    lmforge rag index DOCS... --out INDEX [--encoder bm25|minilm|PATH] [--chunk-chars 1000] [--overlap 200]
                                          [--add | --overwrite]
    lmforge rag search INDEX "query" [--k 5] [--json]

DOCS are .txt / .md files, .jsonl[.gz] files of {"id", "title", "text"} records (BEIR's corpus.jsonl
works), or folders of them (recursive). `--add` embeds only new or changed documents into an existing
index with the encoder it was built with. The format, the chunking rules and what a model mismatch
means are in docs/rag.md#index and lmforge/retrieval/index.py.
"""
from __future__ import annotations

import time
from pathlib import Path

from lmforge.cli.common import nonneg_int, positive_int
from lmforge.common import LmforgeError


def cmd_index(args):
    from lmforge.retrieval.chunking import DEFAULT_CHUNK_CHARS, DEFAULT_OVERLAP
    from lmforge.retrieval.index import RagIndex

    out = Path(args.out)
    t0 = time.perf_counter()
    progress = not args.no_progress
    if args.add and (out / "index.json").is_file():
        index = RagIndex.load(out, encoder=args.encoder, show_progress=progress)
        for option, asked, stored in (("--chunk-chars", args.chunk_chars, index.chunk_chars),
                                      ("--overlap", args.overlap, index.overlap)):
            if asked is not None and asked != stored:
                raise LmforgeError(f"{out} was built with {option} {stored}; --add keeps the index's chunking "
                                   f"(got {option} {asked}); rebuild with --overwrite to change it")
        s = index.add(args.docs, show_progress=progress)
        print(f"{out}: added {s['documents_added']} documents, replaced {s['documents_replaced']}, unchanged "
              f"{s['documents_unchanged']}; +{s['chunks_added']} -{s['chunks_removed']} chunks; now "
              f"{len(index.documents)} documents, {len(index)} chunks; {time.perf_counter() - t0:.1f} s")
        return
    index = RagIndex.build(args.docs, out, encoder=args.encoder or "minilm",
                           chunk_chars=args.chunk_chars or DEFAULT_CHUNK_CHARS,
                           overlap=DEFAULT_OVERLAP if args.overlap is None else args.overlap,
                           show_progress=progress, overwrite=args.overwrite or args.add)
    print(f"{out}: {len(index.documents)} documents, {len(index)} chunks, {time.perf_counter() - t0:.1f} s "
          f"(encoder {index.encoder.name})")


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if limit == 0 or len(text) <= limit else text[:limit - 1] + "…"


def cmd_search(args):
    import dataclasses
    import json

    from lmforge.retrieval.index import RagIndex

    index = RagIndex.load(args.index, backend=args.backend)
    passages = index.search(args.query, k=args.k)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(p), "cite": p.cite()} for p in passages], ensure_ascii=False,
                         indent=1))
        return
    if not passages:
        print("no passage matches")
    for rank, p in enumerate(passages, 1):
        title = f"  ({p.title})" if p.title else ""
        print(f"{rank}. {p.score:.4f}  {p.cite()}  chunk {p.chunk}{title}")
        print(f"   {_one_line(p.text, args.chars)}")


def add_commands(sub):
    p = sub.add_parser("rag", help="retrieval-augmented generation: build and search a passage index")
    rsub = p.add_subparsers(dest="rag_command", metavar="ACTION")

    i = rsub.add_parser("index", help="chunk and embed documents into an index folder (or --add to one)")
    i.add_argument("docs", nargs="+", metavar="DOCS",
                   help=".txt/.md files, .jsonl[.gz] files of {id, title, text} records, or folders of them")
    i.add_argument("--out", required=True, metavar="INDEX", help="the index folder")
    i.add_argument("--encoder", default=None, metavar="bm25|minilm|PATH",
                   help="bm25 (sparse), minilm (all-MiniLM-L6-v2), an lmforge bi-encoder folder or a "
                        "sentence-transformers model folder (default minilm; with --add: the index's)")
    i.add_argument("--chunk-chars", type=positive_int, default=None, metavar="N",
                   help="chunk size in characters (default 1000)")
    i.add_argument("--overlap", type=nonneg_int, default=None, metavar="N",
                   help="characters shared by neighbouring chunks (default 200)")
    how = i.add_mutually_exclusive_group()
    how.add_argument("--add", action="store_true",
                     help="add to the index at --out (new or changed documents only; created when absent)")
    how.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_index)

    s = rsub.add_parser("search", help="the passages of an index nearest to a query")
    s.add_argument("index", metavar="INDEX", help="an index folder written by `lmforge rag index`")
    s.add_argument("query")
    s.add_argument("--k", "-k", type=positive_int, default=5, help="how many passages (default 5)")
    s.add_argument("--json", action="store_true", help="print the passages as JSON (text, source, offsets, score)")
    s.add_argument("--chars", type=nonneg_int, default=300, metavar="N",
                   help="show the first N characters of each passage (0: all; default 300)")
    s.add_argument("--backend", default="auto", choices=("auto", "numpy", "faiss"),
                   help="exact search of a dense index (auto: faiss when installed)")
    s.set_defaults(func=cmd_search)
