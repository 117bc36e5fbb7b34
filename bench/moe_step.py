"""Benchmark: where a mixture of experts' training step goes on a CPU, against the dense model of the
same active size, and the three things that made it cheaper (each against its former self, timed in
this run):

  1. Expert products at shapes that change every step. The loads move at every step, so each
     expert's block of rows has a new size; oneDNN builds a kernel for every new shape (about a
     millisecond, more than a product of this size). Padding every block to a multiple of 64 rows
     (lmforge/models/moe.py) keeps the sizes to a few. Measured: F.grouped_mm over 8 experts on
     random loads, row counts exact against rounded up to 64.
  2. Muon's Newton-Schulz iteration, as written before (separate bf16 scale-and-add passes, products
     on a transposed view) against now (contiguous, each step folded into one baddbmm), on the
     stacks of same-shaped matrices Muon orthogonalises together: the dense `cpu` preset's and the
     mixture's 64 gate/up and 32 down expert matrices.
  3. The whole step: the dense `cpu` preset and its 8-expert top-2 mixture (bench/moe.py's models:
     vocabulary 1024, batch 8 x 256, residual dropout 0.2, bf16 autocast, Muon + AdamW), eager and
     compiled, forward + backward and the optimizer timed apart; the mixture also with its experts
     looped one by one instead of one grouped product, and as it was before (looped at exact sizes,
     the former Newton-Schulz iteration), which could only run eager.

    python bench/moe_step.py [--steps 10]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.models import moe  # noqa: E402
from lmforge.models.moe import MAX_ALIGN  # noqa: E402
from lmforge.models.transformer import GPT, MLP, PRESETS  # noqa: E402
from lmforge.train import optim  # noqa: E402
from lmforge.train.optim import Muon, newton_schulz_orthogonalize  # noqa: E402

MOE = dict(n_experts=8, moe_top_k=2, moe_hidden=352, moe_balance="bias")  # bench/moe.py's mixture


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def expert_products(repeats: int) -> None:
    print("\n## 1. Eight experts' products (4096 rows of 256 -> 352, bf16), new random loads every call")
    torch.manual_seed(0)
    x = torch.randn(4096 + 8 * 63, 256, dtype=torch.bfloat16)
    w = torch.randn(8, 352, 256, dtype=torch.bfloat16)

    def call(align):
        loads = torch.distributions.Dirichlet(torch.full((8,), 30.0)).sample() * 4096
        blocks = ((loads.round().long() + align - 1) // align) * align
        F.grouped_mm(x, w.transpose(-2, -1), offs=blocks.cumsum(0).to(torch.int32))

    exact = median_ms(lambda: call(1), repeats * 3)
    aligned = median_ms(lambda: call(64), repeats * 3)
    print(f"exact row counts {exact:.2f} ms, blocks rounded up to 64 rows {aligned:.2f} ms: "
          f"{exact / aligned:.1f}x faster aligned")


def newton_schulz_before(G: torch.Tensor, steps: int = 5, dtype=torch.bfloat16) -> torch.Tensor:
    """lmforge's iteration before 2026-12-07, kept here as the baseline (in float64: the reference)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def newton_schulz(repeats: int) -> None:
    print("\n## 2. Muon's Newton-Schulz iteration (5 steps, bf16), one batched call per stack of same-shaped matrices")
    print("| stack | before, ms | now, ms | speed-up | max difference from a float64 run, before / now |")
    print("|---|---|---|---|---|")
    for label, shape in [("dense: 4 layers x 2 gate/up (704 x 256)", (8, 704, 256)),
                         ("dense: 4 down (256 x 704)", (4, 256, 704)),
                         ("dense: 4 x q/o (256 x 256)", (8, 256, 256)),
                         ("mixture: 64 expert gate/up (352 x 256)", (64, 352, 256)),
                         ("mixture: 32 expert down (256 x 352)", (32, 256, 352))]:
        G = torch.randn(*shape)
        before = median_ms(lambda G=G: newton_schulz_before(G), repeats)
        now = median_ms(lambda G=G: newton_schulz_orthogonalize(G), repeats)
        exact = newton_schulz_before(G, dtype=torch.float64)
        err_before = (newton_schulz_before(G) - exact).abs().max().item()
        err_now = (newton_schulz_orthogonalize(G) - exact).abs().max().item()
        print(f"| {label} | {before:.1f} | {now:.1f} | {before / now:.2f}x | {err_before:.4f} / {err_now:.4f} |")


