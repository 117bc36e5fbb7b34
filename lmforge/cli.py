"""The `lmforge` command line: one subcommand per pipeline stage.

    lmforge speedrun                      tokenizer -> shards -> pretrain -> sample (presets cpu, gpu-1, gpu-8)
    lmforge tokenizer train|encode|decode|export-hf
    lmforge data prepare
    lmforge pretrain
    lmforge sample | generate | chat      text from a checkpoint (KV-cached engine)
    lmforge score
    lmforge export --format hf | arpa, import            Hugging Face interop, ARPA n-gram files
    lmforge quantize                                     weight-only int8 / int4

Errors caused by input (missing files, mismatched tokenizer, bad option values) print one line
starting with `error:` and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lmforge.common import LmforgeError, default_device

# ----------------------------------------------------------------------------- argument types


def checked(cast, ok, expected: str):
    """An argparse type: parse with `cast`, accept when ok(value) (NaN never passes), else a one-line
    error saying what was expected."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "an integer >= 0")
fraction = checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
temperature_value = checked(float, lambda v: 0 <= v < float("inf"), "a temperature >= 0 (0 = greedy)")
top_p_value = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
positive_float = checked(float, lambda v: 0 < v < float("inf"), "a positive number")
# torch.Generator.manual_seed takes any integer from -2**63 to 2**64 - 1.
seed_value = checked(int, lambda v: -2**63 <= v < 2**64, "an integer seed that fits in 64 bits")


def parse_model_sets(pairs: list[str], family: str | None = None) -> dict:
    """`--set key=value` overrides for fields of a model family's config, typed by the dataclass field."""
    from lmforge.models.registry import get_family

    types = {f.name: f.type for f in dataclasses.fields(get_family(family).config_class)}
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise LmforgeError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in types:
            raise LmforgeError(f"--set: unknown model field {key!r}; fields: {', '.join(types)}")
        t = str(types[key])
        try:
            if "bool" in t:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            elif "int" in t:
                out[key] = None if value.lower() == "none" else int(value)
            elif "float" in t:
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise LmforgeError(f"--set {key}: cannot parse {value!r} as {t}") from None
    return out


# ----------------------------------------------------------------------------- shared option groups


def add_model_args(p: argparse.ArgumentParser, default_preset: str | None = None, flag: str = "--preset",
                   family: bool = False):
    from lmforge.models.registry import family_names

    g = p.add_argument_group("model")
    if family:
        g.add_argument("--arch", default="transformer", choices=family_names(),
                       help="model family (default transformer); presets are per family")
    g.add_argument(flag, dest="preset", default=default_preset,
                   help="the family's model preset (transformer: tiny, cpu (default), gpt2-classic, d12, d20; "
                        "lstm: tiny, cpu; ngram: unigram, bigram, trigram, kn3, kn5, kn7, ...)")
    p.set_defaults(preset_flag=flag)
    g.add_argument("--n-layer", type=positive_int)
    g.add_argument("--n-head", type=positive_int)
    g.add_argument("--n-kv-head", type=positive_int)
    g.add_argument("--n-embd", type=positive_int)
    g.add_argument("--block-size", type=positive_int, help="context window in tokens")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any model config field, e.g. --set mlp=gelu --set qk_norm=false")


def model_overrides(args) -> dict:
    """The model fields set on the command line, checked against the chosen family's config."""
    from lmforge.models.registry import get_family

    family = get_family(getattr(args, "arch", None))
    known = {f.name for f in dataclasses.fields(family.config_class)}
    o = {"n_layer": args.n_layer, "n_head": args.n_head, "n_kv_head": args.n_kv_head,
         "n_embd": args.n_embd, "block_size": args.block_size}
    preset = getattr(args, "preset", None)
    if preset is not None and preset not in family.presets:
        raise LmforgeError(f"{args.preset_flag} {preset}: not a {family.name} preset; "
                           f"choose from {', '.join(family.presets)}")
    o = {k: v for k, v in o.items() if v is not None}
    for k in o:
        if k not in known:
            raise LmforgeError(f"--{k.replace('_', '-')} does not apply to the {family.name} family "
                               f"(its fields: {', '.join(sorted(known))})")
    o.update(parse_model_sets(args.set, family.name))
    return o


