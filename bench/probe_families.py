"""One row of bench/families.py's setup at a time: the 300-second probes that chose its
vocabulary and regularisation (docs/benchmarks.md, "Probes of a third session").

Same split, same BPE training on the training text, same whole-split validation as the full
table; one `pretrain()` call per invocation, one JSON line printed (final and best validation
bits per character, steps, tokens, the last points of the curve).

    python bench/probe_families.py --vocab 1024 --over '{"dropout": 0.2}' \
        --train '{"compile": "on", "weight_decay": 0.2}'
    python bench/probe_families.py --vocab 1024 --model lstm --over '{"dropout": 0.2}' \
        --train '{"compile": "off", "lr": 6e-3, "muon_lr": 0.04, "weight_decay": 0.1}'
    python bench/probe_families.py --corpus stdlib --vocab 4096 --model lstm \
        --over '{"n_hidden": 256, "n_embd": 256, "tie_embeddings": true}' --train '{"compile": "off"}'
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from families import curve, prepare_corpus  # noqa: E402

from lmforge.stages.pretrain import PretrainOptions, pretrain  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402

TOKENIZER_CHARS = 20_000_000  # bench/families.py's --tokenizer-chars default


def json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["shakespeare", "stdlib"], default="shakespeare")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE ids (256: the byte-level shards)")
    ap.add_argument("--model", default="transformer", help="model family")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--over", type=json_arg, default={}, help="model config overrides, a JSON object")
    ap.add_argument("--train", type=json_arg, default={}, help="TrainConfig fields, a JSON object")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds")
    ap.add_argument("--every", type=int, default=150, help="steps between evaluations")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "probe_families"))
    args = ap.parse_args()

    out = Path(args.out) / args.corpus
    out.mkdir(parents=True, exist_ok=True)
    kind = "bytes" if args.vocab == 256 else "bpe"
    prep = out / f"vocab{args.vocab}"  # prepared once per corpus and vocabulary, exactly as the full table does
    data = prep / f"data_{kind}"
    if not (prep / "ready").exists():
        prep.mkdir(exist_ok=True)
        prepare_corpus(args.corpus, args.vocab, TOKENIZER_CHARS, prep)
        (prep / "ready").touch()
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    cfg = TrainConfig(out_dir=str(run), max_steps=10**9, time_budget=args.budget, eval_every=args.every,
                      ckpt_every=0, log_every=10, progress=False, **args.train)
    res = pretrain(PretrainOptions(data_dir=str(data), model=args.model, preset=args.preset,
                                   model_overrides=args.over, batch_size=args.batch, eval_tokens=10**9), cfg)
    points = curve(run)
    final = res.get("val_bpb", res.get("val_bpb_bound"))  # a masked diffusion model reports its bound
    print(json.dumps({"val_bpb": final, "best": min((b for _, b in points), default=None),
                      "steps": res.get("step"), "tokens": res["tokens"], "seconds": res["train_time"],
                      "curve": points[-6:]}))


if __name__ == "__main__":
    main()