def training_step(label: str, overrides: dict, compiled: bool, repeats: int, loop: bool = False,
                  before: bool = False) -> dict:
    """Median step times; `before`: the mixture as it was (experts looped at exact sizes, Newton-Schulz
    as before), approximately: the routing code itself has changed too."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["cpu"], vocab_size=1024, dropout=0.2, **overrides)
    model = GPT(cfg).train()
    groups = model.param_groups()
    muon = Muon(groups["matrix"], lr=0.02)
    adam = torch.optim.AdamW(groups["embedding"] + groups["vector"], lr=1e-3)
    step_fn = torch.compile(model) if compiled else model
    x, y = torch.randint(0, 1024, (2, 8, 256))
    grouped = vars(MLP)["grouped"]  # the staticmethod itself, to put back
    if loop or before:
        MLP.grouped = staticmethod(lambda *a: None)
    if before:
        moe.MAX_ALIGN, optim.newton_schulz_orthogonalize = 1, newton_schulz_before
    fwd_bwd, opt = [], []
    try:
        t = time.perf_counter()
        for i in range(3 + repeats):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = step_fn(x, y)
            loss.backward()
            t1 = time.perf_counter()
            muon.step()
            adam.step()
            model.after_step()
            muon.zero_grad()
            adam.zero_grad()
            if i >= 3:
                fwd_bwd.append(t1 - t0)
                opt.append(time.perf_counter() - t1)
            else:
                first = time.perf_counter() - t
    finally:
        MLP.grouped = grouped
        moe.MAX_ALIGN, optim.newton_schulz_orthogonalize = MAX_ALIGN, newton_schulz_orthogonalize
    row = {"fwd_bwd": statistics.median(fwd_bwd) * 1e3, "opt": statistics.median(opt) * 1e3, "first": first}
    row["step"] = row["fwd_bwd"] + row["opt"]
    print(f"| {label} | {'compiled' if compiled else 'eager'} | {row['fwd_bwd']:.0f} | {row['opt']:.0f} "
          f"| {row['step']:.0f} | {first:.0f} |", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed repeats of each measurement")
    args = ap.parse_args()
    expert_products(args.steps)
    newton_schulz(args.steps)
    print("\n## 3. One training step, median of", args.steps, "after 3 warm-up steps (their time includes compiling)")
    print("| model | mode | forward + backward, ms | optimizer, ms | step, ms | first 3 steps, s |")
    print("|---|---|---|---|---|---|")
    dense = training_step("dense `cpu` preset", {}, False, args.steps)
    dense_c = training_step("dense `cpu` preset", {}, True, args.steps)
    old = training_step("8 experts top-2, as before: looped, exact sizes, Newton-Schulz as before", MOE, False,
                        args.steps, before=True)
    training_step("8 experts top-2, looped", MOE, False, args.steps, loop=True)
    moe = training_step("8 experts top-2, grouped", MOE, False, args.steps)
    moe_c = training_step("8 experts top-2, grouped", MOE, True, args.steps)
    print(f"\nmixture step / dense step: eager {moe['step'] / dense['step']:.2f}x, "
          f"compiled {moe_c['step'] / dense_c['step']:.2f}x; as before (eager) / compiled dense "
          f"{old['step'] / dense_c['step']:.2f}x")


if __name__ == "__main__":
    main()
