"""Benchmark: masked diffusion against the autoregressive transformer of the same shape and time.

Per corpus (tinyshakespeare, the stdlib corpus; shards and BPE as in bench/families.py), in one run:
  * the `cpu` transformer preset and the `cpu` diffusion preset (the same trunk, attending both ways),
    each trained for --budget seconds with the same batch, dropout and weight decay, eager (no compile
    warm-up inside a short budget for either);
  * validation bits per byte: the autoregressive model's exact number, the diffusion model's upper
    bound with its Monte-Carlo standard error (--time-samples draws per window, the whole split);
  * generation: from --prompts prompts of PROMPT_TOKENS validation tokens, L generated tokens, for
    steps = L/16 ... L and each sampler: generative perplexity (the autoregressive model's perplexity
    of the generated tokens given the prompt), the mean unigram entropy of a sample (bits; low means
    repetition), and seconds per call at batch 1 and 8, against the KV-cached engine's own samples.
Sampling: temperature 1, no top-k/top-p (the distributions as trained). Writes results.json, a
markdown table and diffusion.png.

    python bench/diffusion.py [--budget 300] [--corpus shakespeare stdlib]
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

from lmforge.data.loader import TokenSplit, eval_batches  # noqa: E402
from lmforge.inference.diffusion import METHODS, diffusion_generate  # noqa: E402
from lmforge.inference.engine import Engine  # noqa: E402
from lmforge.models.diffusion import diffusion_bound  # noqa: E402
from lmforge.stages.pretrain import PretrainOptions, pretrain  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.loop import TrainConfig  # noqa: E402

PROMPT_TOKENS = 32
GEN_TOKENS = 224  # prompt + generation = the presets' 256-token window


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


def run_corpus(name: str, args, out: Path) -> dict:
    toks, data, _, unit = prepare_corpus(name, VOCAB_SIZE[name], 10**9, out)
    tok = Tokenizer.load(toks["bpe"])
    dropout, decay = (0.2, 0.2) if name == "shakespeare" else (0.0, 0.0)  # as in bench/families.py
    models, result = {}, {"unit": unit, "rows": {}}
    for family in ("transformer", "diffusion"):
        print(f"== {name}: {family} cpu preset, {args.budget:.0f} s")
        run_dir = out / f"run_{family}"
        res = pretrain(PretrainOptions(data_dir=str(data["bpe"]), model=family, preset="cpu", batch_size=8,
                                       model_overrides=dict(dropout=dropout), eval_tokens=10**9),
                       TrainConfig(out_dir=str(run_dir), max_steps=10**9, time_budget=args.budget, eval_every=10**9,
                                   ckpt_every=0, log_every=50, progress=False, compile="off", weight_decay=decay))
        models[family] = res["model"].eval()
        result["rows"][family] = {"steps": res["step"], "tokens": res["tokens"], "seconds": res["train_time"],
                                  "trainer_val_bpb": res["val_bpb"]}
    ar, dm = models["transformer"], models["diffusion"]
    val = TokenSplit(data["bpe"], "val")
    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.float32)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bound = diffusion_bound(dm, eval_batches(val, 8, 256, max_batches=10**9), token_bytes,
                            time_samples=args.time_samples)
    secs = time.perf_counter() - t0
    ar_bpb = result["rows"]["transformer"]["trainer_val_bpb"]
    result["ar_bpb"], result["bound"] = ar_bpb, bound
    result["gap"] = bound["bpb_bound"] / ar_bpb - 1
    print(f"  AR {ar_bpb:.4f} {unit}; diffusion <= {bound['bpb_bound']:.4f} +- {bound['bpb_stderr']:.4f} "
          f"({100 * result['gap']:+.1f}%; bound in {secs:.0f} s)")

    g = torch.Generator().manual_seed(0)
    ids = val.read(0, val.num_tokens).astype("int64")
    starts = torch.randint(0, len(ids) - PROMPT_TOKENS, (args.prompts,), generator=g).tolist()
    prompts = [ids[s:s + PROMPT_TOKENS].tolist() for s in starts]
    engine = Engine(ar, tok)
    gen = []
    for batch in (1, 8):
        t0 = time.perf_counter()
        comps = [engine.generate([p] * batch, GEN_TOKENS, seed=i, stop_ids=()) for i, p in enumerate(prompts)]
        secs = time.perf_counter() - t0
        if batch == 8:
            samples = [torch.tensor([c.tokens for c in row]) for row in comps]
            ppl = sum(gen_perplexity(ar, p, s) for p, s in zip(prompts, samples)) / len(prompts)
            ent = sum(unigram_entropy(r) for s in samples for r in s.tolist()) / (8 * len(prompts))
        gen.append({"sampler": "autoregressive (KV cache)", "steps": GEN_TOKENS, "batch": batch,
                    "seconds_per_call": secs / len(prompts)})
    for row in gen:
        row.update(gen_ppl=ppl, entropy=ent)
    print(f"  AR samples: gen ppl {ppl:.1f}, entropy {ent:.2f} bits, {gen[0]['seconds_per_call']:.2f} s (batch 1)")
    for method in METHODS:
        for div in (16, 8, 4, 2, 1):
            steps = GEN_TOKENS // div
            for batch in (1, 8):
                t0 = time.perf_counter()
                outs = [diffusion_generate(dm, p, GEN_TOKENS, steps, method=method, seed=i,
                                           num_samples=batch)[:, PROMPT_TOKENS:] for i, p in enumerate(prompts)]
                secs = time.perf_counter() - t0
                row = {"sampler": method, "steps": steps, "batch": batch, "seconds_per_call": secs / len(prompts)}
                if batch == 8:
                    row["gen_ppl"] = sum(gen_perplexity(ar, p, s) for p, s in zip(prompts, outs)) / len(prompts)
                    row["entropy"] = sum(unigram_entropy(r) for s in outs for r in s.tolist()) / (8 * len(prompts))
                    print(f"  {method} steps {steps}: gen ppl {row['gen_ppl']:.1f}, entropy {row['entropy']:.2f}, "
                          f"{secs / len(prompts):.2f} s per call of 8")
                gen.append(row)
    result["generation"] = gen
    return result


def table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        b = r["bound"]
        lines += [f"**{name}** ({r['unit']}): autoregressive {r['ar_bpb']:.3f} "
                  f"({r['rows']['transformer']['steps']} steps); diffusion ≤ {b['bpb_bound']:.3f} ± "
                  f"{b['bpb_stderr']:.3f} ({r['rows']['diffusion']['steps']} steps, {b['time_samples']} time "
                  f"samples per window) — {100 * r['gap']:+.1f}%", "",
                  "| sampler | steps | gen. perplexity | unigram entropy (bits) | s/call batch 1 | s/call batch 8 |",
                  "|---|---|---|---|---|---|"]
        by = {}
        for row in r["generation"]:
            by.setdefault((row["sampler"], row["steps"]), {})[row["batch"]] = row
        for (sampler, steps), rows in by.items():
            q = rows[8]
            lines.append(f"| {sampler} | {steps} | {q['gen_ppl']:.1f} | {q['entropy']:.2f} | "
                         f"{rows[1]['seconds_per_call']:.2f} | {q['seconds_per_call']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ar = next(row for row in r["generation"] if row["sampler"].startswith("autoregressive"))
        for method in METHODS:
            rows = [row for row in r["generation"] if row["sampler"] == method and row["batch"] == 8]
            ax.plot([row["steps"] for row in rows], [row["gen_ppl"] for row in rows], "o-", label=method)
        ax.axhline(ar["gen_ppl"], color="k", ls="--", label="autoregressive samples")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"diffusion steps for {GEN_TOKENS} tokens")
        ax.set_ylabel("generative perplexity (AR model)")
        ax.set_title(f"{name}: AR {r['ar_bpb']:.3f}, diffusion ≤ {r['bound']['bpb_bound']:.3f} {r['unit']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--corpus", nargs="+", default=["shakespeare", "stdlib"])
    ap.add_argument("--time-samples", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", default="runs/bench_diffusion")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
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
