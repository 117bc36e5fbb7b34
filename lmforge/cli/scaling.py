"""Scaling laws: train an IsoFLOP grid, fit Chinchilla's three approaches, predict a run before it trains.

    lmforge scaling sweep --data-dir DATA --out DIR [--preset cpu] [--flops 3e11,1e12,...] [--models 2,3,4]
                          [--dry-run]
    lmforge scaling fit DIR                 exponents with intervals, tokens per parameter, plots in DIR
    lmforge scaling predict DIR --flops C   the compute-optimal size and tokens, and the loss to expect
    lmforge scaling predict DIR --params N --tokens D
    lmforge pretrain ... --dry-run --scaling-fit DIR     the loss a planned run should reach

A re-run of `sweep` skips the finished runs and resumes an interrupted one. Each run is one process
(`--jobs N` trains N at a time); the sweep does not run under torchrun. `--models` fixes the
depths of the dial (every budget trains those sizes); by default each budget gets --sizes depths
centred on the expected optimum. Losses are validation nats per token, so every run of a sweep
must use the same tokenizer and data (the sweep folder refuses anything else).
"""
from __future__ import annotations

import argparse

from lmforge.cli.common import add_options, checked, positive_float, positive_int
from lmforge.common import LmforgeError


def positive_list(cast, what: str, example: str):
    """An argparse type: comma-separated positive numbers (`cast` each), or one clear error."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} such as {example}, "
                                             f"got {text!r}") from None
        if not values or not all(0 < v < float("inf") for v in values):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected positive {what}, got {text!r}")
        return values
    return parse


float_list = positive_list(float, "numbers", "3e11,1e12")
depth_list = positive_list(int, "depths", "2,3,4")


coverage = checked(float, lambda v: 0 < v < 1, "an interval coverage in (0, 1), such as 0.9")


def cmd_sweep(args):
    import os
    from pathlib import Path

    from lmforge.cli.common import options_from_args, train_config
    from lmforge.scaling import sweep as sw
    from lmforge.scaling.options import SweepOptions
    from lmforge.stages.pretrain import load_data_tokenizer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmforgeError("scaling sweep runs one process per run (--jobs N for several at once); "
                           "start it without torchrun")
    opts = options_from_args(SweepOptions, args)
    tok, _ = load_data_tokenizer(args.data_dir)
    grid = sw.plan_sweep(opts, vocab_size=tok.vocab_size, flops=args.flops, depths=args.models)
    if args.dry_run:
        from lmforge.train.stage import stage_device

        device = stage_device(train_config(args, out_dir=args.out, max_steps=1))
        print(f"measuring training speed of {len({p.depth for p in grid})} sizes on {device}...", flush=True)
        for line in sw.grid_lines(grid, sw.estimate_seconds(grid, opts, tok.vocab_size, device), jobs=opts.jobs):
            print(line)
        return
    out = Path(args.out)
    sw.check_sweep_folder(out, sw.sweep_record(opts, args.data_dir, tok.fingerprint, tok.vocab_size))
    for line in sw.grid_lines(grid):
        print(line)
    cfg = train_config(args, out_dir=str(out), max_steps=1)  # each run sets its own folder and steps
    sw.run_sweep(grid, opts, cfg, args.data_dir, out)
    print(f"sweep done: {len(grid)} runs in {out}/runs; next: lmforge scaling fit {out}")


def cmd_fit(args):
    from lmforge.scaling.report import fit_sweep

    for line in fit_sweep(args.dir, bootstrap=args.bootstrap, level=args.level, seed=args.seed):
        print(line)


def cmd_predict(args):
    from lmforge.scaling.report import predict_lines

    if (args.flops is None) == (args.params is None and args.tokens is None):
        raise LmforgeError("give --flops C, or --params N and --tokens D")
    if args.flops is None and (args.params is None or args.tokens is None):
        raise LmforgeError("--params and --tokens go together (a loss needs both a size and a token count)")
    for line in predict_lines(args.dir, flops=args.flops, params=args.params, tokens=args.tokens, level=args.level):
        print(line)


def add_commands(sub) -> None:
    from lmforge.cli.common import add_train_args
    from lmforge.scaling.options import SWEEP_FIXED, SWEEP_TRAIN_DEFAULTS, SweepOptions

    p = sub.add_parser("scaling", help="scaling laws: IsoFLOP sweep, Chinchilla fits, predictions")
    ssub = p.add_subparsers(dest="scaling_command", metavar="ACTION")

    s = ssub.add_parser("sweep", help="train an IsoFLOP grid of model sizes for each compute budget")
    s.add_argument("--data-dir", required=True, help="folder written by `lmforge data prepare`")
    s.add_argument("--out", required=True, metavar="DIR", help="sweep folder (runs/<budget>/d<depth>, sweep.json)")
    s.add_argument("--flops", type=float_list, default=None, metavar="C1,C2,...",
                   help="compute budgets in FLOPs (default: the preset's)")
    s.add_argument("--models", type=depth_list, default=None, metavar="D1,D2,...",
                   help="depths of the dial trained at every budget (default: --sizes depths per budget, "
                        "centred on the expected optimum)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the grid, its FLOPs and the wall time estimated from a few measured steps; "
                        "train nothing")
    add_options(s.add_argument_group("sweep"), SweepOptions)
    add_train_args(s, defaults=SWEEP_TRAIN_DEFAULTS, skip=SWEEP_FIXED)
    s.set_defaults(func=cmd_sweep)

    f = ssub.add_parser("fit", help="fit Chinchilla's three approaches to a sweep's runs; plots in DIR")
    f.add_argument("dir", metavar="DIR", help="a sweep folder")
    f.add_argument("--bootstrap", type=positive_int, default=200, help="bootstrap resamples for the intervals")
    f.add_argument("--level", type=coverage, default=0.9, help="interval coverage (default 0.9)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_fit)

    r = ssub.add_parser("predict", help="the loss of a run before it trains, or the compute-optimal size for a budget")
    r.add_argument("dir", metavar="DIR", help="a sweep folder fitted by `lmforge scaling fit`")
    r.add_argument("--flops", type=positive_float, default=None, metavar="C", help="a compute budget in FLOPs")
    r.add_argument("--params", type=positive_float, default=None, metavar="N",
                   help="matrix-multiply parameters (as `scaling sweep` counts them)")
    r.add_argument("--tokens", type=positive_float, default=None, metavar="D", help="training tokens")
    r.add_argument("--level", type=coverage, default=0.9, help="interval coverage (default 0.9)")
    r.set_defaults(func=cmd_predict)
