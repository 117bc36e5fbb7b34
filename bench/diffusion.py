"""Benchmark: masked diffusion against the autoregressive transformer of the same shape and time.

Per corpus (tinyshakespeare, the stdlib corpus; shards and BPE as in bench/families.py), in one run:
  * the `cpu` transformer preset and the `cpu` diffusion preset (the same trunk, attending both ways),
    each trained for --budget seconds, eager (no compile warm-up inside the budget for either), with
    the regularisation each family does best with (TRAIN below);
  * validation bits per byte on the whole split: the autoregressive model's exact number, the
    diffusion model's upper bound with its Monte-Carlo standard error (--time-samples draws per window);
  * generation: from --prompts prompts of PROMPT_TOKENS validation tokens, L = GEN_TOKENS generated
    tokens, for steps = L/16 ... L and each sampler (and low-confidence remasking in blocks of
    BLOCK_LEN, LLaDA's setting): generative perplexity (the autoregressive model's perplexity of the
    generated tokens given the prompt) and the mean unigram entropy of a sample (bits; low means
    repetition) over 8 samples per prompt; seconds per call and tokens/s at batch 1 (the first prompt)
    and batch 8, against the KV-cached engine's own samples.
Sampling: temperature 1, no top-k/top-p (the distributions as trained). Writes results.json, table.md
and diffusion.png (validation against training time; quality and speed against steps).

    python bench/diffusion.py [--budget 300] [--corpus shakespeare stdlib] [--prompts 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from families import VOCAB_SIZE, prepare_corpus  # noqa: E402

from lmforge.data.loader import TokenSplit  # noqa: E402
from lmforge.eval.lm import split_loss  # noqa: E402
from lmforge.inference.diffusion import METHODS, diffusion_generate  # noqa: E402
from lmforge.inference.engine import Engine  # noqa: E402
from lmforge.stages.pretrain import PretrainOptions, pretrain  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.logs import read_log  # noqa: E402
from lmforge.train.loop import TrainConfig  # noqa: E402

PROMPT_TOKENS = 32
GEN_TOKENS = 224  # prompt + generation = the presets' 256-token window
BLOCK_LEN = 32
SAMPLERS = [(m, None) for m in METHODS] + [("low_confidence", BLOCK_LEN)]
# Per corpus and family: (dropout, weight decay, batch, steps between validations). Shakespeare is
# read ~6 times in 5 minutes: the autoregressive model needs dropout and decay against memorising it
# (bench/families.py); the diffusion model sees each window under a fresh random mask, and learns
# faster per second from larger batches (its gradient is noisier: one random time per row). The
# 300-second probes behind these choices are in docs/benchmarks.md.
TRAIN = {"shakespeare": {"transformer": (0.2, 0.2, 8, 300), "diffusion": (0.0, 0.0, 32, 30)},
         "stdlib": {"transformer": (0.0, 0.0, 8, 300), "diffusion": (0.0, 0.0, 32, 30)}}
CURVE_TOKENS = 50_000  # validation tokens per point of the training curves (the final numbers: the whole split)


def unigram_entropy(ids: list[int]) -> float:
    counts = torch.bincount(torch.tensor(ids)).float()
    p = counts[counts > 0] / len(ids)
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def gen_perplexity(ar, prompt: list[int], samples: torch.Tensor) -> float:
    """exp of the autoregressive model's mean NLL of the generated tokens (after the prompt)."""
    seqs = torch.cat([torch.tensor(prompt).expand(samples.size(0), -1), samples], 1)
    logp = F.log_softmax(ar(seqs[:, :-1]), -1)
    nll = -logp.gather(-1, seqs[:, 1:, None]).squeeze(-1)[:, len(prompt) - 1:]
    return float(nll.mean().exp())


def sampler_name(method: str, block_len: int | None) -> str:
    return method if block_len is None else f"{method}, blocks of {block_len}"


def measure(generate, ar, prompts: list[list[int]]) -> dict:
    """Quality over 8 samples of every prompt, speed at batch 8 (every prompt) and batch 1 (the first).
    generate(prompt, batch, seed) -> (batch, GEN_TOKENS) generated ids."""
    t0 = time.perf_counter()
    outs = [generate(p, 8, i) for i, p in enumerate(prompts)]
    batch8 = (time.perf_counter() - t0) / len(prompts)
    t0 = time.perf_counter()
    generate(prompts[0], 1, 0)
    batch1 = time.perf_counter() - t0
    return {"gen_ppl": sum(gen_perplexity(ar, p, s) for p, s in zip(prompts, outs)) / len(prompts),
            "entropy": sum(unigram_entropy(r) for s in outs for r in s.tolist()) / (8 * len(prompts)),
            "seconds_batch1": batch1, "seconds_batch8": batch8,
            "tok_s_batch1": GEN_TOKENS / batch1, "tok_s_batch8": 8 * GEN_TOKENS / batch8}


