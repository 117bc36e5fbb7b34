"""Tokenizer and data commands: the first two stages of the pipeline.

    lmforge tokenizer train --data SOURCE --vocab-size 4096 --out tok.json
    lmforge tokenizer encode|decode --tokenizer tok.json ...  |  export-hf --tokenizer tok.json DIR
    lmforge data curate RAW... --out curated/ [--config curate.toml] [--shard i/n]
    lmforge data prepare --data SOURCE --tokenizer tok.json --out data/
"""
from __future__ import annotations

import sys
from pathlib import Path

from lmforge.cli.common import fraction, positive_int, read_text_arg
from lmforge.common import LmforgeError

SOURCE_HELP = "file, folder, glob or HF dataset name (default: Python stdlib)"


def cmd_tokenizer_train(args):
    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import Tokenizer

    docs = iter_documents(args.data, text_field=args.text_field, max_chars=args.max_chars)
    tok = Tokenizer.train(docs, args.vocab_size, show_progress=not args.no_progress)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} ids ({tok.n_merges} merges) -> {args.out}")


def cmd_tokenizer_encode(args):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(" ".join(map(str, tok.encode(read_text_arg(args.text)))))


def cmd_tokenizer_decode(args):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = " ".join(args.ids) if args.ids else read_text_arg(None)
    try:
        ids = [int(t) for t in raw.replace(",", " ").split()]
    except ValueError:
        raise LmforgeError("decode expects integer token ids separated by spaces or commas") from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise LmforgeError(f"token ids out of range 0..{tok.vocab_size - 1}: {bad[:5]}")
    sys.stdout.write(tok.decode(ids) + "\n")


def cmd_tokenizer_export_hf(args):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.export_hf(out / "tokenizer.json")
    print(f"wrote {out / 'tokenizer.json'}")


def cmd_data_prepare(args):
    from lmforge.data.prepare import prepare_shards

    m = prepare_shards(args.data, args.tokenizer, args.out, val_fraction=args.val_fraction,
                       text_field=args.text_field, max_chars=args.max_chars, workers=args.workers,
                       show_progress=not args.no_progress)
    splits = ", ".join(f"{k}: {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in m["splits"].items())
    print(f"shards in {args.out} ({splits})")


def cmd_data_curate(args):
    from lmforge.curate.config import config_toml, load_config
    from lmforge.curate.pipeline import curate, parse_shard

    cfg = load_config(args.config)
    if args.print_config:
        sys.stdout.write(config_toml(cfg))
        return
    if not args.inputs or not args.out:
        raise LmforgeError("data curate needs input files and --out DIR (or --print-config)")
    if args.reference:
        cfg.quality_model.reference = tuple(args.reference)
        cfg.quality_model.enabled = True
    shard = parse_shard(args.shard) if args.shard else None
    s = curate(args.inputs, args.out, cfg, workers=args.workers, shard=shard, show_progress=not args.no_progress)
    if not s.finished:
        print(f"{s.tasks_done} of {s.tasks} input files curated in {s.out}; once every shard has run, run the "
              f"same command without --shard to deduplicate, score and write the report")
        return
    print(f"curated: {s.docs_out:,} documents, {s.bytes_out / 1e6:,.2f} MB in {s.out / 'curated'} "
          f"(report: {s.out / 'report.md'})")


def add_commands(sub) -> None:
    t = sub.add_parser("tokenizer", help="train and use byte-level BPE tokenizers")
    tsub = t.add_subparsers(dest="tok_command", metavar="ACTION")
    tt = tsub.add_parser("train", help="train a tokenizer")
    tt.add_argument("--data", default=None, help=SOURCE_HELP)
    tt.add_argument("--vocab-size", type=positive_int, default=4096, help="total ids including 256 bytes and specials")
    tt.add_argument("--out", required=True)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--max-chars", type=positive_int, default=20_000_000)
    tt.add_argument("--no-progress", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)
    te = tsub.add_parser("encode", help="print token ids of a text (argument or stdin)")
    te.add_argument("--tokenizer", required=True)
    te.add_argument("text", nargs="?")
    te.set_defaults(func=cmd_tokenizer_encode)
    td = tsub.add_parser("decode", help="print the text of token ids (arguments or stdin)")
    td.add_argument("--tokenizer", required=True)
    td.add_argument("ids", nargs="*")
    td.set_defaults(func=cmd_tokenizer_decode)
    tx = tsub.add_parser("export-hf", help="write a Hugging Face tokenizer.json")
    tx.add_argument("--tokenizer", required=True)
    tx.add_argument("out_dir")
    tx.set_defaults(func=cmd_tokenizer_export_hf)

    d = sub.add_parser("data", help="curate raw web text and prepare tokenized shards")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dc = dsub.add_parser("curate", help="extract, filter, deduplicate and score raw web text, with a report")
    dc.add_argument("inputs", nargs="*", help="HTML, WARC, WET, jsonl(.gz) or txt files, folders or globs")
    dc.add_argument("--out", help="output folder (curated/part-*.jsonl, report.md); a re-run resumes")
    dc.add_argument("--config", help="TOML file overriding the defaults (see --print-config)")
    dc.add_argument("--print-config", action="store_true", help="print the settings as TOML and exit")
    dc.add_argument("--reference", nargs="+", help="reference text for the quality model (turns it on)")
    dc.add_argument("--workers", type=positive_int, default=None, help="processes (default: one per core)")
    dc.add_argument("--shard", help="i/n: run only every n-th input file starting at i (e.g. a Slurm array)")
    dc.add_argument("--no-progress", action="store_true")
    dc.set_defaults(func=cmd_data_curate)
    dp = dsub.add_parser("prepare", help="tokenize a corpus into binary shards with a manifest")
    dp.add_argument("--data", default=None, help=SOURCE_HELP)
    dp.add_argument("--tokenizer", required=True)
    dp.add_argument("--out", required=True)
    dp.add_argument("--val-fraction", type=fraction, default=0.05)
    dp.add_argument("--text-field", default="text")
    dp.add_argument("--max-chars", type=positive_int, default=None)
    dp.add_argument("--workers", type=positive_int, default=None)
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=cmd_data_prepare)
