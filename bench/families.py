"""Benchmark: every model family on one table — validation bits per byte against wall-clock seconds.

Two corpora, each split once and shared by every row:
  * tinyshakespeare, nanoGPT's split (first 90% of characters train, last 10% validate); the text is
    ASCII, so bits per byte = bits per character;
  * the Python standard library's source (the speedrun's default corpus), 5% validation.
Rows, all from this one run on this machine:
  * counted n-grams (lmforge/models/ngram.py) on the corpus's BPE: unigram, bigram, add-eps
    3- and 5-gram, interpolated modified Kneser-Ney 3-, 5- and 7-gram; plus Kneser-Ney 7-gram on
    bytes (the classic character model);
  * the LSTM (lmforge/models/lstm.py, `cpu` preset, BPE) for --budget seconds;
  * the nanoGPT-shaped GPT-2 baseline (bytes, nanoGPT's CPU shape and AdamW settings) for --budget;
  * the default `cpu` transformer preset (BPE, Muon) for --budget, compiled (the default) and, with
    --eager-too, eager as well (what compilation costs inside a short budget) and eager with dropout
    on the attention weights too (nanoGPT's single dropout knob, the previous default);
  * `xz -9e` on the validation text alone: the "no learning" anchor.
The BPE is trained per corpus on its training text, with VOCAB_SIZE ids (--vocab-size overrides).
Every model's validation number comes from pretraining's own evaluation (`NextTokenTask.evaluate`)
on the whole validation split. Writes results.json, a markdown table and families.png.

    python bench/families.py [--budget 300] [--corpus shakespeare stdlib] [--eager-too shakespeare]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.data.loader import TokenSplit  # noqa: E402
from lmforge.data.prepare import prepare_shards  # noqa: E402
from lmforge.stages.pretrain import PretrainOptions, pretrain  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.logs import read_log  # noqa: E402
from lmforge.train.loop import TrainConfig  # noqa: E402

NGRAM_ROWS = [  # (label, preset, tokenizer)
    ("unigram", "unigram", "bpe"), ("bigram", "bigram", "bpe"), ("add-eps 3-gram", "trigram", "bpe"),
    ("add-eps 5-gram", "addeps5", "bpe"), ("Kneser-Ney 3-gram", "kn3", "bpe"), ("Kneser-Ney 5-gram", "kn5", "bpe"),
    ("Kneser-Ney 7-gram", "kn7", "bpe"), ("Kneser-Ney 7-gram, bytes", "kn7", "bytes"),
]
# A 1 MB corpus seen ~7 times in 5 minutes wants a small vocabulary: in single 300-second runs here
# the cpu transformer reached 2.153 / 2.129 / 2.114 bits/char with 4096 / 2048 / 1024 ids and the LSTM
# 2.275 / 2.199 / 2.181 (bench/probe_families.py): fewer ids mean fewer rare tokens to memorise and
# more, cheaper steps.
# The stdlib corpus (11 MB, seen less than once) keeps the speedrun's 4096.
VOCAB_SIZE = {"shakespeare": 1024, "stdlib": 4096}
BASELINE_TRAIN = dict(optimizer="adamw", lr=1e-3, beta2=0.99, weight_decay=0.1, warmup_steps=100,
                      schedule="cosine", min_lr_frac=0.1)


def shared_data() -> Path:
    return Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def corpus_source(name: str) -> tuple[str, float, str]:
    """(source for prepare_shards, validation fraction, unit) of a corpus."""
    if name == "shakespeare":
        p = shared_data() / "tinyshakespeare" / "input.txt"
        if not p.is_file():
            sys.exit(f"error: {p} not found (set LMFORGE_SHARED_DATA)")
        return str(p), 0.1, "bits/char"  # one document: split by characters, the last 10% validate
    return "stdlib", 0.05, "bits/byte"  # thousands of files: 5% of them (by content hash) validate


def split_text(data_dir: Path, split: str) -> bytes:
    """The exact text of a split of byte-level shards (ids 0..255 are the bytes; the rest are
    document-start markers)."""
    ids = TokenSplit(data_dir, split).read(0, TokenSplit(data_dir, split).num_tokens)
    return ids[ids < 256].astype(np.uint8).tobytes()


def xz_bits_per_byte(text: bytes) -> float:
    """`xz -9e` on the bytes alone (lzma's extreme preset 9 if the xz program is missing)."""
    if shutil.which("xz"):
        packed = subprocess.run(["xz", "-9e", "-c"], input=text, capture_output=True, check=True).stdout
    else:
        import lzma

        packed = lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)
    return 8 * len(packed) / len(text)


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds, val bits per byte) of every evaluation in a run's log (for a masked diffusion
    model, the upper bound it reports instead)."""
    return [(r["time"], r.get("val_bpb", r.get("val_bpb_bound"))) for r in read_log(run_dir / "log.jsonl")
            if "val_bpb" in r or "val_bpb_bound" in r]


def first_step_seconds(run_dir: Path) -> float | None:
    """Seconds of the first logged steps beyond what the same number of later steps took: the
    warm-up, which under torch.compile is mostly compilation."""
    recs = [r for r in read_log(run_dir / "log.jsonl") if "loss" in r and "tok_per_s" in r]
    if len(recs) < 3:
        return None
    first, later = recs[0], recs[1:]
    per_step = (later[-1]["time"] - first["time"]) / (later[-1]["step"] - first["step"])
    return max(0.0, first["time"] - per_step * first["step"])


def prepare_corpus(name: str, vocab_size: int, tokenizer_chars: int, out: Path):
    """Byte-level and BPE shards of a corpus under out (the BPE trained on the training text alone):
    (tokenizer paths, shard folders, validation bytes, unit), each keyed "bytes" / "bpe"."""
    source, val_fraction, unit = corpus_source(name)
    toks = {"bytes": out / "tok_bytes.json", "bpe": out / f"tok_bpe{vocab_size}.json"}
    data = {kind: out / f"data_{kind}" for kind in toks}
    Tokenizer.byte_level().save(toks["bytes"])

    def prepare(kind):
        if data[kind].exists():
            shutil.rmtree(data[kind])
        prepare_shards(source, toks[kind], data[kind], val_fraction=val_fraction, workers=1, show_progress=False)

    prepare("bytes")  # first: its shards give the exact train and validation texts
    train_text = split_text(data["bytes"], "train")[:tokenizer_chars].decode("utf-8", "replace")
    val_bytes = split_text(data["bytes"], "val")
    print(f"\n######## {name}: {len(train_text):,} training characters for the tokenizer, "
          f"{len(val_bytes):,} validation bytes; {unit}")
    t0 = time.perf_counter()
    Tokenizer.train([train_text], vocab_size, show_progress=False).save(toks["bpe"])
    prepare("bpe")
    print(f"BPE {vocab_size} trained on the training text and shards prepared in {time.perf_counter() - t0:.0f} s")
    return toks, data, val_bytes, unit


def run_corpus(name: str, args, out: Path) -> dict:
    vocab_size = args.vocab_size or VOCAB_SIZE[name]
    toks, data, val_bytes, unit = prepare_corpus(name, vocab_size, args.tokenizer_chars, out)
    rows = {}

    def record(label, family, res, run_dir=None, extra=None):
        rows[label] = {"family": family, "val_bpb": res["val_bpb"], "seconds": res["train_time"],
                       "tokens": res["tokens"], "steps": res.get("step"),
                       "tokens_per_s": res["tokens"] / max(res["train_time"], 1e-9), **(extra or {})}
        if run_dir is not None:
            rows[label]["curve"] = curve(run_dir)
        print(f"  {label}: {res['val_bpb']:.4f} {unit} after {res['train_time']:.1f} s")

    def train_cfg(run_dir, every, **kw):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        every = max(1, round(every * args.budget / 300))
        return TrainConfig(out_dir=str(run_dir), max_steps=10**9, time_budget=args.budget,
                           eval_every=every, ckpt_every=0, log_every=10, progress=False, **kw)

    def wanted(label):
        return not args.only or any(w.lower() in label.lower() for w in args.only)

    for label, preset, kind in filter(lambda row: wanted(row[0]), NGRAM_ROWS):
        run_dir = out / f"run_ngram_{preset}_{kind}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        res = pretrain(PretrainOptions(data_dir=str(data[kind]), model="ngram", preset=preset,
                                       eval_tokens=10**9), TrainConfig(out_dir=str(run_dir), progress=False))
        record(label, "n-gram", res, extra={"fit_memory_bytes": res.get("fit_memory_bytes")})

    # 1 MB of Shakespeare is seen several times in the budget: dropout (the cpu preset's on the
    # residual branches only, see its comment) and weight decay keep a model from memorising it. In
    # single 300-second runs here (1024 ids), decoupled weight decay on the hidden matrices took the
    # cpu transformer from 2.114 bits/char to 2.088 (0.1) and 2.075 (0.2), the LSTM from 2.181 to
    # 2.116 (0.1). The stdlib corpus is seen less than once: neither.
    dropout, decay = (0.2, 0.2) if name == "shakespeare" else (0.0, 0.0)
    # Evaluation points along each curve: every ~1/10 of the steps the row makes in 300 s here.
    neural = [
        # The LSTM's step cost barely grows with the batch (tests/test_lstm.py's notes): batch 32.
        # compile off: nn.LSTM is one opaque kernel, so compiling has little to fuse, and in a smoke
        # run here its first step took ~25 s of the budget. Batch 8 and twice the default learning
        # rates: 75-second probes on tinyshakespeare gave 2.953 bits/char at batch 32, 2.726 at
        # batch 8, 2.703 at batch 4, 2.585 at batch 8 with lr 6e-3 / Muon 0.04 (2.573 with 4x).
        ("LSTM (cpu preset, BPE)", "lstm", dict(data=data["bpe"], model="lstm", preset="cpu", batch=8,
                                                overrides=dict(dropout=dropout),
                                                train=dict(compile="off", lr=6e-3, muon_lr=0.04, weight_decay=decay),
                                                every=60)),
        ("GPT-2 baseline (nanoGPT shape, bytes)", "transformer (GPT-2 baseline)", dict(
            data=data["bytes"], model="transformer", preset="gpt2-classic", batch=12,
            overrides=dict(n_layer=4, n_head=4, n_embd=128, block_size=64), train=BASELINE_TRAIN, every=500)),
        ("transformer cpu preset (BPE, compiled)", "transformer (cpu preset)", dict(
            data=data["bpe"], model="transformer", preset="cpu", batch=8, overrides=dict(dropout=dropout),
            train=dict(compile="on", weight_decay=decay), every=50)),
    ]
    if name in args.eager_too:
        neural.append(("transformer cpu preset (BPE, eager)", "transformer (cpu preset, eager)", dict(
            data=data["bpe"], model="transformer", preset="cpu", batch=8, overrides=dict(dropout=dropout),
            train=dict(compile="off", weight_decay=decay), every=50)))
        if dropout:
            neural.append(("transformer cpu preset, attention dropout too (BPE, eager)",
                           "transformer (cpu preset, attention dropout, eager)", dict(
                               data=data["bpe"], model="transformer", preset="cpu", batch=8,
                               overrides=dict(dropout=dropout, attn_dropout=dropout),
                               train=dict(compile="off", weight_decay=decay),
                               every=50)))
    for label, family, r in filter(lambda row: wanted(row[0]), neural):
        run_dir = out / f"run_{label.split(' (')[0].replace(' ', '_')}_{r['train'].get('compile', 'x')}"
        print(f"== {label}: {args.budget:.0f} s")
        res = pretrain(PretrainOptions(data_dir=str(r["data"]), model=r["model"], preset=r["preset"],
                                       model_overrides=r["overrides"], batch_size=r["batch"], eval_tokens=10**9),
                       train_cfg(run_dir, r["every"], **r["train"]))
        record(label, family, res, run_dir, extra={"params": res["model"].num_params(),
                                                    "warmup_s": first_step_seconds(run_dir)})
    rows["xz -9e (validation text alone)"] = {"family": "compressor", "val_bpb": xz_bits_per_byte(val_bytes),
                                              "seconds": None}
    return {"unit": unit, "vocab_size": vocab_size, "val_bytes": len(val_bytes), "rows": rows}


def table(results: dict) -> str:
    corpora = list(results)
    labels = list(dict.fromkeys(label for c in corpora for label in results[c]["rows"]))
    head = "| model | " + " | ".join(f"{c} ({results[c]['unit']}; BPE {results[c].get('vocab_size', '?')}) | s"
                                     for c in corpora) + " |"
    lines = [head, "|---|" + "---|---|" * len(corpora)]
    for label in labels:
        cells = []
        for c in corpora:
            r = results[c]["rows"].get(label)
            cells += ["—", "—"] if r is None else [f"{r['val_bpb']:.3f}",
                                                    "—" if r["seconds"] is None else f"{r['seconds']:.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.6), squeeze=False)
    for ax, (corpus, res) in zip(axes[0], results.items()):
        rows = res["rows"]
        # The counted models as two lines through their orders (fitting seconds on x).
        for kind, pick in (("add-eps / Laplace n-gram, BPE", lambda lb: "gram" in lb and "Kneser" not in lb),
                           ("Kneser-Ney n-gram, BPE", lambda lb: "Kneser" in lb and "bytes" not in lb)):
            pts = [(max(r["seconds"], 0.05), r["val_bpb"], lb) for lb, r in rows.items()
                   if r["family"] == "n-gram" and pick(lb)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind, markersize=4)
                for x, y, lb in pts:
                    ax.annotate(lb.split()[-1].replace("-gram", ""), (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        for label, r in rows.items():
            if r.get("curve"):
                t, b = zip(*r["curve"])
                ax.plot(t, b, "-", label=label)
            elif r["family"] == "compressor":
                ax.axhline(r["val_bpb"], color="gray", ls="--", label=label)
            elif r["family"] == "n-gram" and "bytes" in label:
                ax.plot([max(r["seconds"], 0.05)], [r["val_bpb"]], "s", label=label)
        ax.set_ylim(top=min(ax.get_ylim()[1], 5.0))
        ax.set_xscale("log")
        ax.set_xlabel("training (or fitting) seconds, this 2-core CPU")
        ax.set_ylabel(f"validation {res['unit']}")
        ax.set_title(corpus)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per neural model")
    ap.add_argument("--corpus", nargs="+", default=["shakespeare", "stdlib"], choices=["shakespeare", "stdlib"])
    ap.add_argument("--vocab-size", type=int, help="BPE ids for every corpus (default: VOCAB_SIZE's per corpus)")
    ap.add_argument("--tokenizer-chars", type=int, default=20_000_000)
    ap.add_argument("--eager-too", nargs="*", default=[], metavar="CORPUS",
                    help="on these corpora also train the cpu preset without torch.compile")
    ap.add_argument("--only", nargs="*", help="run only rows whose label contains one of these words (smoke runs)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "families"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "img" / "families.png"))
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    for name in args.corpus:
        (out / name).mkdir(parents=True, exist_ok=True)
        results[name] = run_corpus(name, args, out / name)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    plot(results, Path(args.plot))
    print(f"\nplot: {args.plot}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
