"""Supervised fine-tuning and its tools.

    lmforge sft --checkpoint BASE --data SOURCE[*WEIGHT] ... --out RUN [--lora-rank R ...]
    lmforge lora merge --adapter RUN_OR_ADAPTER_DIR --out MERGED [--checkpoint BASE]
    lmforge synthetic generate --task arithmetic --n 1000 --out arith.jsonl
    lmforge synthetic eval --checkpoint RUN --tasks arithmetic,letters,identity [--safety]
    lmforge tool calculator "12*(3+4)" | lmforge tool python "print(2**10)"
"""
from __future__ import annotations

import json

from lmforge.cli.common import (
    add_lora_args,
    add_options,
    add_train_args,
    lora_config,
    main_log,
    nonneg_int,
    options_from_args,
    positive_int,
    print_result,
    train_config,
)


def cmd_sft(args):
    from lmforge.common import is_main_process
    from lmforge.stages.options import SFTOptions
    from lmforge.stages.sft import sft
    from lmforge.train.distributed import cleanup_distributed

    lora = lora_config(args)
    opts = options_from_args(SFTOptions, args, checkpoint=args.checkpoint, data=args.data,
                             val_data=args.val_data or [], lora=lora)
    result = sft(opts, train_config(args), log=main_log())
    print_result(result)
    if is_main_process() and lora is not None:
        print(f"adapter: {result['adapter']}\n"
              f"merge it: lmforge lora merge --adapter {args.out_dir} --out {args.out_dir}-merged")
    cleanup_distributed()


def cmd_lora_merge(args):
    from pathlib import Path

    from lmforge.common import LmforgeError
    from lmforge.posttrain.lora import load_adapter, merge_lora, read_adapter_config
    from lmforge.train.checkpoint import (
        list_checkpoints,
        load_checkpoint_tokenizer,
        load_model,
        resolve_checkpoint,
        save_checkpoint,
    )

    meta = read_adapter_config(args.adapter)
    base = args.checkpoint or meta.get("base_checkpoint")
    if not base:
        raise LmforgeError("the adapter does not record its base model; pass --checkpoint")
    base = resolve_checkpoint(base)
    model, state = load_model(base)
    tok = load_checkpoint_tokenizer(base)
    if meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint):
        raise LmforgeError(f"adapter {meta['path']} was trained with a different tokenizer than {base}")
    load_adapter(model, meta["path"])
    merge_lora(model)
    root = Path(args.out) / "checkpoints"
    if list_checkpoints(root):
        raise LmforgeError(f"{args.out} already holds checkpoints; choose another --out")
    keep = {k: state[k] for k in ("tokenizer_fingerprint", "tokenizer_path") if k in state}
    path = save_checkpoint(root, state.get("step", 0), model, None,
                           {**keep, "merged_from": {"base": str(base), "adapter": meta["path"]}},
                           files={"tokenizer.json": (base / "tokenizer.json").read_bytes()})
    print(f"merged {len(meta['modules'])} adapters (r={meta['rank']}) into {path}")


def cmd_synthetic_generate(args):
    from lmforge.posttrain.conversations import write_jsonl
    from lmforge.posttrain.synthetic import generate_conversations

    path = write_jsonl(args.out, generate_conversations(args.task, args.n, seed=args.seed, tools=not args.no_tools))
    print(f"wrote {args.n} {args.task} conversations to {path}")


def cmd_synthetic_eval(args):
    from lmforge.stages.sft import evaluate_tasks, safety_eval
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = evaluate_tasks(model, tok, tasks, args.n, seed=args.seed, tools=not args.no_tools,
                            max_new_tokens=args.max_new_tokens, examples=args.examples)
    if args.safety:
        result["safety"] = safety_eval(model, tok)
    print(json.dumps(result, indent=2))


def cmd_tool(args):
    from lmforge.inference.tools import TOOLS

    arg = {"calculator": "expression", "python": "code"}[args.name]
    print(TOOLS[args.name]({arg: args.input}))


def add_commands(sub) -> None:
    from lmforge.stages.options import SFT_TRAIN_DEFAULTS, SFTOptions

    s = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (full or LoRA)")
    s.add_argument("--checkpoint", required=True, help="pretrained run or checkpoint folder to start from")
    s.add_argument("--data", action="append", required=True, metavar="SOURCE[*WEIGHT]",
                   help="conversations: file.jsonl / file.json (messages, alpaca or sharegpt records), "
                        "hf:NAME[:CONFIG][@SPLIT], synthetic:TASK[:N] (arithmetic, letters, identity) or "
                        "safety; repeat to mix, weight = relative sampling rate")
    s.add_argument("--val-data", action="append", metavar="SOURCE", help="held-out conversations (default: "
                   "--val-fraction of each --data source)")
    add_lora_args(s)
    g = add_train_args(s, defaults=SFT_TRAIN_DEFAULTS)
    add_options(g, SFTOptions)
    s.set_defaults(func=cmd_sft)

    lo = sub.add_parser("lora", help="LoRA adapters")
    losub = lo.add_subparsers(dest="lora_command", metavar="ACTION")
    lm = losub.add_parser("merge", help="fold adapters into the base weights: a plain checkpoint")
    lm.add_argument("--adapter", required=True, help="an sft run folder or its adapter/ folder")
    lm.add_argument("--checkpoint", help="base model (default: the one recorded in the adapter)")
    lm.add_argument("--out", required=True, help="run folder for the merged checkpoint")
    lm.set_defaults(func=cmd_lora_merge)

    sy = sub.add_parser("synthetic", help="synthetic tasks with checkable answers: data and evaluation")
    sysub = sy.add_subparsers(dest="synthetic_command", metavar="ACTION")
    sg = sysub.add_parser("generate", help="write worked examples as conversation JSONL")
    sg.add_argument("--task", required=True, choices=["arithmetic", "letters", "identity"])
    sg.add_argument("--n", type=positive_int, default=1000)
    sg.add_argument("--seed", type=int, default=0)
    sg.add_argument("--no-tools", action="store_true")
    sg.add_argument("--out", required=True)
    sg.set_defaults(func=cmd_synthetic_generate)
    se = sysub.add_parser("eval", help="exact-match accuracy on held-out problems (greedy, tools run)")
    se.add_argument("--checkpoint", required=True)
    se.add_argument("--tasks", default="arithmetic,letters,identity")
    se.add_argument("--n", type=positive_int, default=100, help="problems per task")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--max-new-tokens", type=positive_int, default=96)
    se.add_argument("--examples", type=nonneg_int, default=0, help="show this many replies per task")
    se.add_argument("--no-tools", action="store_true", help="do not run tool calls")
    se.add_argument("--safety", action="store_true", help="also refusal / over-refusal on the safety set")
    se.add_argument("--device", default="cpu")
    se.set_defaults(func=cmd_synthetic_eval)

    tl = sub.add_parser("tool", help="run one of the chat tools by hand")
    tl.add_argument("name", choices=["calculator", "python"])
    tl.add_argument("input", help="the expression or the code")
    tl.set_defaults(func=cmd_tool)
