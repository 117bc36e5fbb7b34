"""Train lmforge's own retrievers for bench/retrieval.py, every step an `lmforge` command (printed
before it runs; a step whose output exists is skipped, so an interrupted run continues):

  1. a byte-level BPE tokenizer (8,192 ids) and shards from the retrieval corpora's text: the 2,067
     SQuAD dev paragraphs, the 5,183 SciFact abstracts and WikiText-2 validation (10.5 M characters).
     The encoder reads the documents it will later retrieve (no query, no judgement): unsupervised
     adaptation to the corpus, as BM25 reads the corpus for its document frequencies;
  2. an encoder (`cpu` preset, 7.2 M parameters) pretrained by masked language modelling
     (30% of tokens chosen) for --encoder-seconds;
  3. per collection, a bi-encoder from the encoder on its training judgements (SQuAD: the questions of
     the even-numbered articles; SciFact: qrels/train.tsv), InfoNCE with in-batch and one BM25 hard
     negative per query, for --stage-seconds;
  4. per collection, a cross-encoder re-ranker from that bi-encoder (its pooled representation
     already separates relevant passages), listwise over each query's positive and 7 hard negatives,
     for --stage-seconds.

Every stage is wall-clock budgeted (the learning-rate schedule follows the clock), so the numbers
depend on the machine; the settings are in STAGES. Data: $LMFORGE_SHARED_DATA or ../shared/data.

    python bench/retrieval_models.py [--out bench/out/retrieval-models] [--encoder-seconds 1200]
                                     [--stage-seconds 720]
then
    python bench/retrieval.py --models bench/out/retrieval-models
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.retrieval.datasets import load_dataset, shared_data  # noqa: E402

COLLECTIONS = ("squad", "scifact")
BIENCODER = ["--passage-len", "128", "--query-len", "48", "--batch-size", "16", "--hard-negatives", "1",
             "--lr", "3e-4"]
RERANKER = ["--passage-len", "192", "--query-len", "48", "--batch-size", "4", "--hard-negatives", "7",
            "--lr", "1e-4"]


def run(argv: list[str], out: Path, step: str) -> None:
    done = out / f".done-{step}"
    if done.exists():
        print(f"skip (done before): {step}", flush=True)
        return
    print("$ lmforge " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "lmforge", *argv], check=True)
    done.touch()


def write_corpus(path: Path) -> None:
    if path.exists():
        return
    with open(path, "w", encoding="utf-8") as out:
        for name in COLLECTIONS:
            for doc in load_dataset(name).corpus.values():
                out.write(doc.full_text() + "\n\n")
        out.write((shared_data() / "eval" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "retrieval-models"))
    p.add_argument("--encoder-seconds", type=float, default=1200)
    p.add_argument("--stage-seconds", type=float, default=720)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    write_corpus(corpus)
    common = ["--no-progress", "--eval-every", "100", "--ckpt-every", "100", "--max-steps", "100000"]
    run(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "8192", "--out", str(out / "tok.json"),
         "--no-progress"], out, "tokenizer")
    run(["data", "prepare", "--data", str(corpus), "--tokenizer", str(out / "tok.json"), "--out", str(out / "data"),
         "--no-progress"], out, "data")
    run(["pretrain", "--arch", "encoder", "--model", "cpu", "--data-dir", str(out / "data"), "--out",
         str(out / "encoder"), "--time-budget", str(args.encoder_seconds), "--batch-size", "16", "--seq-len", "256",
         "--set", "mask_prob=0.3", "--no-progress", "--eval-every", "500", "--ckpt-every", "500", "--max-steps",
         "100000"], out, "encoder")
    for name in COLLECTIONS:
        run(["retrieval", "train-biencoder", "--checkpoint", str(out / "encoder"), "--dataset", name,
             "--out", str(out / f"biencoder-{name}"), "--time-budget", str(args.stage_seconds), *BIENCODER, *common],
            out, f"biencoder-{name}")
    for name in COLLECTIONS:
        run(["retrieval", "train-reranker", "--checkpoint", str(out / f"biencoder-{name}"), "--dataset", name,
             "--out", str(out / f"reranker-{name}"), "--time-budget", str(args.stage_seconds), *RERANKER, *common],
            out, f"reranker-{name}")


if __name__ == "__main__":
    main()
