"""Benchmark: decoding at the memory-bandwidth limit — lmforge's engine vs `transformers` vs llama.cpp.

At batch 1 a decode step reads every weight once, so tokens/s can be at most
    DRAM bandwidth / bytes read per token,
and each precision has its own limit. In one run, on the same random weights, for each model shape
(`gpt2-classic` 124M, a Llama-shaped 124M, the `cpu` preset) it measures greedy decoding of
--new-tokens tokens after a --prompt-tokens prompt at batch 1 and batch 8, with no early stop:
  * lmforge's engine with the weights stored in fp32, bf16 (cast once at load), int8 and int4
    (`lmforge quantize`), plain and compiled (Engine(compile=True); compile time not counted);
  * `transformers` `generate()` on the same weights (exported with `lmforge export`), fp32 and bf16;
  * llama.cpp through `llama-cpp-python` on the same weights (`lmforge export --format gguf`) at
    f32 / f16 / bf16 / q8_0 / q4_0, with the same thread count;
and prefill speed (prompt tokens/s for one --prefill-tokens prompt). DRAM read bandwidth is measured
in the same run, and every decode figure is also given as a fraction of its own limit.

Then speculative decoding at batch 1 (lmforge/inference/speculative.py) on the 124M models: a draft
that predicts the target well (the target's own int4 copy), one that predicts it badly (an unrelated
random model of the `cpu` shape), and prompt lookup on a prompt whose continuation the model copies.

    python bench/inference.py [--models gpt2-classic,llama-124m,cpu] [--batches 1,8] [--threads 2]
                              [--no-compile] [--no-llamacpp] [--no-speculative]

Results go to bench/out/inference.json and a table on stdout (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.gguf_export import export_gguf  # noqa: E402
from lmforge.hf import export_hf  # noqa: E402
from lmforge.inference.engine import Engine  # noqa: E402
from lmforge.models.transformer import GPT, get_config  # noqa: E402
from lmforge.quantize import linear_memory_bytes, quantize_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.checkpoint import save_checkpoint  # noqa: E402

MODELS = {
    # GPT-2 small: learned positions, LayerNorm, GELU, tied head (llama.cpp arch gpt2).
    "gpt2-classic": dict(preset="gpt2-classic"),
    # Llama-3-like at 124M: RoPE, RMSNorm, SwiGLU, 12 heads / 4 KV heads, untied 32k head (arch llama).
    "llama-124m": dict(preset="cpu", vocab_size=32768, block_size=1024, n_layer=12, n_head=12, n_kv_head=4,
                       n_embd=768, qk_norm=False),
    # The default small preset (QK-norm: arch qwen3).
    "cpu": dict(preset="cpu"),
}
LMFORGE = ("fp32", "bf16", "int8", "int4")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def best_time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def dram_read_gbps() -> float:
    """Read bandwidth on the benchmark's threads: the best of 5 passes over 1 GiB of fp32, each a
    sum or a dot product (whichever streams faster here: the limit is the machine's, not one kernel's)."""
    x = torch.ones(256 * 2**20)
    y = torch.ones(2**20)
    rows = x.view(-1, 2**20)
    x.sum()
    return x.numel() * 4 / min(best_time(lambda: x.sum(), 5), best_time(lambda: rows @ y, 5)) / 1e9


def build(name: str, seed: int = 0) -> GPT:
    kw = dict(MODELS[name])
    torch.manual_seed(seed)
    return GPT(get_config(kw.pop("preset"), **kw)).eval()


def save(model: GPT, folder: Path) -> Path:
    """A checkpoint with a small trained tokenizer (a GGUF file needs merges); its vocabulary is padded
    up to the model's, as a real one is, which changes no tensor's shape."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    tok = Tokenizer.train([text], vocab_size=1024, show_progress=False)
    tok_file = tok.save(folder / "tokenizer-src.json")
    return save_checkpoint(folder / "ckpt", 0, model, state={"tokenizer_fingerprint": tok.fingerprint},
                           files={"tokenizer.json": tok_file.read_bytes()})