def add_train_args(p: argparse.ArgumentParser, *, max_steps: int = 1000):
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=8, help="sequences per micro-batch per process")
    g.add_argument("--seq-len", type=positive_int, help="training sequence length (default: block size)")
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--max-steps", type=positive_int, default=max_steps)
    g.add_argument("--time-budget", type=positive_float, help="seconds of training; the LR schedule follows the clock")
    g.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    g.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate")
    g.add_argument("--muon-lr", type=positive_float, default=0.02)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=nonneg_int, default=20)
    g.add_argument("--schedule", choices=["wsd", "cosine", "constant"], default="wsd")
    g.add_argument("--decay-frac", type=fraction, default=0.4, help="wsd: fraction of the run spent decaying")
    g.add_argument("--min-lr-frac", type=fraction, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=nonneg_int, default=250)
    g.add_argument("--eval-tokens", type=positive_int, default=65536)
    g.add_argument("--ckpt-every", type=nonneg_int, default=500)
    g.add_argument("--log-every", type=positive_int, default=10)
    g.add_argument("--seed", type=seed_value, default=1337)
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the training step; auto = on CUDA, and on CPU unless the model has dropout "
                        "(falls back to eager with a warning if compiling fails; see docs/benchmarks.md)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def train_config(args, out_dir: str):
    from lmforge.train.loop import TrainConfig

    return TrainConfig(
        out_dir=out_dir, max_steps=args.max_steps, time_budget=args.time_budget, grad_accum=args.grad_accum,
        optimizer=args.optimizer, lr=args.lr, muon_lr=args.muon_lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, schedule=args.schedule, decay_frac=args.decay_frac,
        min_lr_frac=args.min_lr_frac, grad_clip=args.grad_clip, eval_every=args.eval_every,
        ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed, dtype=args.dtype, compile=args.compile,
        device=args.device, progress=not args.no_progress)


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200)
    p.add_argument("--temperature", type=temperature_value, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=top_p_value, default=0.95)
    p.add_argument("--min-p", type=top_p_value, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=positive_float, default=None)
    p.add_argument("--seed", type=seed_value, default=None)


# ----------------------------------------------------------------------------- commands


def cmd_tokenizer_train(args):
    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import Tokenizer

    docs = iter_documents(args.data, text_field=args.text_field, max_chars=args.max_chars)
    tok = Tokenizer.train(docs, args.vocab_size, show_progress=not args.no_progress)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} ids ({tok.n_merges} merges) -> {args.out}")


def _read_text_arg(text: str | None) -> str:
    if text is not None:
        return text
    if sys.stdin.isatty():
        raise LmforgeError("give the text as an argument or on standard input")
    return sys.stdin.read()


def cmd_tokenizer_encode(args):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(" ".join(map(str, tok.encode(_read_text_arg(args.text)))))


def cmd_tokenizer_decode(args):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = " ".join(args.ids) if args.ids else _read_text_arg(None)
    try:
        ids = [int(t) for t in raw.replace(",", " ").split()]
    except ValueError:
        raise LmforgeError("decode expects integer token ids separated by spaces or commas") from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise LmforgeError(f"token ids out of range 0..{tok.vocab_size - 1}: {bad[:5]}")
    sys.stdout.write(tok.decode(ids) + "\n")


def cmd_tokenizer_export_hf(args):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.export_hf(out / "tokenizer.json")
    print(f"wrote {out / 'tokenizer.json'}")


def cmd_data_prepare(args):
    from lmforge.data.prepare import prepare_shards

    m = prepare_shards(args.data, args.tokenizer, args.out, val_fraction=args.val_fraction,
                       text_field=args.text_field, max_chars=args.max_chars, workers=args.workers,
                       show_progress=not args.no_progress)
    splits = ", ".join(f"{k}: {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in m["splits"].items())
    print(f"shards in {args.out} ({splits})")


def cmd_pretrain(args):
    from lmforge.train.pretrain import PretrainOptions, pretrain

    if args.dry_run:
        return print_training_estimate(args)
    opts = PretrainOptions(data_dir=args.data_dir, model=args.arch, preset=args.preset,
                           model_overrides=model_overrides(args),
                           batch_size=args.batch_size, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                           resume=args.resume)
    result = pretrain(opts, train_config(args, args.out))
    from lmforge.common import is_main_process

    if is_main_process():
        summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        print(json.dumps(summary, indent=2))
    from lmforge.train.loop import cleanup_distributed

    cleanup_distributed()


def print_training_estimate(args):
    """`pretrain --dry-run`: what a step costs, per device, before any memory is spent on it."""
    from lmforge.common import dist_info
    from lmforge.models.transformer import get_config
    from lmforge.train.budget import training_footprint
    from lmforge.train.pretrain import load_data_tokenizer

    if args.arch != "transformer":
        raise LmforgeError(f"--dry-run estimates the transformer family only, not {args.arch}")
    tok, _ = load_data_tokenizer(args.data_dir)
    cfg = get_config(args.preset, **{**model_overrides(args), "vocab_size": tok.vocab_size})
    seq_len = args.seq_len or cfg.block_size
    world = dist_info()[2]
    f = training_footprint(cfg, batch_size=args.batch_size, seq_len=seq_len, grad_accum=args.grad_accum,
                           world=world, optimizer=args.optimizer)
    gib = 2.0 ** 30
    print(f"model: {args.preset}, {f.params / 1e6:.2f}M parameters, context {cfg.block_size}")
    print(f"batch: {args.batch_size} sequences x {seq_len} tokens x {args.grad_accum} accumulation steps x "
          f"{world} processes = {args.batch_size * seq_len * args.grad_accum * world:,} tokens per step")
    print(f"memory per device (estimate): {f.total / gib:.2f} GiB = weights {f.weights / gib:.2f} + gradients "
          f"{f.gradients / gib:.2f} + optimizer {f.optimizer / gib:.2f} + activations {f.activations / gib:.2f}")
    print(f"compute: {f.flops_per_step / 1e12:.2f} TFLOP per step (all devices)")


def _sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=getattr(args, "min_p", None), repetition_penalty=getattr(args, "repetition_penalty", None))


