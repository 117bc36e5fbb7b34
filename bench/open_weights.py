"""Benchmark: importing open-weight checkpoints, and decoding them in lmforge's engine vs transformers.

Two random models of ~100M parameters are built locally with `transformers` in the shapes of the
architectures people download — a Llama-3-shaped one (GQA, SwiGLU, Llama 3.1 RoPE scaling, untied
head) and a Gemma-2-shaped one (GeGLU, sandwich norms, soft-capping, sliding window on alternate
layers, tied head) — and saved as a hub folder in bf16 (as released checkpoints are), in shards with
an index. For each, in one run on this machine:
  * `lmforge import`: wall time and peak memory above what the process held before (a fresh
    process with torch loaded): anonymous memory (sampled every 2 ms: what must fit in RAM) and
    resident memory (its peak reset through /proc/self/clear_refs; it also counts the pages of the
    memory-mapped source files, which the kernel can drop), against the size of the weights;
  * greedy decoding after a 32-token prompt, no early stop, bf16 weights in both libraries, at
    batch 1 and 8: lmforge's engine (plain and compiled) and `transformers` `generate()` (eager
    attention for Gemma-2, which needs it for soft-capping; SDPA for Llama), tokens/s and the ratio.
The first tokens of both greedy continuations are compared: the same weights must give the same text.

    python bench/open_weights.py [--new-tokens 64] [--shapes llama gemma2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # ~100M parameters each, 32k vocabulary
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 512}, rope_theta=500000.0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=2048, sliding_window=64,
        query_pre_attn_scalar=128, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
}

IMPORT_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[3])
import torch, lmforge.hf  # the libraries first: their memory is not the import's

def status(key):  # kB, from /proc/self/status
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

peak_anon, done = [status("RssAnon")], threading.Event()

def watch():  # anonymous memory has no high-water mark of its own: sample it
    while not done.is_set():
        peak_anon.append(status("RssAnon"))
        time.sleep(0.002)

base_anon, base_rss = status("RssAnon"), status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
watcher = threading.Thread(target=watch)
watcher.start()
t0 = time.perf_counter()
lmforge.hf.import_hf(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - t0
done.set()
watcher.join()
print(json.dumps({"seconds": seconds, "peak_anon_mib": (max(peak_anon) - base_anon) / 1024,
                  "peak_rss_mib": (status("VmHWM") - base_rss) / 1024}))
"""


def build(shape: str, out: Path) -> tuple[float, int]:
    """Save a random model of `shape` as a bf16 hub folder in 50 MB shards; (weights MiB, parameters)."""
    import transformers

    config_cls, model_cls, kw = SHAPES[shape]
    config = getattr(transformers, config_cls)(**kw)
    config._attn_implementation = "eager" if shape == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16).eval()
    model.save_pretrained(out, max_shard_size="50MB")
    n = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    return size, n


def measure_import(hf_dir: Path, ckpt: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", IMPORT_CHILD, str(hf_dir), str(ckpt), str(REPO)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def decode_tps(generate, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> tuple[float, list[int]]:
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    generate(prompts, 4)  # warm-up (and, compiled, the compilation at this batch size)
    if getattr(generate, "compiled", False):
        generate(prompts, new_tokens)
    t0 = time.perf_counter()
    first = generate(prompts, new_tokens)
    return batch * new_tokens / (time.perf_counter() - t0), first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "open_weights.json"))
    args = ap.parse_args()

    import transformers

    from lmforge.inference.engine import Engine
    from lmforge.train.checkpoint import load_model

    rows = []
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir, ckpt = Path(tmp) / "hf", Path(tmp) / "ckpt"
            size, n = build(shape, hf_dir)
            imp = measure_import(hf_dir, ckpt)
            print(f"{shape}: {n / 1e6:.0f}M parameters, {size:.0f} MiB of bf16 weights; import "
                  f"{imp['seconds']:.1f} s, peak +{imp['peak_anon_mib']:.0f} MiB anonymous, "
                  f"+{imp['peak_rss_mib']:.0f} MiB resident", flush=True)
            model, _ = load_model(ckpt)
            assert next(model.parameters()).dtype == torch.bfloat16
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.bfloat16, attn_implementation="eager" if shape == "gemma2" else "sdpa").eval()
            engines = {"engine": Engine(model), "compiled": Engine(model, compile=True)}
            for batch in args.batches:
                def ours(p, k, engine):
                    return [c.tokens for c in engine.generate(p.tolist(), k, temperature=0, stop_ids=())]

                def hf(p, k, theirs=theirs):
                    with torch.no_grad():
                        out = theirs.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=k,
                                              min_new_tokens=k, do_sample=False, pad_token_id=0)
                    return out[:, p.size(1):].tolist()

                row = {"shape": shape, "params_m": round(n / 1e6), "weights_mib": round(size), "batch": batch,
                       "import_s": round(imp["seconds"], 2), "import_anon_mib": round(imp["peak_anon_mib"]),
                       "import_rss_mib": round(imp["peak_rss_mib"])}
                hf_tps, hf_first = decode_tps(hf, batch, args.prompt_len, args.new_tokens, 32000)
                for name, engine in engines.items():
                    fn = lambda p, k, e=engine: ours(p, k, e)  # noqa: E731
                    fn.compiled = name == "compiled"
                    tps, first = decode_tps(fn, batch, args.prompt_len, args.new_tokens, 32000)
                    row[f"{name}_tps"] = round(tps, 1)
                    # bf16 rounding differs between the two libraries' kernels: count agreeing leading tokens
                    row[f"{name}_same_first"] = min(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                                                    for x, y in zip(first, hf_first))
                row["transformers_tps"] = round(hf_tps, 1)
                row["engine_vs_transformers"] = round(row["engine_tps"] / hf_tps, 2)
                row["compiled_vs_transformers"] = round(row["compiled_tps"] / hf_tps, 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| shape | params | bf16 weights | import s | import peak MiB anon / resident | batch | engine tok/s "
          "| compiled tok/s | transformers tok/s | engine / tf | compiled / tf | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params_m']}M | {r['weights_mib']} MiB | {r['import_s']} "
              f"| {r['import_anon_mib']} / {r['import_rss_mib']} "
              f"| {r['batch']} | {r['engine_tps']} | {r['compiled_tps']} | {r['transformers_tps']} "
              f"| {r['engine_vs_transformers']}x | {r['compiled_vs_transformers']}x "
              f"| {r['engine_same_first']}/{args.new_tokens} |")


if __name__ == "__main__":
    main()