def run_corpus(name: str, args, out: Path) -> dict:
    toks, data, _, unit = prepare_corpus(name, VOCAB_SIZE[name], 10**9, out)
    tok = Tokenizer.load(toks["bpe"])
    models, result = {}, {"unit": unit, "rows": {}}
    for family in ("transformer", "diffusion"):
        dropout, decay, batch, every = TRAIN[name][family]
        print(f"== {name}: {family} cpu preset, {args.budget:.0f} s (dropout {dropout}, weight decay {decay}, "
              f"batch {batch})")
        run_dir = out / f"run_{family}"
        res = pretrain(PretrainOptions(data_dir=str(data["bpe"]), model=family, preset="cpu", batch_size=batch,
                                       model_overrides=dict(dropout=dropout), eval_tokens=CURVE_TOKENS),
                       TrainConfig(out_dir=str(run_dir), max_steps=10**9, time_budget=args.budget, eval_every=every,
                                   ckpt_every=0, log_every=10, progress=False, compile="off", weight_decay=decay))
        models[family] = res["model"].eval()
        key = "val_bpb" if family == "transformer" else "val_bpb_bound"
        result["rows"][family] = {"steps": res["step"], "tokens": res["tokens"], "seconds": res["train_time"],
                                  "dropout": dropout, "weight_decay": decay, "batch": batch,
                                  "curve": [(r["time"], r[key], r.get(key + "_stderr", 0.0))
                                            for r in read_log(run_dir / "log.jsonl") if key in r]}
    ar, dm = models["transformer"], models["diffusion"]
    val = TokenSplit(data["bpe"], "val")
    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.long)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():  # the whole split: the AR model's exact number, the diffusion model's bound
        ar_bpb = split_loss(ar, val, token_bytes, batch_size=8, seq_len=256, max_batches=10**9, device="cpu")["bpb"]
        bound = split_loss(dm, val, token_bytes, batch_size=8, seq_len=256, max_batches=10**9, device="cpu",
                           draws=args.time_samples)
    secs = time.perf_counter() - t0
    result.update(ar_bpb=ar_bpb, bound=bound, time_samples=args.time_samples, gap=bound["bpb_bound"] / ar_bpb - 1,
                  prompts=args.prompts)
    print(f"  AR {ar_bpb:.4f} {unit}; diffusion <= {bound['bpb_bound']:.4f} +- {bound['bpb_bound_stderr']:.4f} "
          f"({100 * result['gap']:+.1f}%; bound in {secs:.0f} s)")

    g = torch.Generator().manual_seed(0)
    ids = val.read(0, val.num_tokens).astype("int64")
    starts = torch.randint(0, len(ids) - PROMPT_TOKENS, (args.prompts,), generator=g).tolist()
    prompts = [ids[s:s + PROMPT_TOKENS].tolist() for s in starts]
    engine = Engine(ar, tok)

    def ar_generate(prompt, batch, seed):
        return torch.tensor([c.tokens for c in engine.generate([prompt] * batch, GEN_TOKENS, seed=seed, stop_ids=())])

    gen = [{"sampler": "autoregressive (KV cache)", "steps": GEN_TOKENS, **measure(ar_generate, ar, prompts)}]
    print(f"  AR samples: gen ppl {gen[0]['gen_ppl']:.1f}, entropy {gen[0]['entropy']:.2f} bits, "
          f"{gen[0]['seconds_batch1']:.2f} s at batch 1")
    for method, block_len in SAMPLERS:
        for div in args.divisors:
            steps = GEN_TOKENS // div

            def dm_generate(prompt, batch, seed, method=method, block_len=block_len, steps=steps):
                return diffusion_generate(dm, prompt, GEN_TOKENS, steps, method=method, block_len=block_len,
                                          seed=seed, num_samples=batch)[:, PROMPT_TOKENS:]

            row = {"sampler": sampler_name(method, block_len), "steps": steps, **measure(dm_generate, ar, prompts)}
            print(f"  {row['sampler']} steps {steps}: gen ppl {row['gen_ppl']:.1f}, entropy {row['entropy']:.2f}, "
                  f"{row['seconds_batch1']:.2f} s at batch 1, {row['seconds_batch8']:.2f} s at batch 8")
            gen.append(row)
    result["generation"] = gen
    return result