def lmforge_variant(ckpt: Path, variant: str):
    """The checkpoint's model with its weights as `variant` stores them, and the engine dtype."""
    from lmforge.train.checkpoint import load_model

    model, _ = load_model(ckpt)
    if variant in ("int8", "int4"):
        quantize_model(model, bits=int(variant[3:]))
        return model, None
    return model, variant


# ----------------------------------------------------------------------------- runners


def lmforge_decode(model, dtype, prompts, new_tokens, compile=False) -> float:
    engine = Engine(model, dtype=dtype, compile=compile)
    # Warm-up; compiled, a full-length run so every graph is built before timing.
    engine.generate(prompts, new_tokens if compile else 4, temperature=0, stop_ids=())
    dt, out = timed(lambda: engine.generate(prompts, new_tokens, temperature=0, stop_ids=()))
    assert sum(len(c.tokens) for c in out) == len(prompts) * new_tokens, "generation stopped early"
    return len(prompts) * new_tokens / dt


def lmforge_prefill(model, dtype, prompt) -> float:
    engine = Engine(model, dtype=dtype)
    engine.generate([prompt[:8]], 1, temperature=0, stop_ids=())
    return len(prompt) / best_time(lambda: engine.generate([prompt], 1, temperature=0, stop_ids=()), 2)


def hf_decode(hf, prompts, new_tokens) -> float:
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        return len(prompts) * new_tokens / best_time(lambda: hf.generate(ids, **kw))


def hf_prefill(hf, prompt) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        hf(ids[:, :8])
        return len(prompt) / best_time(lambda: hf(ids), 2)


def _ignore_log(level, text, user_data):
    pass


_quiet_llama_log = None  # the C callback, made on first use (llama_cpp is imported lazily)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one context with a slot per sequence, greedy
    decoding with every sequence of a batch in one llama_decode call (as its batched example does)."""

    def __init__(self, path: Path, threads: int, n_seq: int, n_ctx_per_seq: int):
        import llama_cpp as lc

        global _quiet_llama_log
        self.lc = lc
        if _quiet_llama_log is None:
            _quiet_llama_log = lc.llama_log_callback(_ignore_log)
        lc.llama_log_set(_quiet_llama_log, ctypes.c_void_p(0))  # its model-loading log is pages long
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_per_seq
        cp.n_batch = cp.n_ubatch = max(512, n_ctx_per_seq)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cp.n_batch, 0, n_seq)

    def _decode(self, entries) -> list[int]:
        """entries: (token, position, sequence, want logits). Returns the argmax of each wanted row."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (t, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, want
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, e in enumerate(entries):
            if e[3]:
                ptr = self.lc.llama_get_logits_ith(self.ctx, i)
                out.append(int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                     shape=(self.n_vocab,)).argmax()))
        return out

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        nxt = []
        for s, p in enumerate(prompts):  # prefill each prompt (its last row's logits)
            nxt += self._decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
        outs = [[t] for t in nxt]
        for step in range(new_tokens - 1):
            nxt = self._decode([(o[-1], len(p) + step, s, True) for s, (p, o) in enumerate(zip(prompts, outs))])
            for o, t in zip(outs, nxt):
                o.append(t)
        return outs

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def llamacpp_decode(path, prompts, new_tokens, threads) -> float:
    llm = LlamaCpp(path, threads, len(prompts), len(prompts[0]) + new_tokens + 8)
    try:
        llm.generate(prompts, 4)
        return len(prompts) * new_tokens / best_time(lambda: llm.generate(prompts, new_tokens))
    finally:
        llm.close()


def llamacpp_prefill(path, prompt, threads) -> float:
    llm = LlamaCpp(path, threads, 1, len(prompt) + 8)
    try:
        llm.generate([prompt[:8]], 1)
        return len(prompt) / best_time(lambda: llm.generate([prompt], 1), 2)
    finally:
        llm.close()


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes a decode step reads from a GGUF file's tensors: all but the lookup tables (the token
    table counts when it doubles as the output head)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    skip = {"position_embd.weight"} | ({"token_embd.weight"} if "output.weight" in tensors else set())
    return sum(n for name, n in tensors.items() if name not in skip)


# ----------------------------------------------------------------------------- speculative decoding


