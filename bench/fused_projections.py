"""Decoding with q/k/v and gate/up multiplied as one packed matrix each, against one matrix per layer,
and what oneDNN's packed kernels can stream from memory in a 124M model's shapes.

Two measurements in one run, 2 threads unless --threads:
1. Engine tokens/s at batch 1 (32-token prompt, 128 greedy tokens), fused (`forward_fused` of
   lmforge/inference/packed.py's PackedLinear, and of QuantLinear for int8, as the engine runs) and
   unfused (each layer its own product), alternated `--repeats` times; the best of each and their ratio.
2. The matrix products alone: every weight matrix of the model's decode step, each multiplied by one
   row in turn, cycled so that they come from DRAM (201 MB in bf16, more than the 32 MB cache), as
   the step does (oneDNN's packed kernels; fbgemm's int8 x int8 for int8); milliseconds per step,
   GB/s streamed, and the tokens/s that bounds.

    python bench/fused_projections.py [--models llama-124m,gpt2-classic] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference  # noqa: E402  (bench/inference.py: the same models and decode loop)

from lmforge.inference import packed  # noqa: E402
from lmforge.quantize import QuantLinear, _pack_int8, quantize_model  # noqa: E402

FUSING = (packed.PackedLinear, QuantLinear)  # the layer classes with a forward_fused


def unfused(self, x, layers):
    """Each layer its own product (the engine before fusing)."""
    return [m(x) for m in layers] if len(layers) > 1 else FUSED[type(self)](self, x, layers)


FUSED = {cls: cls.forward_fused for cls in FUSING}


def decode_ratio(name: str, variant: str, repeats: int) -> dict:
    """Best tokens/s fused and unfused; variant fp32 / bf16 (engine dtype) or int8 (quantized)."""
    best = {"fused": 0.0, "unfused": 0.0}
    for _ in range(repeats):
        for mode in best:
            for cls in FUSING:
                cls.forward_fused = FUSED[cls] if mode == "fused" else unfused
            try:
                model = inference.build(name)
                if variant == "int8":
                    quantize_model(model, bits=8)
                dtype = None if variant == "int8" else variant
                tps = inference.lmforge_decode(model, dtype, [list(range(1, 33))], 128)
            finally:
                for cls in FUSING:
                    cls.forward_fused = FUSED[cls]
            best[mode] = max(best[mode], tps)
    return {**best, "ratio": best["fused"] / best["unfused"]}


@torch.inference_mode()
def matmul_ceiling(name: str, dtype: torch.dtype, fused: bool) -> dict:
    """Milliseconds per step of the model's packed matrix products alone, cycled through DRAM."""
    model = inference.build(name)
    shapes = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.up_proj], [mlp.down_proj]]
        if hasattr(mlp, "gate_proj"):
            groups[2] = [mlp.gate_proj, mlp.up_proj]
        for g in groups:
            if fused:
                shapes.append((sum(m.out_features for m in g), g[0].in_features))
            else:
                shapes += [(m.out_features, m.in_features) for m in g]
    shapes.append((model.config.vocab_size, model.config.n_embd))
    del model
    mats = []
    for out_f, in_f in shapes:
        if dtype == torch.int8:  # fbgemm's int8 x int8 product, as QuantLinear decodes one token
            w = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)
            mats.append((_pack_int8(w, torch.full((out_f,), 0.01)), torch.randn(1, in_f)))
        else:
            w = torch.randn(out_f, in_f).to(dtype)
            mats.append((torch.ops.mkldnn._reorder_linear_weight(w, 1), torch.randn(1, in_f).to(dtype)))
    nbytes = sum(o * i for o, i in shapes) * (1 if dtype == torch.int8 else torch.finfo(dtype).bits // 8)

    def step():
        for p, x in mats:
            if dtype == torch.int8:
                torch.ops.quantized.linear_dynamic(x, p, False)
            else:
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    for _ in range(3):
        step()
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        step()
    s = (time.perf_counter() - t) / n
    return {"ms": s * 1e3, "products": len(shapes), "MB": nbytes / 1e6, "GBps": nbytes / s / 1e9, "tok_s": 1 / s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-124m,gpt2-classic")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not packed._mkldnn_available():
        sys.exit("error: this torch build has no oneDNN linear kernels; nothing to measure")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; batch 1; best of {args.repeats} alternated runs")
    print("| model | dtype | fused tok/s | unfused tok/s | fused / unfused | products per step (fused / not) "
          "| matmul-only ms per step (fused / not) | GB/s streamed (fused) | matmul-only tok/s bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
            r = decode_ratio(name, dtype_name, args.repeats)
            f, u = matmul_ceiling(name, dtype, True), matmul_ceiling(name, dtype, False)
            print(f"| {name} | {dtype_name} | {r['fused']:.1f} | {r['unfused']:.1f} | {r['ratio']:.3f}x "
                  f"| {f['products']} / {u['products']} | {f['ms']:.2f} / {u['ms']:.2f} | {f['GBps']:.1f} "
                  f"| {f['tok_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
