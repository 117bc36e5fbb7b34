"""`lmforge pretrain`: train any model family on token shards (also under torchrun: DDP).

    lmforge pretrain --data-dir data/ --out runs/a [--arch transformer|lstm|ngram] [--model PRESET]
    lmforge pretrain ... --dry-run        parameters, tokens per step, memory and FLOPs; no training
    lmforge pretrain ... --dry-run --scaling-fit SWEEP    also the loss a scaling fit predicts for this run
"""
from __future__ import annotations

import json

from lmforge.cli.common import (
    add_model_args,
    add_options,
    add_train_args,
    model_overrides,
    positive_int,
    train_config,
)
from lmforge.common import LmforgeError


def pretrain_options(args, **given):
    from lmforge.cli.common import options_from_args
    from lmforge.stages.options import PretrainOptions

    return options_from_args(PretrainOptions, args, data_dir=args.data_dir, model=args.arch,
                             preset=args.model_preset, model_overrides=model_overrides(args), **given)


def cmd_pretrain(args):
    from lmforge.stages.pretrain import pretrain

    if args.dry_run:
        return print_training_estimate(args)
    result = pretrain(pretrain_options(args), train_config(args))
    from lmforge.common import is_main_process

    if is_main_process():
        summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        print(json.dumps(summary, indent=2))
    from lmforge.train.distributed import cleanup_distributed

    cleanup_distributed()


def print_training_estimate(args):
    """`pretrain --dry-run`: what a step costs, per device, before any memory is spent on it."""
    from lmforge.common import dist_info
    from lmforge.models.transformer import get_config
    from lmforge.stages.pretrain import load_data_tokenizer
    from lmforge.train.budget import footprint_lines, training_footprint

    if args.arch != "transformer":
        raise LmforgeError(f"--dry-run estimates the transformer family only, not {args.arch}")
    if args.tensor_parallel > 1:
        raise LmforgeError("--dry-run does not estimate tensor parallelism (only ddp and fsdp)")
    tok, _ = load_data_tokenizer(args.data_dir)
    preset = args.model_preset or "cpu"
    cfg = get_config(preset, **{**model_overrides(args), "vocab_size": tok.vocab_size})
    seq_len = args.seq_len or cfg.block_size
    world = args.nproc or dist_info()[2]
    f = training_footprint(cfg, batch_size=args.batch_size, seq_len=seq_len, grad_accum=args.grad_accum,
                           world=world, optimizer=args.optimizer, parallel=args.parallel)
    print(f"model: {preset}, {f.params / 1e6:.2f}M parameters, context {cfg.block_size}")
    for line in footprint_lines(f, batch_size=args.batch_size, seq_len=seq_len, grad_accum=args.grad_accum,
                                world=world, parallel=args.parallel):
        print(line)
    if args.scaling_fit:
        print_scaling_prediction(args, cfg, tok, tokens=args.max_steps * args.batch_size * seq_len * args.grad_accum
                                 * world)


def print_scaling_prediction(args, cfg, tok, tokens: int):
    """The loss a fitted sweep predicts for the run these options describe (N as the sweep counts it)."""
    import torch

    from lmforge.models.transformer import GPT
    from lmforge.scaling.report import load_fit, loss_line
    from lmforge.scaling.sweep import matmul_params

    fit, saved, sweep = load_fit(args.scaling_fit)
    if args.time_budget is not None:
        raise LmforgeError("--scaling-fit predicts from the tokens a run trains; with --time-budget they are not "
                           "known in advance (give --max-steps alone)")
    with torch.device("meta"):
        n = matmul_params(GPT(cfg))
    print(f"scaling fit {args.scaling_fit}: N = {n:,} matrix-multiply parameters, D = {tokens:,} tokens "
          f"(--max-steps {args.max_steps}), D/N = {tokens / n:.1f}")
    print(loss_line(fit, saved, n, tokens, level=0.9))
    if sweep["tokenizer_fingerprint"] != tok.fingerprint:
        print("warning: this run's tokenizer is not the sweep's: losses in nats per token do not carry over")
    largest = max(r["flops"] for r in saved["runs"])
    reach = 6 * n * tokens / largest
    if reach > 1:
        print(f"this run is {reach:.1f}x the sweep's largest run (by 6ND): an extrapolation")


def add_commands(sub) -> None:
    from lmforge.stages.options import PretrainOptions

    pt = sub.add_parser("pretrain", help="train a model on token shards (runs under torchrun too)")
    pt.add_argument("--data-dir", required=True, help="folder written by `lmforge data prepare`")
    pt.add_argument("--dry-run", action="store_true",
                    help="print parameters, tokens per step, memory per device and FLOPs per step; do not train")
    pt.add_argument("--scaling-fit", default=None, metavar="SWEEP",
                    help="with --dry-run: the validation loss a fitted `lmforge scaling` sweep predicts for this run")
    pt.add_argument("--nproc", type=positive_int, default=None,
                    help="processes (devices) the --dry-run estimate is for (default: this run's, under torchrun)")
    add_model_args(pt, family=True)
    g = add_train_args(pt)
    add_options(g, PretrainOptions)
    pt.set_defaults(func=cmd_pretrain)