def timed(fn):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def speculative_rows(ckpt: Path, target_name: str, new_tokens: int) -> list[dict]:
    """Batch-1 greedy decoding of the fp32 target with and without speculation (k = 4)."""
    from lmforge.inference.speculative import Speculator
    from lmforge.train.checkpoint import load_model

    target, _ = load_model(ckpt)
    good, _ = load_model(ckpt)
    quantize_model(good, bits=4)  # the target's own int4 copy: an eighth of its bytes
    bad = GPT(get_config("cpu", vocab_size=target.config.vocab_size)).eval()  # unrelated, random
    prompt = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(7)).tolist()
    engine = Engine(target)
    engine.generate([prompt], 4, temperature=0, stop_ids=())
    # Prompt lookup pays where the continuation repeats the prompt (RAG, code edits); a random
    # model's greedy text loops, so a prompt holding the start of its own continuation is that case.
    _, [ref] = timed(lambda: engine.generate([prompt], new_tokens, temperature=0, stop_ids=()))
    settings = [("draft: the target's int4 copy (predicts it well)", dict(draft=good), prompt),
                ("draft: an unrelated random cpu-preset model (predicts it badly)", dict(draft=bad), prompt),
                ("prompt lookup, prompt holds the start of the continuation", dict(prompt_lookup=True),
                 prompt + ref.tokens[:64])]
    rows = []
    for label, kw, p in settings:
        engine.generate([p], 4, temperature=0, stop_ids=())
        base_s, [base] = timed(lambda p=p: engine.generate([p], new_tokens, temperature=0, stop_ids=()))
        spec = Speculator(target, k=4, **kw)
        spec.generate(p, 4, temperature=0, stop_ids=())
        spec_s, (completion, stats) = timed(lambda p=p, spec=spec: spec.generate(p, new_tokens, temperature=0,
                                                                                 stop_ids=()))
        rows.append({"model": target_name, "setting": label, "plain_tok_s": new_tokens / base_s,
                     "speculative_tok_s": new_tokens / spec_s, "speed_up": base_s / spec_s,
                     "acceptance_rate": stats.acceptance_rate, "tokens_per_target_pass": stats.tokens_per_pass,
                     "identical_greedy": completion.tokens == base.tokens})
        r = rows[-1]
        print(f"  speculative, {label}: {r['speculative_tok_s']:.1f} vs {r['plain_tok_s']:.1f} tok/s = "
              f"{r['speed_up']:.2f}x, acceptance {r['acceptance_rate']:.2f}, identical {r['identical_greedy']}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-classic,llama-124m,cpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled lmforge engines")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-speculative", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    bw = dram_read_gbps()
    print(f"DRAM read bandwidth {bw:.1f} GB/s ({args.threads} threads)", flush=True)
    results = {"dram_read_gbps": bw, "threads": args.threads, "rows": [], "prefill": [], "speculative": []}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = build(name)
            cfg = model.config
            ckpt = save(model, tmp)
            print(f"\n== {name}: {model.num_params() / 1e6:.1f}M parameters", flush=True)
            new_tokens = min(args.new_tokens, cfg.block_size - args.prompt_tokens)
            prefill_len = min(args.prefill_tokens, cfg.block_size - 1)
            g = torch.Generator().manual_seed(0)
            long_prompt = torch.randint(0, 256, (prefill_len,), generator=g).tolist()
            engines = {}
            for v in LMFORGE:
                m, dtype = lmforge_variant(ckpt, v)
                Engine(m, dtype=dtype)  # casts bf16 once, here
                engines[v] = m
            hf = {}
            if not args.no_transformers:
                export_hf(ckpt, tmp / "hf")
                for d, td in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    hf[d] = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=td).eval()
            ggufs = {}
            if not args.no_llamacpp:
                for t in GGUF_TYPES:
                    ggufs[t] = export_gguf(ckpt, tmp / f"model-{t}.gguf", t).path
            for batch in map(int, args.batches.split(",")):
                prompts = torch.randint(0, 256, (batch, args.prompt_tokens), generator=g).tolist()
                where = {"model": name, "batch": batch, "new_tokens": new_tokens}
                for v, m in engines.items():
                    add_row(results, where, "lmforge", v, lmforge_decode(m, None, prompts, new_tokens),
                            linear_memory_bytes(m))
                    if not args.no_compile:
                        add_row(results, where, "lmforge", v, lmforge_decode(m, None, prompts, new_tokens, True),
                                linear_memory_bytes(m), compiled=True)
                for d, h in hf.items():
                    add_row(results, where, "transformers", d, hf_decode(h, prompts, new_tokens),
                            linear_memory_bytes(engines[d]))
                for t, path in ggufs.items():
                    add_row(results, where, "llama.cpp", t, llamacpp_decode(path, prompts, new_tokens, args.threads),
                            gguf_bytes_per_token(path))
            for v, m in engines.items():
                results["prefill"].append({"model": name, "engine": "lmforge", "precision": v, "tokens": prefill_len,
                                           "tok_s": lmforge_prefill(m, None, long_prompt)})
            for d, h in hf.items():
                results["prefill"].append({"model": name, "engine": "transformers", "precision": d,
                                           "tokens": prefill_len, "tok_s": hf_prefill(h, long_prompt)})
            for t, path in ggufs.items():
                results["prefill"].append({"model": name, "engine": "llama.cpp", "precision": t, "tokens": prefill_len,
                                           "tok_s": llamacpp_prefill(path, long_prompt, args.threads)})
            for r in results["prefill"]:
                if r["model"] == name:
                    print(f"  prefill {r['tokens']} tokens {r['engine']:12s} {r['precision']:5s} "
                          f"{r['tok_s']:9.1f} tok/s", flush=True)
            if not args.no_speculative and name != "cpu":
                results["speculative"] += speculative_rows(ckpt, name, new_tokens)
            del engines, hf
    print_tables(results)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(results, indent=2))


