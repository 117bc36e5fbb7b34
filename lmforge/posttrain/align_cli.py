"""`lmforge` subcommands of preference tuning and RL (see lmforge.cli.STAGE_COMMANDS).

    lmforge reward train --checkpoint SFT --data PAIRS ... --out RM
    lmforge reward score --checkpoint RM --prompt "..." REPLY [REPLY ...]  |  --data PAIRS
    lmforge dpo  --checkpoint SFT --data PAIRS ... --out RUN [--beta 0.1] [--lora-rank R]
    lmforge grpo --checkpoint SFT --task arithmetic --out RUN [--group-size 8] [--reward-model RM]
    lmforge ppo  --checkpoint SFT --task arithmetic --out RUN

PAIRS: a .jsonl / .jsonl.gz / .json file ({prompt, chosen, rejected}, Anthropic HH transcripts or
LLaMA-Factory preference records), hf:NAME[:CONFIG][@SPLIT], or synthetic:TASK[:N].
"""
from __future__ import annotations

import json

PAIR_HELP = ("preference pairs: file.jsonl[.gz] / file.json ({prompt, chosen, rejected}, Anthropic HH "
             "transcripts, LLaMA-Factory records), hf:NAME[:CONFIG][@SPLIT] or synthetic:TASK[:N] "
             "(arithmetic, letters); repeat to combine")


def _print_result(result: dict):
    from lmforge.common import is_main_process

    if is_main_process():
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, indent=2))


def _log():
    from lmforge.common import is_main_process

    return print if is_main_process() else (lambda *a: None)


def cmd_reward_train(args):
    from lmforge.cli import train_config
    from lmforge.posttrain.reward import PairOptions, train_reward_model
    from lmforge.train.loop import cleanup_distributed

    opts = PairOptions(checkpoint=args.checkpoint, data=args.data, val_data=args.val_data or [],
                       val_fraction=args.val_fraction, max_val=args.max_val, batch_size=args.batch_size,
                       seq_len=args.seq_len, skip_invalid=args.skip_invalid, resume=args.resume)
    _print_result(train_reward_model(opts, train_config(args, args.out), log=_log()))
    cleanup_distributed()


def cmd_reward_score(args):
    from lmforge.common import LmforgeError
    from lmforge.posttrain.reward import load_reward_model, score_pairs, score_replies
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
    from lmforge.cli import train_config
    from lmforge.common import LmforgeError
    from lmforge.posttrain.dpo import DPOOptions, dpo
    from lmforge.train.loop import cleanup_distributed

    lora = None
    if args.lora_rank:
        from lmforge.posttrain.lora import LoRAConfig

        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          targets=args.lora_targets)
    elif args.lora_alpha is not None or args.lora_targets != "q_proj,v_proj":
        raise LmforgeError("--lora-alpha / --lora-targets need --lora-rank")
    opts = DPOOptions(checkpoint=args.checkpoint, data=args.data, val_data=args.val_data or [],
                      val_fraction=args.val_fraction, max_val=args.max_val, batch_size=args.batch_size,
                      seq_len=args.seq_len, skip_invalid=args.skip_invalid, resume=args.resume, beta=args.beta,
                      lora=lora)
    _print_result(dpo(opts, train_config(args, args.out), log=_log()))
    cleanup_distributed()


def cmd_rl(args):
    from lmforge.cli import train_config
    from lmforge.posttrain.rl import RLOptions, train_rl
    from lmforge.train.loop import cleanup_distributed

    split = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    opts = RLOptions(checkpoint=args.checkpoint, algorithm=args.algorithm, tasks=split(args.task),
                     eval_tasks=split(args.eval_task) if args.eval_task else None, reward_model=args.reward_model,
                     prompts_per_step=args.batch_size, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, tools=args.tools, temperature=args.temperature,
                     top_p=args.top_p, clip=args.clip, kl_beta=args.kl_beta,
                     updates_per_rollout=args.updates_per_rollout,
                     gamma=getattr(args, "gamma", 1.0), lam=getattr(args, "lam", 0.95),
                     vf_coef=getattr(args, "vf_coef", 0.5), critic=getattr(args, "critic", "separate"),
                     eval_n=args.eval_n, resume=args.resume)
    _print_result(train_rl(opts, train_config(args, args.out), log=_log()))
    cleanup_distributed()


def _pair_args(p):
    from lmforge.cli import fraction, positive_int

    p.add_argument("--checkpoint", required=True, help="the model to start from (usually an SFT run)")
    p.add_argument("--data", action="append", required=True, metavar="PAIRS", help=PAIR_HELP)
    p.add_argument("--val-data", action="append", metavar="PAIRS", help="held-out pairs (default: "
                   "--val-fraction of each --data source)")
    p.add_argument("--val-fraction", type=fraction, default=0.05)
    p.add_argument("--max-val", type=positive_int, default=512, help="held-out pairs evaluated at most")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed records (counted and reported)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, loss.png)")