def table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        b, rows = r["bound"], r["rows"]
        lines += [f"**{name}** ({r['unit']}): autoregressive {r['ar_bpb']:.3f} ({rows['transformer']['steps']} "
                  f"steps); diffusion ≤ {b['bpb_bound']:.3f} ± {b['bpb_bound_stderr']:.3f} "
                  f"({rows['diffusion']['steps']} steps, {r['time_samples']} time samples per window) — "
                  f"{100 * r['gap']:+.1f}%", "",
                  "| sampler | steps | gen. perplexity | unigram entropy (bits) | s/call batch 1 | tok/s batch 1 "
                  "| s/call batch 8 | tok/s batch 8 |", "|---|---|---|---|---|---|---|---|"]
        for q in r["generation"]:
            lines.append(f"| {q['sampler']} | {q['steps']} | {q['gen_ppl']:.1f} | {q['entropy']:.2f} | "
                         f"{q['seconds_batch1']:.2f} | {q['tok_s_batch1']:.0f} | {q['seconds_batch8']:.2f} | "
                         f"{q['tok_s_batch8']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 4, figsize=(21, 4.2 * len(results)), squeeze=False)
    for (ax_val, ax_q, ax_e, ax_t), (name, r) in zip(axes, results.items()):
        for family, label in (("transformer", "autoregressive (exact)"), ("diffusion", "diffusion (upper bound)")):
            t, v, e = zip(*r["rows"][family]["curve"])
            ax_val.errorbar(t, v, yerr=e, marker="o", ms=3, capsize=2, label=label)
        ax_val.set_xlabel("training seconds")
        ax_val.set_ylabel(r["unit"])
        ax_val.set_title(f"{name}: validation, same shape and time")
        ar = r["generation"][0]
        for key, ax in (("gen_ppl", ax_q), ("entropy", ax_e), ("seconds_batch1", ax_t)):
            for sampler in dict.fromkeys(q["sampler"] for q in r["generation"][1:]):
                rows = [q for q in r["generation"] if q["sampler"] == sampler]
                ax.plot([q["steps"] for q in rows], [q[key] for q in rows], "o-", label=sampler)
            ax.axhline(ar[key], color="k", ls="--", label=f"autoregressive, {GEN_TOKENS} tokens")
            ax.set_xscale("log", base=2)
            ax.set_yscale("linear" if key == "entropy" else "log")
            ax.set_xlabel(f"diffusion steps for {GEN_TOKENS} tokens")
        ax_q.set_ylabel("generative perplexity (AR model)")
        ax_q.set_title(f"{name}: sample quality, {8 * r['prompts']} samples a point")
        ax_e.set_ylabel("unigram entropy of a sample (bits)")
        ax_e.set_title(f"{name}: diversity (low = repetition)")
        ax_t.set_ylabel("seconds per sample, batch 1")
        ax_t.set_title(f"{name}: speed against the KV-cached engine")
        for ax in (ax_val, ax_q, ax_e, ax_t):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--corpus", nargs="+", default=["shakespeare", "stdlib"], choices=list(TRAIN))
    ap.add_argument("--time-samples", type=int, default=8, help="draws per validation window of the bound")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--divisors", type=lambda v: [int(d) for d in v.split(",")], default=[16, 8, 4, 2, 1],
                    help=f"diffusion steps = {GEN_TOKENS} / each of these")
    ap.add_argument("--out", default="runs/bench_diffusion")
    ap.add_argument("--replot", action="store_true", help="only rewrite table.md and diffusion.png from the "
                    "results.json in --out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    if args.replot:
        results = json.loads((out / "results.json").read_text())
    else:
        results = {}
        for name in args.corpus:
            (out / name).mkdir(parents=True, exist_ok=True)
            results[name] = run_corpus(name, args, out / name)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (out / "table.md").write_text(md)
    plot(results, out / "diffusion.png")
    print("\n" + md)
    print(f"wrote {out}/results.json, table.md, diffusion.png")


if __name__ == "__main__":
    main()