def add_row(results: dict, where: dict, engine: str, precision: str, tps: float, bytes_per_token: int,
            compiled: bool = False) -> None:
    """One decode measurement, with its bandwidth limit: batch x bandwidth / bytes read per step."""
    limit = where["batch"] * results["dram_read_gbps"] * 1e9 / bytes_per_token
    r = {**where, "engine": engine, "precision": precision, "compiled": compiled, "tok_s": tps,
         "mb_per_token": bytes_per_token / 1e6, "limit_tok_s": limit, "of_limit": tps / limit}
    results["rows"].append(r)
    print(f"  batch {where['batch']} {engine:12s} {precision:5s}{' compiled' if compiled else '':9s} {tps:8.1f} tok/s "
          f"{r['mb_per_token']:6.1f} MB/step  {r['of_limit']:.0%} of limit", flush=True)


def print_tables(results: dict) -> None:
    print(f"\nDRAM read bandwidth: {results['dram_read_gbps']:.1f} GB/s, {results['threads']} threads\n")
    print("| model | batch | engine | precision | tok/s | MB read / token | limit tok/s | of limit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        prec = r["precision"] + (" compiled" if r["compiled"] else "")
        print(f"| {r['model']} | {r['batch']} | {r['engine']} | {prec} | {r['tok_s']:,.1f} | "
              f"{r['mb_per_token']:.0f} | {r['limit_tok_s']:,.0f} | {r['of_limit']:.0%} |")
    print("\n| model | prompt tokens | engine | precision | prefill tok/s |")
    print("|---|---|---|---|---|")
    for r in results["prefill"]:
        print(f"| {r['model']} | {r['tokens']} | {r['engine']} | {r['precision']} | {r['tok_s']:,.0f} |")
    spec = [r for r in results["speculative"] if "setting" in r]
    if spec:
        print("\n| model | speculation (k = 4, greedy) | plain tok/s | speculative tok/s | speed-up | acceptance "
              "| tokens / target pass | identical output |")
        print("|---|---|---|---|---|---|---|---|")
        for r in spec:
            print(f"| {r['model']} | {r['setting']} | {r['plain_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | "
                  f"{r['speed_up']:.2f}x | {r['acceptance_rate']:.2f} | {r['tokens_per_target_pass']:.2f} | "
                  f"{r['identical_greedy']} |")


if __name__ == "__main__":
    main()