def add_commands(sub) -> None:
    """Add reward / dpo / grpo / ppo subcommands to the `lmforge` parser's subparsers."""
    from lmforge.cli import add_train_args, checked, positive_float, positive_int, temperature_value, top_p_value

    unit = checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")

    rw = sub.add_parser("reward", help="reward model: train on preference pairs (Bradley-Terry), score replies")
    rwsub = rw.add_subparsers(dest="reward_command", metavar="ACTION")
    rt = rwsub.add_parser("train", help="train a scalar-head reward model; reports held-out pairwise accuracy")
    _pair_args(rt)
    add_train_args(rt, max_steps=300)
    rt.set_defaults(func=cmd_reward_train, optimizer="adamw", lr=1e-4, warmup_steps=10, eval_every=100,
                    ckpt_every=250, schedule="cosine", min_lr_frac=0.1, batch_size=8, compile="off")
    rs = rwsub.add_parser("score", help="score replies to a prompt, or pairwise accuracy on --data")
    rs.add_argument("--checkpoint", required=True, help="a `lmforge reward train` run")
    rs.add_argument("--prompt", help="the user's message")
    rs.add_argument("replies", nargs="*", help="replies to score (printed best first)")
    rs.add_argument("--data", action="append", metavar="PAIRS", help=PAIR_HELP)
    rs.add_argument("--device", default="cpu")
    rs.set_defaults(func=cmd_reward_score)

    d = sub.add_parser("dpo", help="direct preference optimisation against a frozen reference (full or LoRA)")
    _pair_args(d)
    d.add_argument("--beta", type=positive_float, default=0.1, help="strength of the pull towards the reference")
    g = d.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=positive_int, help="train rank-R adapters instead of all weights")
    g.add_argument("--lora-alpha", type=positive_float, help="adapter scale alpha/R (default alpha = 2R)")
    g.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated linear layer names, or 'all'")
    add_train_args(d, max_steps=200)
    d.set_defaults(func=cmd_dpo, optimizer="adamw", lr=5e-5, warmup_steps=10, eval_every=50, ckpt_every=250,
                   schedule="cosine", min_lr_frac=0.1, batch_size=8, compile="off")

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
        r.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, loss.png)")
        r.add_argument("--group-size", type=positive_int, default=8, help="sampled replies per prompt")
        r.add_argument("--max-new-tokens", type=positive_int, default=32, help="the policy's own tokens per reply")
        r.add_argument("--tools", action="store_true", help="run the tools the policy calls (calculator, python) "
                       "in rollouts and evaluation; tool results are not actions")
        r.add_argument("--temperature", type=temperature_value, default=1.0)
        r.add_argument("--top-p", type=top_p_value, default=None)
        r.add_argument("--clip", type=positive_float, default=0.2, help="PPO ratio clip epsilon")
        r.add_argument("--kl-beta", type=checked(float, lambda v: v >= 0, "a number >= 0"),
                       default=0.04 if algo == "grpo" else 0.05,
                       help="weight of the KL penalty to the reference")
        r.add_argument("--updates-per-rollout", type=positive_int, default=1,
                       help="optimizer steps on each rollout (>1: the clipping matters)")
        r.add_argument("--eval-n", type=positive_int, default=100, help="held-out problems per task")
        if algo == "ppo":
            r.add_argument("--gamma", type=positive_float, default=1.0)
            r.add_argument("--lam", type=unit, default=0.95, help="GAE lambda")
            r.add_argument("--vf-coef", type=positive_float, default=0.5, help="value-loss weight")
            r.add_argument("--critic", choices=["separate", "shared"], default="separate",
                           help="value head on its own copy of the trunk (classic PPO) or on the policy's")
        add_train_args(r, max_steps=100)
        r.set_defaults(func=cmd_rl, algorithm=algo, optimizer="adamw", lr=1e-5, warmup_steps=5, eval_every=25,
                       ckpt_every=50, schedule="constant", log_every=1, batch_size=8, grad_clip=1.0, compile="off")
        _set_help(r, "batch_size", "prompts per rollout (each gets --group-size replies)")
    _set_help(rt, "batch_size", "preference pairs per micro-batch per process")
    _set_help(d, "batch_size", "preference pairs per micro-batch per process")


def _set_help(parser, dest: str, text: str):
    for action in parser._actions:
        if action.dest == dest:
            action.help = text
