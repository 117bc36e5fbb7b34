"""Demonstration: reward model, DPO, GRPO and PPO on the CPU, from a small SFT checkpoint.

The starting point is a chat SFT model. With --tools (the GRPO result in docs/benchmarks.md) it is the
tool-using model of `bench/sft_demo.py full` (it calls the calculator) and rollouts run the tool
loop; without, a model fine-tuned to answer arithmetic directly, e.g.

    lmforge sft --checkpoint PRETRAINED --data synthetic:arithmetic:8000 --no-tools --out SFT \
        --time-budget 540 --batch-size 16 --eval-every 0 --ckpt-every 0 --seed 0

Each stage is one command (each under 10 minutes here) and writes OUT/<stage>.json:

    python bench/rl_demo.py grpo --checkpoint SFT      # GRPO, --budget seconds of training
    python bench/rl_demo.py grpo --checkpoint SFT --tools --task arithmetic:2:+- --temperature 0.7 \
        --lr 1e-4 --max-new-tokens 96 --budget 300     # GRPO with tool use
    python bench/rl_demo.py ppo  --checkpoint SFT      # PPO on the same budget
    python bench/rl_demo.py rm   --checkpoint SFT      # reward model on synthetic preference pairs
    python bench/rl_demo.py dpo  --checkpoint SFT      # DPO on the same pairs
    python bench/rl_demo.py report                     # markdown tables of the above

RL evaluation: greedy replies to --eval-n held-out arithmetic problems (the `lmforge synthetic eval`
problems), exact match of the final number in a reply that ends its turn; measured before training
(start) and after. Preference evaluation: held-out pairs. Peak memory is the process's maximum
resident set (ru_maxrss), each stage in its own process.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.train.loop import TrainConfig  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_cfg(args, name: str, **kw) -> TrainConfig:
    base = dict(out_dir=str(Path(args.out) / name), max_steps=100000, time_budget=args.budget, optimizer="adamw",
                warmup_steps=5, schedule="constant", eval_every=0, ckpt_every=0, log_every=5, seed=args.seed,
                compile="off", device="cpu", progress=not args.no_progress)
    base.update(kw)
    return TrainConfig(**base)


def run_rl(args, algorithm: str) -> dict:
    from lmforge.stages.rl import RLOptions, train_rl

    opts = RLOptions(checkpoint=args.checkpoint, algorithm=algorithm, tasks=[args.task], tools=args.tools,
                     prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, kl_beta=args.kl_beta, eval_n=args.eval_n,
                     updates_per_rollout=args.updates_per_rollout)
    t0 = time.perf_counter()
    r = train_rl(opts, train_cfg(args, algorithm, lr=args.lr))
    return {"stage": algorithm, "steps": r["step"], "train_seconds": round(r["train_time"], 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()),
            "start_accuracy": r["start_val_accuracy"], "accuracy": r["val_accuracy"],
            "start_length": r["start_val_length"], "length": r["val_length"],
            "settings": {"task": args.task, "tools": args.tools, "prompts_per_step": args.prompts,
                         "group_size": args.group_size,
                         "lr": args.lr, "kl_beta": args.kl_beta, "temperature": args.temperature,
                         "updates_per_rollout": args.updates_per_rollout, "budget_s": args.budget,
                         "eval_n": args.eval_n}}


def run_rm(args) -> dict:
    from lmforge.stages.reward import PairOptions, train_reward_model

    opts = PairOptions(checkpoint=args.checkpoint, data=[f"synthetic:{args.task}:{args.pairs}"], val_fraction=0.1,
                       batch_size=16)
    t0 = time.perf_counter()
    r = train_reward_model(opts, train_cfg(args, "rm", lr=args.lr, schedule="cosine", min_lr_frac=0.1))
    return {"stage": "rm", "steps": r["step"], "train_seconds": round(r["train_time"], 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()),
            "accuracy": r["val_accuracy"], "margin": r["val_margin"], "loss": r["val_loss"],
            "settings": {"data": opts.data, "val_fraction": 0.1, "lr": args.lr, "budget_s": args.budget}}


def run_dpo(args) -> dict:
    from lmforge.stages.dpo import DPOOptions, dpo
    from lmforge.stages.rl import evaluate_policy
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    opts = DPOOptions(checkpoint=args.checkpoint, data=[f"synthetic:{args.task}:{args.pairs}"], val_fraction=0.1,
                      batch_size=16, beta=args.beta)
    t0 = time.perf_counter()
    r = dpo(opts, train_cfg(args, "dpo", lr=args.lr, schedule="cosine", min_lr_frac=0.1))
    out = {"stage": "dpo", "steps": r["step"], "train_seconds": round(r["train_time"], 1),
           "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()),
           **{k: r[k] for k in r if k.startswith(("start_val_", "val_"))},
           "settings": {"data": opts.data, "beta": args.beta, "lr": args.lr, "budget_s": args.budget}}
    # Does preferring right answers over wrong ones also make the greedy answers right more often?
    tok = load_checkpoint_tokenizer(args.checkpoint)
    before, _ = load_model(args.checkpoint)
    after, _ = load_model(r["checkpoint"])
    out["greedy_accuracy_before"] = evaluate_policy(before, tok, [args.task], args.eval_n)["accuracy"]
    out["greedy_accuracy_after"] = evaluate_policy(after, tok, [args.task], args.eval_n)["accuracy"]
    return out


def report(out: Path) -> str:
    rows = {s: json.loads((out / f"{s}.json").read_text()) for s in ("grpo", "ppo", "rm", "dpo")
            if (out / f"{s}.json").is_file()}
    lines = []
    rl = [rows[s] for s in ("grpo", "ppo") if s in rows]
    if rl:
        n = rl[0]["settings"]["eval_n"]
        lines += [f"| method | steps | training time | peak RSS | held-out accuracy (n={n}) before → after "
                  "| reply length |",
                  "|---|---|---|---|---|---|"]
        for r in rl:
            lines.append(f"| {r['stage'].upper()} | {r['steps']} | {r['train_seconds']:.0f} s "
                         f"(wall {r['wall_seconds']:.0f} s) "
                         f"| {r['peak_rss_mb']} MB | {r['start_accuracy']:.1%} → **{r['accuracy']:.1%}** "
                         f"| {r['start_length']:.1f} → {r['length']:.1f} |")
        lines.append("")
    if "rm" in rows:
        r = rows["rm"]
        lines.append(f"Reward model: held-out pairwise accuracy **{r['accuracy']:.1%}** (chance 50%), mean margin "
                     f"{r['margin']:.2f}, after {r['steps']} steps / {r['train_seconds']:.0f} s.")
    if "dpo" in rows:
        r = rows["dpo"]
        lines.append(f"DPO (β={r['settings']['beta']}): held-out implicit-reward accuracy "
                     f"{r['start_val_accuracy']:.1%} → "
                     f"**{r['val_accuracy']:.1%}**, margin {r['start_val_margin']:.3f} → **{r['val_margin']:.3f}**, "
                     f"policy log-prob preference {r['start_val_logp_accuracy']:.1%} → {r['val_logp_accuracy']:.1%}; "
                     f"greedy exact match {r['greedy_accuracy_before']:.1%} → {r['greedy_accuracy_after']:.1%} "
                     f"({r['steps']} steps / {r['train_seconds']:.0f} s).")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["grpo", "ppo", "rm", "dpo", "report"])
    p.add_argument("--checkpoint", help="the SFT checkpoint to start from")
    p.add_argument("--out", default="bench/out/rl")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--budget", type=float, default=420.0, help="seconds of training")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--tools", action="store_true", help="RL with the tool loop (the SFT model calls the calculator)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-beta", type=float, default=0.02)
    p.add_argument("--updates-per-rollout", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.stage == "report":
        print(report(out))
        return
    if not args.checkpoint:
        p.error("--checkpoint is required")
    if args.lr is None:
        args.lr = {"grpo": 3e-5, "ppo": 3e-5, "rm": 1e-4, "dpo": 2e-5}[args.stage]
    import torch

    torch.manual_seed(args.seed)
    result = (run_rl(args, args.stage) if args.stage in ("grpo", "ppo")
              else run_rm(args) if args.stage == "rm" else run_dpo(args))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
