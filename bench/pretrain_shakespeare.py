"""Benchmark: the default CPU preset against the classic GPT-2/nanoGPT baseline on tinyshakespeare.

Same wall-clock budget for both, on this machine, in one run:
  * baseline: `gpt2-classic` at nanoGPT's documented CPU shape (4 layers, 4 heads, width 128,
    context 64, batch 12), AdamW with nanoGPT's shakespeare-char settings, byte-level tokenizer
    with no merges (= nanoGPT's character-level setup on this ASCII text);
  * lmforge default: the `cpu` preset with Muon, dropout 0.2 (this corpus is small enough to be
    seen ~4 times in the budget) and a 4096-id BPE tokenizer trained on the training split only.
Data split as nanoGPT does: first 90% of characters train, last 10% validate. Reports validation
bits per character (= bits per byte: the text is ASCII), tokens/s, characters/s and model FLOP
utilisation against the matmul peak measured in this same run; then tokens/s of the default preset
with and without bf16 autocast and torch.compile.

    python bench/pretrain_shakespeare.py [--budget 300] [--out bench/out/shakespeare]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.data.prepare import prepare_shards  # noqa: E402
from lmforge.models.transformer import GPT, get_config  # noqa: E402
from lmforge.stages.pretrain import PretrainOptions, pretrain  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.loop import TrainConfig  # noqa: E402
from lmforge.train.optim import build_optimizers  # noqa: E402
from lmforge.train.precision import autocast_dtype  # noqa: E402


def shakespeare() -> Path:
    root = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = root / "tinyshakespeare" / "input.txt"
    if not p.is_file():
        sys.exit(f"error: {p} not found (set LMFORGE_SHARED_DATA)")
    return p


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of square matmuls in `dtype` on this CPU (all threads)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def throughput(preset_cfg, batch: int, seq: int, *, dtype: str, compile_: bool, steps: int = 15):
    """Training tokens/s (forward, backward, Muon/AdamW step) of a config with synthetic tokens."""
    torch.manual_seed(0)
    model = GPT(preset_cfg)
    opts = build_optimizers(model, name="muon", lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02,
                            muon_momentum=0.95)
    step_model = torch.compile(model) if compile_ else model
    amp = autocast_dtype("cpu", dtype)
    x = torch.randint(0, preset_cfg.vocab_size, (batch, seq + 1))

    def step():
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    # (steady-state tokens/s, seconds of warm-up beyond 3 steady-state steps = compile time)
    return batch * seq * steps / dt, max(0.0, warmup - 3 * dt / steps)


def throughput_table(vocab_size: int) -> dict:
    """Training tokens/s of the cpu preset with and without bf16 autocast and torch.compile."""
    cfg = get_config("cpu", vocab_size=vocab_size)
    tp, ct = {}, {}
    for dtype in ("fp32", "bf16"):
        for comp in (False, True):
            key = f"{dtype}{' + compile' if comp else ''}"
            try:
                tp[key], ct[key] = throughput(cfg, 8, cfg.block_size, dtype=dtype, compile_=comp)
            except Exception as e:  # torch.compile needs a working C++ toolchain
                tp[key], ct[key] = float("nan"), float("nan")
                print(f"{key}: failed ({type(e).__name__}: {e})")
    print("\ncpu preset training throughput (tokens/s, batch 8 x 256): " +
          ", ".join(f"{k} {v:,.0f} ({v / tp['fp32']:.2f}x)" for k, v in tp.items()))
    print("compile time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in ct.items() if "compile" in k))
    return {"throughput_cpu_preset_tokens_per_s": tp, "compile_seconds": ct}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per model")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocab of the default preset's tokenizer")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "shakespeare"))
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--throughput-only", action="store_true", help="only the bf16/compile throughput table")
    args = ap.parse_args()
    if args.throughput_only:
        throughput_table(args.vocab_size)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text_path = shakespeare()
    text = text_path.read_text()
    train_text = text[: int(len(text) * 0.9)]
    print(f"tinyshakespeare: {len(text):,} chars; train on the first {len(train_text):,}, validate on the rest")

    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    peak = max(peak_bf16, peak_fp32)
    print(f"matmul peak: bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")

    # Tokenizers: byte-level for the baseline; BPE trained on the training split for lmforge.
    byte_tok = out / "tok_bytes.json"
    Tokenizer.byte_level().save(byte_tok)
    bpe_tok = out / f"tok_bpe{args.vocab_size}.json"
    Tokenizer.train([train_text], args.vocab_size, show_progress=False).save(bpe_tok)
    runs = {
        "baseline (gpt2-classic, AdamW, bytes)": dict(
            tok=byte_tok, preset="gpt2-classic", batch=12,
            overrides=dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
            train=dict(optimizer="adamw", lr=1e-3, beta2=0.99, weight_decay=0.1, warmup_steps=100,
                       schedule="cosine", min_lr_frac=0.1)),
        f"lmforge cpu preset (Muon, BPE {args.vocab_size})": dict(
            # 1 MB of text is seen ~4 times in 5 minutes: dropout keeps the model from memorising it.
            tok=bpe_tok, preset="cpu", batch=8, overrides=dict(dropout=0.2),
            train=dict(optimizer="muon")),
    }
    results = {}
    for name, r in runs.items():
        data_dir = out / f"data_{Path(r['tok']).stem}"
        prepare_shards(str(text_path), r["tok"], data_dir, val_fraction=0.1, workers=1, show_progress=False)
        run_dir = out / ("run_" + r["preset"])
        cfg = TrainConfig(out_dir=str(run_dir), max_steps=10**9, time_budget=args.budget, eval_every=0,
                          ckpt_every=0, log_every=25, progress=False, **r["train"])
        print(f"\n== {name}: {args.budget:.0f} s")
        res = pretrain(PretrainOptions(data_dir=str(data_dir), preset=r["preset"], model_overrides=r["overrides"],
                                       batch_size=r["batch"], eval_tokens=10**9, peak_flops=peak), cfg)
        model = res["model"]
        seq = model.config.block_size
        tok_s = res["tokens"] / res["train_time"]
        manifest = json.loads((data_dir / "manifest.json").read_text())
        cpt = manifest["splits"]["train"]["bytes"] / manifest["splits"]["train"]["tokens"]
        results[name] = {
            "val_bits_per_char": res["val_bpb"], "val_loss_nats_per_token": res["val_loss"],
            "steps": res["step"], "tokens": res["tokens"], "tokens_per_s": tok_s, "chars_per_s": tok_s * cpt,
            "params": model.num_params(), "flops_per_token": model.flops_per_token(seq),
            "mfu": model.flops_per_token(seq) * tok_s / peak,
        }
        print(json.dumps(results[name], indent=2))

    if not args.skip_throughput:
        results.update(throughput_table(args.vocab_size))

    base, ours = list(runs)
    b, o = results[base], results[ours]
    print("\n| model | val bits/char | tokens/s | chars/s | MFU | steps |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        r = results[name]
        print(f"| {name} | {r['val_bits_per_char']:.3f} | {r['tokens_per_s']:,.0f} | {r['chars_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['steps']} |")
    print(f"\nlmforge default vs baseline: {b['val_bits_per_char'] - o['val_bits_per_char']:+.3f} bits/char better; "
          f"goal <= 2.2: {'met' if o['val_bits_per_char'] <= 2.2 else 'not met'}")
    results["matmul_peak_flops"] = {"bf16": peak_bf16, "fp32": peak_fp32}
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