def _print_sample(model, tok, prompt: str, args, n: int = 1):
    """n samples continuing `prompt` from a document start, each streamed as it is generated."""
    from lmforge.engine import Engine

    engine = Engine(model, tok)
    ids = [tok.bos_id] + tok.encode(prompt)
    for i in range(n):
        seed = None if args.seed is None else (args.seed + i) % 2**64
        if n > 1:
            print(f"--- sample {i + 1}")
        print(prompt, end="", flush=True)
        for piece in engine.stream(ids, args.max_new_tokens, seed=seed, stop_ids=[tok.bos_id],
                                   **_sampling_kwargs(args)):
            print(piece, end="", flush=True)
        print()


def cmd_generate(args):
    """One-shot completion for scripts: prints only the generated text."""
    from lmforge.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    prompt = _read_text_arg(args.prompt)
    if args.chat:
        from lmforge.chat import render_messages

        ids = render_messages(tok, [{"role": "user", "content": prompt}])
    else:
        ids = [tok.bos_id] + tok.encode(prompt)
    engine = Engine(model, tok)
    for piece in engine.stream(ids, args.max_new_tokens, seed=args.seed, stop_strings=args.stop or (),
                               **_sampling_kwargs(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


CHAT_HELP = "commands: /reset (new conversation), /temperature X, /quit"


def fit_history(tok, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt or the newest message) until the rendered
    conversation plus room for the reply fits in `budget` tokens."""
    from lmforge.chat import render_messages

    msgs = list(messages)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    while len(rest) > 1 and len(render_messages(tok, system + rest)) > budget:
        rest = rest[1:]
    return system + rest


def cmd_chat(args):
    """A multi-turn chat in the terminal, streamed through the chat template. With tools (the default
    for a model fine-tuned to call them), each reply runs through the tool loop and shows the calls
    the model makes and their results."""
    from lmforge.chat import render_messages
    from lmforge.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model, trained_with_tools

    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    use_tools = trained_with_tools(args.checkpoint) if args.tools is None else args.tools
    engine = Engine(model, tok)
    from lmforge.models.protocol import tokens_left

    window = tokens_left(model, 0)  # the context window (unbounded for an LSTM or an n-gram)
    reply_room = min(args.max_new_tokens, window // 2)
    context = f"{window}-token context" if model.context_limit else "no context limit"
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    sampling = _sampling_kwargs(args)
    interactive = sys.stdin.isatty()
    print(f"lmforge chat ({context}{', tools run' if use_tools else ''}). {CHAT_HELP}",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/reset":
                history = list(system)
                print("(new conversation)", file=sys.stderr)
            elif cmd == "/temperature":
                try:
                    sampling["temperature"] = temperature_value(arg.strip())
                    print(f"(temperature {sampling['temperature']})", file=sys.stderr)
                except argparse.ArgumentTypeError as e:
                    print(f"(error: {e})", file=sys.stderr)
            else:
                print(f"(unknown command {cmd}; {CHAT_HELP})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        history = fit_history(tok, history, window - reply_room)
        ids = render_messages(tok, history)
        if len(ids) >= window:
            print(f"(error: that message is {len(ids)} tokens; the context window is {window})", file=sys.stderr)
            history.pop()
            continue
        print("assistant> " if interactive else "", end="", flush=True)
        if use_tools:
            history += _chat_reply_with_tools(engine, history, reply_room, args.seed, sampling)
            continue
        pieces = []
        for piece in engine.stream(ids, reply_room, seed=args.seed, **sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})


def _chat_reply_with_tools(engine, history: list[dict], max_new_tokens: int, seed, sampling: dict) -> list[dict]:
    """One reply through the tool loop, printed as it went: content, each call and its result, the
    answer. Returns the reply's messages (assistant turns with their calls, tool results)."""
    from lmforge.posttrain.tools import generate_with_tools

    result = generate_with_tools(engine, history, max_new_tokens=max_new_tokens, seed=seed, **sampling)
    for m in result.messages:
        if m["role"] == "tool":
            print(f"[tool result] {m['content']}", flush=True)
            continue
        if m.get("content"):
            print(m["content"], flush=True)
        for call in m.get("tool_calls") or []:
            print(f"[tool call] {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}", flush=True)
    if not result.messages or result.messages[-1]["role"] != "assistant" or not result.messages[-1]["content"]:
        print(flush=True)  # every reply ends its line, even an empty one
    if result.finish_reason == "max_calls":
        print("(the reply stopped: too many tool calls in one turn)", file=sys.stderr)
    return result.messages


def cmd_sample(args):
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    prompt = args.prompt if args.prompt is not None else ""
    _print_sample(model, tok, prompt, args, args.num_samples)


def cmd_score(args):
    from lmforge.sampling import rank_texts
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    model, _ = load_model(args.checkpoint, device=args.device)
    tok = load_checkpoint_tokenizer(args.checkpoint)
    texts = args.texts or [_read_text_arg(None)]
    ranked = rank_texts(model, tok, texts)
    if args.json:
        print(json.dumps([{"text": s.text, "logprob": s.logprob, "perplexity": s.perplexity,
                           "tokens": [{"token": t, "logprob": lp} for t, lp in s.token_logprobs]}
                          for s in ranked], indent=2))
        return
    if len(ranked) == 1 or args.verbose:
        for s in ranked:
            print(f"{s.text!r}")
            for piece, lp in s.token_logprobs:
                print(f"  {piece!r:>20} {lp:9.4f}")
    print(f"{'rank':>4}  {'log p':>10}  {'ppl':>9}  text")
    for i, s in enumerate(ranked, 1):
        print(f"{i:>4}  {s.logprob:10.3f}  {s.perplexity:9.2f}  {s.text}")


SPEEDRUN_STAGES = ("tokenizer", "data", "pretrain", "sft", "rl", "eval", "report")


def cmd_speedrun(args):
    """The main job: every stage in order under one run folder. Options left unset come from the
    speedrun preset (lmforge/speedrun.py). Finished stages are reused, an interrupted one resumes."""
    import time
    from dataclasses import replace

    from lmforge.data.prepare import load_manifest, prepare_shards
    from lmforge.data.sources import iter_documents
    from lmforge.models.transformer import get_config
    from lmforge.speedrun import (
        check_preset,
        eval_stage,
        get_speedrun_preset,
        rl_stage,
        save_stage,
        sft_stage,
        stage_record,
        start_stage,
        write_report,
    )
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import PretrainOptions, pretrain

    t_start = time.perf_counter()
    if args.val_fraction == 0:  # refused before any stage runs, not after pretraining
        raise LmforgeError("--val-fraction 0 leaves no validation data, but the speedrun reports the "
                           "pretrained model's validation bits per byte; give a fraction > 0 (default 0.05)")
    preset = get_speedrun_preset(args.speedrun_preset)
    overrides = {k: getattr(args, k) for k in ("sft_steps", "sft_time_budget", "rl_steps", "rl_time_budget",
                                                "eval_limit", "task_eval_n") if getattr(args, k) is not None}
    preset = replace(preset, **overrides)
    for name in ("data", "max_chars", "vocab_size", "tokenizer_chars", "batch_size", "max_steps", "time_budget"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    args.preset = args.preset or preset.model
    if args.seq_len is None:
        args.seq_len = min(preset.seq_len, get_config(args.preset, **model_overrides(args)).block_size)
    if args.device == "auto" and preset.device != "cpu":
        args.device = preset.device
    if args.grad_accum is None:
        # Keep the preset's tokens per step whatever the micro-batch: accumulate the difference.
        args.grad_accum = max(1, preset.total_batch_tokens // (args.batch_size * args.seq_len * preset.nproc))
    if preset.gpu_memory_gib is not None:
        check_preset(preset)  # fail before the tokenizer and data stages spend hours, not after
    last = SPEEDRUN_STAGES.index(args.stop_after)
    python_tool = True
    if last >= SPEEDRUN_STAGES.index("sft"):
        # SFT's letter counting and the tool loops run model-written Python, only ever in the sandbox:
        # where it cannot be built, say so now and leave those out (never run the code unsandboxed).
        from lmforge.posttrain.sandbox import sandbox_problem

        problem = sandbox_problem()
        if problem:
            python_tool = False
            print(f"note: {problem}\n      so the sft and rl stages leave out the python tool: no letter "
                  "counting; arithmetic with the calculator only", flush=True)
    n_stages = last + 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path, data_dir, run_dir = out / "tokenizer.json", out / "data", out / "pretrain"
    source = args.data
    stages: dict[str, dict] = {}

    def head(i: int, text: str):
        print(f"[{i}/{n_stages}] {text}", flush=True)

    print(f"speedrun preset {preset.name}: model {args.preset}, data {source}; {args.batch_size} sequences x "
          f"{args.seq_len} tokens x {args.grad_accum} accumulation steps x {preset.nproc} processes = "
          f"{args.batch_size * args.seq_len * args.grad_accum * preset.nproc:,} tokens per step")
    # 1. tokenizer
    if tok_path.is_file():
        tok = Tokenizer.load(tok_path)
        head(1, f"tokenizer: reusing {tok_path} ({tok.vocab_size} ids)")
    else:
        head(1, f"tokenizer: byte-level BPE, vocab {args.vocab_size}, on {source}")
        tok = Tokenizer.train(iter_documents(source, max_chars=args.max_chars), args.vocab_size,
                              show_progress=not args.no_progress, max_chars=args.tokenizer_chars)
        tok.save(tok_path)
    if last < 1:
        return
    # 2. data
    try:
        m = load_manifest(data_dir)
        reuse = (m.get("tokenizer_fingerprint") == tok.fingerprint and m.get("source") == str(source)
                 and m.get("max_chars") == args.max_chars)
    except LmforgeError:
        reuse = False
    if reuse:
        head(2, f"data: reusing shards in {data_dir}")
    else:
        head(2, f"data: tokenizing into shards in {data_dir}")
        m = prepare_shards(source, tok_path, data_dir, val_fraction=args.val_fraction,
                           max_chars=args.max_chars, show_progress=not args.no_progress)
    print("      " + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in m["splits"].items()))
    sp = m["splits"]
    stages["tokenizer"] = {"vocab_size": tok.vocab_size,
                           "bytes_per_token": sum(v.get("bytes", 0) for v in sp.values()) /
                           max(1, sum(v["tokens"] for v in sp.values()))}
    stages["data"] = {"train_tokens": sp["train"]["tokens"], "val_tokens": sp.get("val", {}).get("tokens", 0)}
    if not stages["data"]["val_tokens"]:
        raise LmforgeError(f"the shards in {data_dir} have no validation tokens, but the speedrun reports the "
                           "pretrained model's validation bits per byte; use a larger --val-fraction or more data")
    if last < 2:
        return
    # 3. pretrain
    budget_flags = ("--max-steps", "--time-budget")
    argv = pretrain_argv(args, data_dir, run_dir, False)
    origin = {"argv": [a for i, a in enumerate(argv) if a not in budget_flags and argv[i - 1] not in budget_flags],
              "tokenizer": tok.fingerprint, "data": m.get("splits")}
    key = {"origin": origin, "budget": [args.max_steps, args.time_budget]}
    rec = stage_record(out, "pretrain", key)
    if rec:
        head(3, f"pretrain: reusing {rec['checkpoint']} ({rec['val_bpb']:.4f} bits/byte)")
    else:
        resume = start_stage(out, "pretrain", origin)
        head(3, f"pretrain: model {args.preset}" + (" (resuming)" if resume else ""))
        if preset.nproc > 1:
            _pretrain_under_torchrun(args, preset.nproc, data_dir, run_dir, resume)
            result = _final_metrics(run_dir)
        else:
            opts = PretrainOptions(data_dir=str(data_dir), preset=args.preset, model_overrides=model_overrides(args),
                                   batch_size=args.batch_size, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                                   resume=resume)
            result = pretrain(opts, train_config(args, str(run_dir)))
            print("      sample:")
            _print_sample(result["model"].eval(), result["tokenizer"], args.prompt,
                          argparse.Namespace(**{**vars(args), "seed": args.sample_seed or 0}))
            result["checkpoint"] = str(result["checkpoint"])
            result["params"] = result["model"].num_params()
        rec = save_stage(out, "pretrain", key, {k: result.get(k) for k in (
            "checkpoint", "step", "tokens", "train_time", "val_loss", "val_bpb", "params")} | {
            "device": default_device() if args.device == "auto" else args.device})
        print(f"      val loss {rec['val_loss']:.4f} nats/token, {rec['val_bpb']:.4f} bits/byte after "
              f"{rec['tokens']:,} tokens; loss curve {run_dir / 'loss.png'}")
    stages["pretrain"] = prev = rec
    post = dict(seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                python_tool=python_tool)
    # 4. SFT, 5. RL: each starts from the previous stage's model
    for i, stage, run_stage, what in ((4, "sft", sft_stage, "chat, tool use and safety"),
                                      (5, "rl", rl_stage, f"GRPO with tools on {preset.rl_task}")):
        if last < i - 1:
            break
        settings = _stage_settings(preset, stage)
        if not python_tool:  # another stage than with the tool: never reused for one
            settings["python_tool"] = False
        budget = {k: settings.pop(k) for k in (f"{stage}_steps", f"{stage}_time_budget")}
        origin = {"input": prev["checkpoint"], "input_finished": prev["finished"], "settings": settings,
                  "seed": args.seed}
        key = {"origin": origin, "budget": budget}
        rec = stage_record(out, stage, key)
        if rec:
            head(i, f"{stage}: reusing {rec['checkpoint']}")
        else:
            resume = start_stage(out, stage, origin)
            head(i, f"{stage}: {what}, from {prev['checkpoint']}" + (" (resuming)" if resume else ""))
            rec = save_stage(out, stage, key, run_stage(preset, prev["checkpoint"], out / stage, resume=resume, **post))
        if stage == "sft":
            print(f"      well-formed turns {rec['well_formed']:.0%}, task accuracy {rec['accuracy']:.2f} ("
                  + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in rec["tasks"].items()) + ")")
        else:
            print(f"      held-out {rec['task']} accuracy {rec['start_accuracy']:.1%} -> {rec['accuracy']:.1%}")
        stages[stage] = prev = rec
    final = prev["checkpoint"]
    # 6. evaluation
    if last >= 5:
        models = {"base": stages["pretrain"]["checkpoint"], "final": final}
        key = {"models": models, "finished": [stages["pretrain"]["finished"], prev["finished"]],
               "settings": _stage_settings(preset, "eval")}
        rec = stage_record(out, "eval", key)
        if rec and rec.get("skipped"):  # benchmarks not run for lack of data: run again if it has come
            from lmforge.eval.tasks import now_available

            if now_available(rec["skipped"]):
                rec = None
        if rec:
            head(6, f"eval: reusing {out / 'eval'}")
        else:
            head(6, "eval: benchmarks of the base and the final model")
            rec = save_stage(out, "eval", key, eval_stage(preset, models, out / "eval", device=args.device,
                                                          progress=not args.no_progress,
                                                          log=lambda msg: print(msg, flush=True)))
        stages["eval"] = rec
    # 7. report card
    if last >= 6:
        report = write_report(out, preset, stages, time.perf_counter() - t_start)
        head(7, f"report card: {report}")
        print(report.read_text().split("\n\n## ")[0].split("\n\n", 2)[-1])
    print(f"\ndone in {(time.perf_counter() - t_start) / 60:.1f} minutes; final checkpoint {final}")
    if last >= 3:
        print(f"talk to it:  lmforge chat --checkpoint {final}   (runs the tools it calls)\n"
              f"serve it:    lmforge serve --checkpoint {final} --tools builtin   (OpenAI-compatible API "
              "and a chat page; the server runs the calculator and the sandboxed python tool)")
    else:
        print(f"try: lmforge sample --checkpoint {final} --prompt 'def '")


def _stage_settings(preset, stage: str) -> dict:
    """The preset fields a stage depends on: a re-run with other values runs the stage again."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(preset).items() if k.startswith(stage + "_") or k == "task_eval_n"}


def _final_metrics(run_dir: Path) -> dict:
    """What a pretraining run under torchrun ended with: its newest checkpoint and last evaluation."""
    from lmforge.models.registry import build_model
    from lmforge.train.checkpoint import (
        checkpoint_family,
        checkpoint_model_config,
        read_checkpoint_state,
        resolve_checkpoint,
    )
    from lmforge.train.loop import read_log

    ckpt = resolve_checkpoint(run_dir)
    state = read_checkpoint_state(ckpt)
    evals = [r for r in read_log(run_dir / "log.jsonl") if "val_loss" in r]
    import torch

    with torch.device("meta"):
        params = build_model(checkpoint_family(state), checkpoint_model_config(ckpt, state)).num_params()
    return {"checkpoint": str(ckpt), "step": state.get("step"), "tokens": state.get("tokens_seen"),
            "train_time": state.get("train_time"), "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
            "val_bpb": evals[-1].get("val_bpb", float("nan")) if evals else float("nan"), "params": params}


def pretrain_argv(args, data_dir, run_dir, resume: bool) -> list[str]:
    """The `lmforge pretrain` arguments equivalent to this speedrun's pretraining stage."""
    argv = ["pretrain", "--data-dir", str(data_dir), "--out", str(run_dir), "--preset", args.preset]
    for flag in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "batch_size", "seq_len", "grad_accum",
                 "max_steps", "time_budget", "optimizer", "lr", "muon_lr", "weight_decay", "warmup_steps",
                 "schedule", "decay_frac", "min_lr_frac", "grad_clip", "eval_every", "eval_tokens", "ckpt_every",
                 "log_every", "seed", "dtype", "compile", "device"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    for pair in args.set:
        argv += ["--set", pair]
    if args.no_progress:
        argv.append("--no-progress")
    if resume:
        argv.append("--resume")
    return argv


def _pretrain_under_torchrun(args, nproc: int, data_dir, run_dir, resume: bool):
    """Multi-GPU presets: the pretraining stage runs as `torchrun -m lmforge.cli pretrain` (DDP);
    every other stage runs in this one process."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmforge.cli", *pretrain_argv(args, data_dir, run_dir, resume)]
    print("      " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise LmforgeError("pretraining under torchrun failed (see its output above); re-run to resume")


def cmd_export(args):
    from lmforge.train.checkpoint import checkpoint_family, read_checkpoint_state, resolve_checkpoint

    family = checkpoint_family(read_checkpoint_state(resolve_checkpoint(args.checkpoint)))
    if args.format == "arpa":
        return export_arpa(args, family)
    if family != "transformer":
        raise LmforgeError(f"--format hf exports the transformer family; this checkpoint holds a {family} model"
                           + (" (use --format arpa)" if family == "ngram" else ""))
    from lmforge.hf import export_hf

    conv = export_hf(args.checkpoint, args.out_dir, dtype=args.dtype)
    print(f"exported {conv.architecture} to {conv.path}" + (f" ({conv.note})" if conv.note else ""))
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(conv.path)!r})")


def export_arpa(args, family: str):
    """An n-gram checkpoint as an ARPA file (the format of SRILM and KenLM); words are the tokens'
    spellings (`arpa_token_text`), <s> the document start."""
    from lmforge.models.ngram import arpa_token_text, write_arpa
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    if family != "ngram":
        raise LmforgeError(f"--format arpa exports n-gram models; this checkpoint holds a {family} model")
    out = Path(args.out_dir)
    if out.is_dir():
        out = out / "model.arpa"
    model, _ = load_model(args.checkpoint)
    write_arpa(model, out, arpa_token_text(load_checkpoint_tokenizer(args.checkpoint)))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, order {model.config.order}); "
          f"query it with kenlm.Model({str(out)!r})")


def cmd_import(args):
    from lmforge.hf import import_hf

    conv = import_hf(args.hf_dir, args.out)
    print(f"imported {conv.architecture} into {conv.path}" + (f" ({conv.note})" if conv.note else ""))


def cmd_quantize(args):
    from lmforge.quantize import model_memory_bytes
    from lmforge.train.checkpoint import load_model, quantize_checkpoint

    out = quantize_checkpoint(args.checkpoint, args.out, bits=args.bits, group_size=args.group_size,
                              include_lm_head=not args.no_lm_head)
    before, after = model_memory_bytes(load_model(args.checkpoint)[0]), model_memory_bytes(load_model(out)[0])
    print(f"int{args.bits} checkpoint in {out}: {after / 2**20:.1f} MiB in memory (from {before / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge",
                                description="A hackable LLM stack: every stage of building a language model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # speedrun
    s = sub.add_parser("speedrun", help="run the whole pipeline on a corpus (default: the Python standard library)")
    s.add_argument("--preset", dest="speedrun_preset", default="cpu", choices=["cpu", "gpu-1", "gpu-8"],
                   help="corpus, model, batch and budget (lmforge/speedrun.py); the options below override it")
    s.add_argument("--data", default=None,
                   help="file, folder, glob or HF dataset name (cpu preset: Python stdlib source)")
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--vocab-size", type=positive_int, default=None)
    s.add_argument("--max-chars", type=positive_int, default=None, help="read at most this many characters")
    s.add_argument("--tokenizer-chars", type=positive_int, default=None)
    s.add_argument("--val-fraction", type=fraction, default=0.05)
    s.add_argument("--prompt", default="def ")
    s.add_argument("--sample-seed", type=seed_value, default=None)
    s.add_argument("--max-new-tokens", type=nonneg_int, default=200)
    s.add_argument("--temperature", type=temperature_value, default=0.8)
    s.add_argument("--top-k", type=positive_int, default=None)
    s.add_argument("--top-p", type=top_p_value, default=0.95)
    s.add_argument("--stop-after", choices=SPEEDRUN_STAGES, default="report",
                   help="run the stages up to this one (e.g. pretrain: a base model only)")
    g = s.add_argument_group("post-training and evaluation (default: the preset's)")
    g.add_argument("--sft-steps", type=positive_int, default=None)
    g.add_argument("--sft-time-budget", type=positive_float, default=None, help="seconds of SFT training")
    g.add_argument("--rl-steps", type=positive_int, default=None)
    g.add_argument("--rl-time-budget", type=positive_float, default=None, help="seconds of GRPO training")
    g.add_argument("--task-eval-n", type=positive_int, default=None,
                   help="held-out synthetic problems per task after SFT and RL")
    g.add_argument("--eval-limit", type=positive_int, default=None, help="items per benchmark")
    add_model_args(s, default_preset=None, flag="--model")
    add_train_args(s)
    s.set_defaults(func=cmd_speedrun, batch_size=None, max_steps=None, grad_accum=None)

    # tokenizer
    t = sub.add_parser("tokenizer", help="train and use byte-level BPE tokenizers")
    tsub = t.add_subparsers(dest="tok_command", metavar="ACTION")
    tt = tsub.add_parser("train", help="train a tokenizer")
    tt.add_argument("--data", default=None, help="file, folder, glob or HF dataset name (default: Python stdlib)")
    tt.add_argument("--vocab-size", type=positive_int, default=4096, help="total ids including 256 bytes and specials")
    tt.add_argument("--out", required=True)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--max-chars", type=positive_int, default=20_000_000)
    tt.add_argument("--no-progress", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)
    te = tsub.add_parser("encode", help="print token ids of a text (argument or stdin)")
    te.add_argument("--tokenizer", required=True)
    te.add_argument("text", nargs="?")
    te.set_defaults(func=cmd_tokenizer_encode)
    td = tsub.add_parser("decode", help="print the text of token ids (arguments or stdin)")
    td.add_argument("--tokenizer", required=True)
    td.add_argument("ids", nargs="*")
    td.set_defaults(func=cmd_tokenizer_decode)
    tx = tsub.add_parser("export-hf", help="write a Hugging Face tokenizer.json")
    tx.add_argument("--tokenizer", required=True)
    tx.add_argument("out_dir")
    tx.set_defaults(func=cmd_tokenizer_export_hf)

    # data
    d = sub.add_parser("data", help="prepare tokenized shards")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dp = dsub.add_parser("prepare", help="tokenize a corpus into binary shards with a manifest")
    dp.add_argument("--data", default=None, help="file, folder, glob or HF dataset name (default: Python stdlib)")
    dp.add_argument("--tokenizer", required=True)
    dp.add_argument("--out", required=True)
    dp.add_argument("--val-fraction", type=fraction, default=0.05)
    dp.add_argument("--text-field", default="text")
    dp.add_argument("--max-chars", type=positive_int, default=None)
    dp.add_argument("--workers", type=positive_int, default=None)
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=cmd_data_prepare)

    # pretrain
    pt = sub.add_parser("pretrain", help="train a model on token shards (runs under torchrun too)")
    pt.add_argument("--data-dir", required=True, help="folder written by `lmforge data prepare`")
    pt.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, loss.png)")
    pt.add_argument("--dry-run", action="store_true",
                    help="print parameters, tokens per step, memory per device and FLOPs per step; do not train")
    add_model_args(pt, family=True)
    add_train_args(pt)
    pt.set_defaults(func=cmd_pretrain)

    # sample
    sa = sub.add_parser("sample", help="generate text from a checkpoint")
    sa.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    sa.add_argument("--prompt", default=None)
    sa.add_argument("--num-samples", type=positive_int, default=1)
    sa.add_argument("--device", default="cpu")
    add_sampling_args(sa)
    sa.set_defaults(func=cmd_sample)

    # generate
    ge = sub.add_parser("generate", help="one-shot completion for scripts (prompt as argument or stdin)")
    ge.add_argument("--checkpoint", required=True)
    ge.add_argument("prompt", nargs="?")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    ge.add_argument("--stop", action="append", help="stop string (repeatable)")
    ge.add_argument("--device", default="cpu")
    add_sampling_args(ge)
    ge.set_defaults(func=cmd_generate)

    # chat
    ch = sub.add_parser("chat", help="talk to a model in the terminal")
    ch.add_argument("--checkpoint", required=True)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--tools", action=argparse.BooleanOptionalAction, default=None,
                    help="run the tools the model calls (calculator, python) and show each call and result; "
                         "default: on for a model fine-tuned with tool calls")
    add_sampling_args(ch)
    ch.set_defaults(func=cmd_chat)

    # Hugging Face interop
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder or an ARPA n-gram file")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--format", choices=["hf", "arpa"], default="hf",
                    help="hf: a transformers folder (transformer family); arpa: an SRILM/KenLM file (n-gram family)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="hf only")
    ex.add_argument("out_dir", help="the folder (hf), or the .arpa file or a folder for model.arpa (arpa)")
    ex.set_defaults(func=cmd_export)
    im = sub.add_parser("import", help="convert a local Hugging Face Llama/Qwen3/GPT-2 folder to a checkpoint")
    im.add_argument("hf_dir")
    im.add_argument("--out", required=True, help="run folder for the lmforge checkpoint")
    im.set_defaults(func=cmd_import)

    qz = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a checkpoint")
    qz.add_argument("--checkpoint", required=True)
    qz.add_argument("--out", required=True, help="run folder for the quantized checkpoint")
    qz.add_argument("--bits", type=int, choices=[8, 4], default=8)
    qz.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=32, help="int4 columns per scale")
    qz.add_argument("--no-lm-head", action="store_true", help="keep the output head in full precision")
    qz.set_defaults(func=cmd_quantize)

    # score
    sc = sub.add_parser("score", help="log-probability and perplexity of texts; ranks several candidates")
    sc.add_argument("--checkpoint", required=True)
    sc.add_argument("texts", nargs="*")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--json", action="store_true")
    sc.add_argument("-v", "--verbose", action="store_true", help="per-token log-probs for every text")
    sc.set_defaults(func=cmd_score)

    # Later pipeline stages define their subcommands next to their code.
    import importlib

    for module in STAGE_COMMANDS:
        importlib.import_module(module).add_commands(sub)
    return p


# Modules with an `add_commands(subparsers)` function; they import heavy libraries only inside the
# command handlers, so `lmforge --help` stays fast.
STAGE_COMMANDS = ("lmforge.eval.cli", "lmforge.posttrain.cli", "lmforge.posttrain.align_cli",
                  "lmforge.serve.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `lmforge` or `lmforge tokenizer` without an action: show the relevant help, fail.
        try:
            parser.parse_args(argv + ["--help"])
        except SystemExit:
            pass
        return 2
    try:
        args.func(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output folder, a folder where a file should be, disk full...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
