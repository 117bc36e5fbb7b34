"""Benchmark: decode throughput of lmforge's KV-cached engine vs recomputation vs transformers.

In one run, on the same weights (an lmforge checkpoint exported to Hugging Face format and loaded
with `transformers`), at two sizes — the default `cpu` preset and a GPT-2-124M-shaped
`gpt2-classic` model (random weights) — it measures tokens/s generating 256 new tokens after a
32-token prompt, greedy, at batch 1 and batch 8, for
  (a) lmforge's engine (prefill + KV cache), plain and with Engine(compile=True)
  (b) lmforge without the cache (the whole sequence recomputed for every token),
  (c) `transformers` `generate()` with its own cache.
Then int8 and int4 weight-only quantized engines: decode tokens/s and, with --checkpoint
(a trained lmforge checkpoint) and --data-dir (its shards), the change in validation bits per byte.

    python bench/inference.py [--new-tokens 256] [--checkpoint RUN --data-dir DATA]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.hf import export_hf  # noqa: E402
from lmforge.inference.engine import Engine  # noqa: E402
from lmforge.models.transformer import GPT, get_config  # noqa: E402
from lmforge.quantize import model_memory_bytes, quantize_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.checkpoint import load_model, save_checkpoint  # noqa: E402


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def lmforge_tps(model, prompts, new_tokens, use_cache=True, dtype="fp32", compile=False) -> float:
    engine = Engine(model, dtype=dtype, compile=compile)
    # Warm-up (and, compiled, the compilation: a full-length run so every graph is built).
    engine.generate(prompts, new_tokens if compile else 4, temperature=0, stop_ids=(), use_cache=use_cache)
    out = []
    dt = timed(lambda: out.append(engine.generate(prompts, new_tokens, temperature=0, stop_ids=(),
                                                  use_cache=use_cache)))
    made = sum(len(c.tokens) for c in out[-1])
    assert made == len(prompts) * new_tokens, "generation stopped early"
    return made / dt


def hf_tps(hf_model, prompts, new_tokens) -> float:
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        hf_model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        dt = timed(lambda: hf_model.generate(ids, **kw))
    return len(prompts) * new_tokens / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--uncached-tokens", type=int, default=64,
                    help="new tokens for the no-cache baseline (it is quadratic; tokens/s at this length)")
    ap.add_argument("--checkpoint", help="trained lmforge checkpoint for the quantization quality check")
    ap.add_argument("--data-dir", help="its data folder (validation split)")
    ap.add_argument("--sizes", default="cpu,gpt2-124m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--core", action="store_true",
                    help="only the engine (plain, compiled) and transformers: no bf16, no-cache or quantized runs")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    results = {}
    sizes = {"cpu": get_config("cpu", vocab_size=4096),
             "gpt2-124m": get_config("gpt2-classic", vocab_size=50257)}
    for size in args.sizes.split(","):
        cfg = sizes[size]
        model = GPT(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "ckpt", 0, model)
            export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf")
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        print(f"\n== {size}: {model.num_params() / 1e6:.1f}M parameters, HF {type(hf).__name__}", flush=True)
        row = {}
        # The whole sequence must fit the context window (the cpu preset's is 256 tokens).
        new_tokens = min(args.new_tokens, cfg.block_size - args.prompt_tokens)
        row["new_tokens"] = new_tokens
        for batch in map(int, args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_tokens), generator=g).tolist()
            t0 = time.perf_counter()
            Engine(model, compile=True).generate(prompts, new_tokens, temperature=0, stop_ids=())
            compile_s = time.perf_counter() - t0
            r = {"engine": lmforge_tps(model, prompts, new_tokens),
                 "engine_compiled": lmforge_tps(model, prompts, new_tokens, compile=True),
                 "transformers": hf_tps(hf, prompts, new_tokens)}
            if not args.core:
                r["engine_bf16"] = lmforge_tps(model, prompts, new_tokens, dtype="bf16")
                r["no_cache"] = lmforge_tps(model, prompts, args.uncached_tokens, use_cache=False)
            for bits in () if args.core else (8, 4):
                q = quantize_model(load_copy(model), bits=bits)
                r[f"engine_int{bits}"] = lmforge_tps(q, prompts, new_tokens)
                r[f"engine_int{bits}_compiled"] = lmforge_tps(q, prompts, new_tokens, compile=True)
            r["engine_vs_transformers"] = r["engine"] / r["transformers"]
            r["compiled_vs_transformers"] = r["engine_compiled"] / r["transformers"]
            r["first_compiled_run_s"] = compile_s
            row[f"batch{batch}"] = r
            print(f"batch {batch}: " + ", ".join(f"{k} {v:,.1f}" for k, v in r.items()), flush=True)
        if args.core:
            results[size] = row
            continue
        row["memory_bytes"] = {"fp32": model_memory_bytes(model),
                               **{f"int{b}": model_memory_bytes(quantize_model(load_copy(model), bits=b))
                                  for b in (8, 4)}}
        results[size] = row

    if args.checkpoint and args.data_dir:
        results["quantization_quality"] = quant_quality(args.checkpoint, args.data_dir)

    print("\n| size | batch | new tokens | engine tok/s | engine compiled | engine bf16 | no cache tok/s "
          "| transformers tok/s | engine / transformers | compiled / transformers | int8 tok/s (compiled) "
          "| int4 tok/s (compiled) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, row in results.items():
        if size == "quantization_quality":
            continue
        for b in [k for k in row if k.startswith("batch")]:
            r = {"engine_bf16": float("nan"), "no_cache": float("nan"), "engine_int8": float("nan"),
                 "engine_int8_compiled": float("nan"), "engine_int4": float("nan"),
                 "engine_int4_compiled": float("nan"), **row[b]}
            print(f"| {size} | {b[5:]} | {row['new_tokens']} | {r['engine']:,.0f} | {r['engine_compiled']:,.0f} | "
                  f"{r['engine_bf16']:,.0f} | {r['no_cache']:,.0f} | {r['transformers']:,.0f} | "
                  f"{r['engine_vs_transformers']:.2f}x | {r['compiled_vs_transformers']:.2f}x | "
                  f"{r['engine_int8']:,.0f} ({r['engine_int8_compiled']:,.0f}) | "
                  f"{r['engine_int4']:,.0f} ({r['engine_int4_compiled']:,.0f}) |")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(results, indent=2))


def load_copy(model):
    clone = GPT(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def quant_quality(checkpoint: str, data_dir: str) -> dict:
    """Validation bits per byte of a trained checkpoint in fp32, int8 and int4."""
    from lmforge.data.loader import TokenSplit
    from lmforge.stages.pretrain import NextTokenTask

    model, state = load_model(checkpoint)
    tok = Tokenizer.load(Path(state["tokenizer_path"])) if Path(state.get("tokenizer_path", "")).is_file() else None
    val = TokenSplit(data_dir, "val")
    token_bytes = torch.tensor(tok.token_byte_lengths() if tok else [1] * model.config.vocab_size)
    seq = model.config.block_size

    def bpb(m):
        task = NextTokenTask(TokenSplit(data_dir, "train"), val, token_bytes, batch_size=8, seq_len=seq, seed=0,
                             device="cpu", eval_tokens=10**9)
        with torch.no_grad():
            return task.evaluate(m)["bpb"]

    out = {"fp32": bpb(model)}
    for bits in (8, 4):
        out[f"int{bits}"] = bpb(quantize_model(load_copy(model), bits=bits))
        out[f"int{bits}_change"] = out[f"int{bits}"] / out["fp32"] - 1
    print("\nvalidation bits/byte: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
