"""Demonstration: chat SFT with tool use on synthetic tasks, full fine-tuning vs LoRA, on the CPU.

Starting from a small pretrained checkpoint (e.g. `lmforge speedrun --data fairytales.txt` or
`lmforge pretrain`), each stage is one command (each well under 10 minutes here):

    python bench/sft_demo.py base --checkpoint BASE          # evaluate the base model
    python bench/sft_demo.py full --checkpoint BASE          # full fine-tuning, then evaluate
    python bench/sft_demo.py lora --checkpoint BASE          # LoRA on the same budget, then evaluate
    python bench/sft_demo.py report                          # table of the three (markdown)

The SFT mixture: arithmetic worked examples that call the calculator (weight 2), letter counting that
calls the python tool, identity Q&A, and the safety set. Evaluation: greedy replies to 100 held-out
problems per task (letters on unseen words), tools run by the tool loop; exact match of the final
number (identity: the reply names the model); well-formed = the reply ends with <|assistant_end|>.
Peak memory is the process's maximum resident set (ru_maxrss) during training; the training-state
column counts weights + gradients + AdamW moments of the trainable parameters.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.stages.sft import SFTOptions, evaluate_tasks, safety_eval, sft  # noqa: E402
from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model  # noqa: E402
from lmforge.train.loop import TrainConfig  # noqa: E402

TASKS = ["arithmetic", "letters", "identity"]
MIXTURE = ["synthetic:arithmetic:4000*2", "synthetic:letters:3000", "synthetic:identity:500", "safety*0.5"]


def evaluate(model, tok, n: int) -> dict:
    # One thread: token-by-token decoding of a 5M model gains nothing from a second thread, and on a
    # shared machine an extra spinning thread slows it down many times.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, TASKS, n, examples=2)
    res["safety"] = safety_eval(model, tok)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def train(args, lora: bool) -> dict:
    from lmforge.posttrain.lora import LoRAConfig

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = Path(args.out) / ("lora" if lora else "full")
    cfg = TrainConfig(out_dir=str(out), max_steps=args.steps, optimizer="adamw",
                      lr=args.lora_lr if lora else args.lr, warmup_steps=10, schedule="cosine", min_lr_frac=0.1,
                      eval_every=0, ckpt_every=0, log_every=10, seed=0, compile="off", device="cpu",
                      progress=not args.no_progress)
    opts = SFTOptions(checkpoint=args.checkpoint, data=MIXTURE, batch_size=args.batch_size,
                      lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets) if lora else None)
    t0 = time.perf_counter()
    result = sft(opts, cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model, tok = result["model"].eval(), result["tokenizer"]
    trainable = result["trainable_params"]
    state_bytes = 4 * (result["total_params"] + 3 * trainable)  # fp32 weights + grads + 2 AdamW moments
    ev = evaluate(model, tok, args.n)
    return {"mode": "lora" if lora else "full", "steps": args.steps, "batch_size": args.batch_size,
            "lr": cfg.lr, "train_seconds": round(seconds, 1), "val_loss": result.get("val_loss"),
            "trainable_params": trainable, "total_params": result["total_params"],
            "trainable_fraction": trainable / result["total_params"],
            "peak_rss_mib": round(peak / 1024, 1), "rss_before_mib": round(rss0 / 1024, 1),
            "training_state_mib": round(state_bytes / 2**20, 2),
            **({"lora": {"rank": args.rank, "alpha": 2.0 * args.rank, "targets": args.targets}} if lora else {}),
            "eval": ev}


def report(out: Path) -> str:
    rows = {k: json.loads((out / f"{k}.json").read_text())
            for k in ("base", "full", "lora") if (out / f"{k}.json").is_file()}
    lines = ["| model | " + " | ".join(f"{t} acc" for t in TASKS) + " | all acc | well-formed | refusal / over-refusal "
             "| trainable params | peak RSS | train time |",
             "|---|" + "---|" * (len(TASKS) + 6)]
    for k, r in rows.items():
        ev = r["eval"]
        acc = " | ".join(f"{ev['tasks'][t]['accuracy']:.2f}" for t in TASKS)
        s = ev["safety"]
        train = (f"{r['trainable_params']:,} ({100 * r['trainable_fraction']:.1f}%) | {r['peak_rss_mib']:.0f} MiB | "
                 f"{r['train_seconds']:.0f} s") if k != "base" else "- | - | -"
        lines.append(f"| {k} | {acc} | {ev['accuracy']:.2f} | {ev['well_formed']:.2f} | "
                     f"{s['refusal_rate']:.2f} / {s['over_refusal_rate']:.2f} | {train} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["base", "full", "lora", "report"])
    p.add_argument("--checkpoint", help="the pretrained model")
    p.add_argument("--out", default="bench/out/sft")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all,lm_head")
    p.add_argument("--n", type=int, default=100, help="held-out problems per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.stage == "report":
        print(report(out))
        return
    if not args.checkpoint:
        p.error("--checkpoint is required")
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "base":
        model, _ = load_model(args.checkpoint)
        res = {"mode": "base", "checkpoint": args.checkpoint,
               "eval": evaluate(model, load_checkpoint_tokenizer(args.checkpoint), args.n)}
    else:
        res = train(args, lora=args.stage == "lora")
    res["command"] = " ".join(["python"] + sys.argv)
    (out / f"{args.stage}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "eval"} | {
        "accuracy": res["eval"]["accuracy"], "well_formed": res["eval"]["well_formed"],
        "tasks": {t: v["accuracy"] for t, v in res["eval"]["tasks"].items()},
        "safety": res["eval"]["safety"]}, indent=2))


if __name__ == "__main__":
    main()
