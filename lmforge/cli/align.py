"""Preference tuning and reinforcement learning.

    lmforge reward train --checkpoint SFT --data PAIRS ... --out RM
    lmforge reward score --checkpoint RM --prompt "..." REPLY [REPLY ...]  |  --data PAIRS
    lmforge dpo  --checkpoint SFT --data PAIRS ... --out RUN [--beta 0.1] [--lora-rank R]
    lmforge grpo --checkpoint SFT --task arithmetic --out RUN [--group-size 8] [--reward-model RM]
    lmforge ppo  --checkpoint SFT --task arithmetic --out RUN

PAIRS: a .jsonl / .jsonl.gz / .json file ({prompt, chosen, rejected}, Anthropic HH transcripts or
LLaMA-Factory preference records), hf:NAME[:CONFIG][@SPLIT], or synthetic:TASK[:N].
"""
from __future__ import annotations

import argparse
import json

from lmforge.cli.common import (
    Deprecated,
    add_lora_args,
    add_options,
    add_train_args,
    lora_config,
    main_log,
    options_from_args,
    positive_int,
    print_result,
    train_config,
)
from lmforge.common import LmforgeError

PAIR_HELP = ("preference pairs: file.jsonl[.gz] / file.json ({prompt, chosen, rejected}, Anthropic HH "
             "transcripts, LLaMA-Factory records), hf:NAME[:CONFIG][@SPLIT] or synthetic:TASK[:N] "
             "(arithmetic, letters); repeat to combine")
PPO_ONLY = ("gamma", "lam", "vf_coef", "critic")  # RLOptions settings that only `lmforge ppo` takes


def rl_settings(algorithm: str) -> list[str]:
    from lmforge.cli.common import declared
    from lmforge.stages.options import RLOptions

    return [f.name for f in declared(RLOptions) if algorithm == "ppo" or f.name not in PPO_ONLY]


def _pairs(args) -> dict:
    return dict(checkpoint=args.checkpoint, data=args.data, val_data=args.val_data or [])


def cmd_reward_train(args):
    from lmforge.stages.options import PairOptions
    from lmforge.stages.reward import train_reward_model
    from lmforge.train.distributed import cleanup_distributed

    opts = options_from_args(PairOptions, args, **_pairs(args))
    print_result(train_reward_model(opts, train_config(args), log=main_log()))
    cleanup_distributed()


def cmd_reward_score(args):
    from lmforge.stages.reward import load_reward_model, score_pairs, score_replies
    from lmforge.train.checkpoint import load_checkpoint_tokenizer

    rm, _ = load_reward_model(args.checkpoint, args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    if args.data:
        if args.prompt is not None or args.replies:
            raise LmforgeError("give either --data or --prompt with replies, not both")
        print(json.dumps(score_pairs(rm, tok, args.data), indent=2))
        return
    if args.prompt is None or not args.replies:
        raise LmforgeError("give --prompt and at least one reply to score (or --data PAIRS for accuracy)")
    scores = score_replies(rm, tok, [{"role": "user", "content": args.prompt}], args.replies)
    for s, r in sorted(zip(scores, args.replies), reverse=True):
        print(f"{s:+.4f}\t{r}")


def cmd_dpo(args):
    from lmforge.stages.dpo import dpo
    from lmforge.stages.options import DPOOptions
    from lmforge.train.distributed import cleanup_distributed

    opts = options_from_args(DPOOptions, args, **_pairs(args), lora=lora_config(args))
    print_result(dpo(opts, train_config(args), log=main_log()))
    cleanup_distributed()


def cmd_rl(args):
    from lmforge.stages.options import RLOptions
    from lmforge.stages.rl import train_rl
    from lmforge.train.distributed import cleanup_distributed

    split = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    opts = options_from_args(RLOptions, args, rl_settings(args.algorithm), checkpoint=args.checkpoint,
                             algorithm=args.algorithm, tasks=split(args.task), reward_model=args.reward_model,
                             eval_tasks=split(args.eval_task) if args.eval_task else None)
    print_result(train_rl(opts, train_config(args), log=main_log()))
    cleanup_distributed()


def _pair_args(p):
    p.add_argument("--checkpoint", required=True, help="the model to start from (usually an SFT run)")
    p.add_argument("--data", action="append", required=True, metavar="PAIRS", help=PAIR_HELP)
    p.add_argument("--val-data", action="append", metavar="PAIRS", help="held-out pairs (default: "
                   "--val-fraction of each --data source)")


def add_commands(sub) -> None:
    from lmforge.stages import options

    rw = sub.add_parser("reward", help="reward model: train on preference pairs (Bradley-Terry), score replies")
    rwsub = rw.add_subparsers(dest="reward_command", metavar="ACTION")
    rt = rwsub.add_parser("train", help="train a scalar-head reward model; reports held-out pairwise accuracy")
    _pair_args(rt)
    add_options(add_train_args(rt, defaults=options.REWARD_TRAIN_DEFAULTS), options.PairOptions)
    rt.set_defaults(func=cmd_reward_train)
    rs = rwsub.add_parser("score", help="score replies to a prompt, or pairwise accuracy on --data")
    rs.add_argument("--checkpoint", required=True, help="a `lmforge reward train` run")
    rs.add_argument("--prompt", help="the user's message")
    rs.add_argument("replies", nargs="*", help="replies to score (printed best first)")
    rs.add_argument("--data", action="append", metavar="PAIRS", help=PAIR_HELP)
    rs.add_argument("--device", default="cpu")
    rs.set_defaults(func=cmd_reward_score)

    d = sub.add_parser("dpo", help="direct preference optimisation against a frozen reference (full or LoRA)")
    _pair_args(d)
    add_lora_args(d)
    add_options(add_train_args(d, defaults=options.DPO_TRAIN_DEFAULTS), options.DPOOptions)
    d.set_defaults(func=cmd_dpo)

    for algo, text in (("grpo", "GRPO: group-normalised advantages, no value model, KL penalty to the reference"),
                       ("ppo", "PPO: learned value head, GAE advantages, KL penalty in the reward")):
        r = sub.add_parser(algo, help=f"RL with verifiable rewards — {text}")
        r.add_argument("--checkpoint", required=True, help="the policy to start from (usually an SFT run)")
        r.add_argument("--task", default="arithmetic", help="prompt sources, comma-separated: synthetic tasks "
                       "(arithmetic, letters, identity; arithmetic:DIGITS[:OPS] for smaller problems, e.g. "
                       "arithmetic:2:+-) or gsm8k:PATH.jsonl")
        r.add_argument("--eval-task", help="held-out sources (default: the test split of --task)")
        r.add_argument("--reward-model", help="score replies with this `lmforge reward train` run instead of "
                       "the checker (accuracy is still the checker's)")
        g = add_train_args(r, defaults=options.RL_TRAIN_DEFAULTS)
        add_options(g, options.RLOptions, rl_settings(algo),
                    defaults={"kl_beta": options.KL_BETA[algo]})
        # Before --prompts-per-step, --batch-size meant prompts per rollout here (elsewhere: sequences).
        g.add_argument("--batch-size", dest="prompts_per_step", type=positive_int, action=Deprecated,
                       new="--prompts-per-step", help=argparse.SUPPRESS)
        r.set_defaults(func=cmd_rl, algorithm=algo)


