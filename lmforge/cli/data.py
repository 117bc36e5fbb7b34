"""Tokenizer and data commands: the first two stages of the pipeline.

    lmforge tokenizer train --data SOURCE --vocab-size 4096 --out tok.json
    lmforge tokenizer encode|decode --tokenizer tok.json ...  |  export-hf --tokenizer tok.json DIR
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

    d = sub.add_parser("data", help="prepare tokenized shards")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
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
