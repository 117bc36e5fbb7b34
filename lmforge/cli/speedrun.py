"""`lmforge speedrun`: every stage of the pipeline, in order, under one run folder.

    0 curate      only for raw web data (HTML, WARC, WET) or with --curate: extraction, filters, dedup
    1 tokenizer   byte-level BPE trained on the corpus
    2 data        token shards with a held-out validation split
    3 pretrain    the preset's transformer (under torchrun on a multi-GPU preset)
    4 sft         chat SFT with tool use, identity and safety
    5 rl          GRPO with tools on a task with a checkable answer
    6 eval        the multiple-choice benchmarks, base and final model
    7 report      a report card with one metric per stage

`cmd_speedrun` below runs them top to bottom; stages 4-7 are functions of lmforge/speedrun.py,
which also holds the presets (cpu, gpu-1, gpu-8). Options left unset come from the preset.
Finished stages are reused, an interrupted one resumes.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lmforge.cli.common import (
    add_model_args,
    add_options,
    add_train_args,
    fraction,
    model_argv,
    model_overrides,
    nonneg_int,
    options_argv,
    positive_float,
    positive_int,
    print_sample,
    seed_value,
    temperature_value,
    top_p_value,
    train_config,
)
from lmforge.common import LmforgeError, default_device

SPEEDRUN_STAGES = ("tokenizer", "data", "pretrain", "sft", "rl", "eval", "report")


def apply_preset(args):
    """The speedrun preset with the options given on the command line; every option left unset is
    filled in from it (in args). Returns the preset."""
    from dataclasses import replace

    from lmforge.models.transformer import get_config
    from lmforge.speedrun import get_speedrun_preset

    preset = get_speedrun_preset(args.speedrun_preset)
    overrides = {k: getattr(args, k) for k in ("sft_steps", "sft_time_budget", "rl_steps", "rl_time_budget",
                                                "eval_limit", "task_eval_n") if getattr(args, k) is not None}
    preset = replace(preset, **overrides, parallel=args.parallel)
    for name in ("data", "max_chars", "vocab_size", "tokenizer_chars", "batch_size", "max_steps", "time_budget"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    args.model_preset = args.model_preset or preset.model
    if args.seq_len is None:
        args.seq_len = min(preset.seq_len, get_config(args.model_preset, **model_overrides(args)).block_size)
    if args.device == "auto" and preset.device != "cpu":
        args.device = preset.device
    if args.grad_accum is None:
        # Keep the preset's tokens per step whatever the micro-batch: accumulate the difference.
        args.grad_accum = max(1, preset.total_batch_tokens // (args.batch_size * args.seq_len * preset.nproc))
    return preset


def print_preset_estimate(preset, args):
    """`speedrun --dry-run`: the pretraining step as these options make it (batch, model, processes,
    ddp or fsdp), its memory per device and whether it fits the preset's GPUs; nothing is run."""
    from dataclasses import replace

    from lmforge.speedrun import check_preset
    from lmforge.train.budget import footprint_lines

    p = replace(preset, model=args.model_preset, batch_size=args.batch_size, seq_len=args.seq_len,
                total_batch_tokens=args.batch_size * args.seq_len * args.grad_accum * preset.nproc)
    r = check_preset(p)
    print(f"speedrun preset {p.name}: model {p.model}, {r['params'] / 1e6:.1f}M parameters, "
          f"{p.nproc} process(es) on {p.device}")
    for line in footprint_lines(r["footprint"], batch_size=p.batch_size, seq_len=p.seq_len, grad_accum=p.grad_accum,
                                world=p.nproc, parallel=p.parallel):
        print(line)
    if p.gpu_memory_gib is not None:
        print(f"fits a {p.gpu_memory_gib:.0f} GiB device")


def pretrain_settings(args, data_dir, run_dir):
    """Stage 3's options and training config, from the (preset-filled) arguments."""
    from lmforge.stages.options import PretrainOptions

    opts = PretrainOptions(data_dir=str(data_dir), preset=args.model_preset, model_overrides=model_overrides(args),
                           batch_size=args.batch_size, seq_len=args.seq_len, eval_tokens=args.eval_tokens)
    return opts, train_config(args, out_dir=str(run_dir))


def cmd_speedrun(args):
    """The main job: every stage in order under one run folder. Options left unset come from the
    speedrun preset (lmforge/speedrun.py). Finished stages are reused, an interrupted one resumes."""
    import time
    from dataclasses import replace

    from lmforge.data.prepare import load_manifest, prepare_shards
    from lmforge.data.sources import iter_documents
    from lmforge.speedrun import (
        check_preset,
        eval_stage,
        rl_stage,
        save_stage,
        sft_stage,
        stage_record,
        start_stage,
        write_report,
    )
    from lmforge.stages.pretrain import pretrain
    from lmforge.tokenizer import Tokenizer

    t_start = time.perf_counter()
    if args.val_fraction == 0:  # refused before any stage runs, not after pretraining
        raise LmforgeError("--val-fraction 0 leaves no validation data, but the speedrun reports the "
                           "pretrained model's validation bits per byte; give a fraction > 0 (default 0.05)")
    preset = apply_preset(args)
    if args.dry_run:
        return print_preset_estimate(preset, args)
    if preset.gpu_memory_gib is not None:
        check_preset(preset)  # fail before the tokenizer and data stages spend hours, not after
    last = SPEEDRUN_STAGES.index(args.stop_after)
    python_tool = True
    if last >= SPEEDRUN_STAGES.index("sft"):
        # SFT's letter counting and the tool loops run model-written Python, only ever in the sandbox:
        # where it cannot be built, say so now and leave those out (never run the code unsandboxed).
        from lmforge.inference.sandbox import sandbox_problem

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

    # 0. curation, when the corpus is raw web pages (a re-run reuses its finished files)
    from lmforge.curate.extract import is_raw_web

    if args.curate or args.curate_config or is_raw_web(source):
        from lmforge.curate.config import load_config
        from lmforge.curate.pipeline import curate

        if source is None:
            raise LmforgeError("--curate needs --data naming the raw files (HTML, WARC, WET, jsonl or txt)")
        head(0, f"curate: extraction, quality filters and deduplication of {source}")
        c = curate([source], out / "curate", load_config(args.curate_config), show_progress=args.progress)
        print(f"      {c.docs_out:,} documents, {c.bytes_out / 1e6:,.2f} MB kept "
              f"(report: {out / 'curate' / 'report.md'})")
        source = str(out / "curate" / "curated")

    print(f"speedrun preset {preset.name}: model {args.model_preset}, data {source}; {args.batch_size} sequences x "
          f"{args.seq_len} tokens x {args.grad_accum} accumulation steps x {preset.nproc} processes = "
          f"{args.batch_size * args.seq_len * args.grad_accum * preset.nproc:,} tokens per step")
    # 1. tokenizer
    if tok_path.is_file():
        tok = Tokenizer.load(tok_path)
        head(1, f"tokenizer: reusing {tok_path} ({tok.vocab_size} ids)")
    else:
        head(1, f"tokenizer: byte-level BPE, vocab {args.vocab_size}, on {source}")
        tok = Tokenizer.train(iter_documents(source, max_chars=args.max_chars), args.vocab_size,
                              show_progress=args.progress, max_chars=args.tokenizer_chars)
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
                           max_chars=args.max_chars, show_progress=args.progress)
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
    opts, cfg = pretrain_settings(args, data_dir, run_dir)
    budget_flags = ("--max-steps", "--time-budget")
    argv = pretrain_argv(opts, cfg)
    origin = {"argv": [a for i, a in enumerate(argv) if a not in budget_flags and argv[i - 1] not in budget_flags],
              "tokenizer": tok.fingerprint, "data": m.get("splits")}
    key = {"origin": origin, "budget": [args.max_steps, args.time_budget]}
    rec = stage_record(out, "pretrain", key)
    if rec:
        head(3, f"pretrain: reusing {rec['checkpoint']} ({rec['val_bpb']:.4f} bits/byte)")
    else:
        resume = start_stage(out, "pretrain", origin)
        opts = replace(opts, resume=resume)
        head(3, f"pretrain: model {args.model_preset}" + (" (resuming)" if resume else ""))
        if preset.nproc > 1:
            _pretrain_under_torchrun(pretrain_argv(opts, cfg), preset.nproc)
            result = _final_metrics(run_dir)
        else:
            result = pretrain(opts, cfg)
            print("      sample:")
            print_sample(result["model"].eval(), result["tokenizer"], args.prompt, args, seed=args.sample_seed or 0)
            result["checkpoint"] = str(result["checkpoint"])
            result["params"] = result["model"].num_params()
        rec = save_stage(out, "pretrain", key, {k: result.get(k) for k in (
            "checkpoint", "step", "tokens", "train_time", "val_loss", "val_bpb", "params")} | {
            "device": default_device() if args.device == "auto" else args.device})
        print(f"      val loss {rec['val_loss']:.4f} nats/token, {rec['val_bpb']:.4f} bits/byte after "
              f"{rec['tokens']:,} tokens; loss curve {run_dir / 'loss.png'}")
    stages["pretrain"] = prev = rec
    post = dict(seed=args.seed, device=args.device, dtype=args.dtype, progress=args.progress,
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
                                                          progress=args.progress,
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
    from lmforge.train.checkpoint import checkpoint_shapes
    from lmforge.train.logs import read_log

    ckpt, state, model = checkpoint_shapes(run_dir)
    evals = [r for r in read_log(run_dir / "log.jsonl") if "val_loss" in r]
    params = model.num_params()
    return {"checkpoint": str(ckpt), "step": state.get("step"), "tokens": state.get("tokens_seen"),
            "train_time": state.get("train_time"), "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
            "val_bpb": evals[-1].get("val_bpb", float("nan")) if evals else float("nan"), "params": params}


def pretrain_argv(opts, cfg) -> list[str]:
    """The `lmforge pretrain` arguments that reproduce these options and this training config: every
    declared setting written out, so the torchrun processes cannot train another configuration."""
    return ["pretrain", "--data-dir", opts.data_dir, *model_argv(opts.model, opts.preset, opts.model_overrides or {}),
            *options_argv(opts), *options_argv(cfg)]


def _pretrain_under_torchrun(argv: list[str], nproc: int):
    """Multi-GPU presets: the pretraining stage runs as `torchrun -m lmforge.cli pretrain` (DDP);
    every other stage runs in this one process."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", __package__, *argv]  # this package: python -m lmforge.cli
    print("      " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise LmforgeError("pretraining under torchrun failed (see its output above); re-run to resume")


def add_commands(sub) -> None:
    from lmforge.stages.options import PretrainOptions

    s = sub.add_parser("speedrun", help="run the whole pipeline on a corpus (default: the Python standard library)")
    s.add_argument("--preset", dest="speedrun_preset", default="cpu", choices=["cpu", "gpu-1", "gpu-8"],
                   help="corpus, model, batch and budget (lmforge/speedrun.py); the options below override it")
    s.add_argument("--data", default=None,
                   help="file, folder, glob or HF dataset name (cpu preset: Python stdlib source)")
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--curate", action="store_true",
                   help="curate --data first (automatic when it names HTML, WARC or WET files)")
    s.add_argument("--curate-config", default=None, help="curation settings (TOML; implies --curate)")
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
    s.add_argument("--dry-run", action="store_true",
                   help="print the pretraining step's tokens, memory per device and FLOPs for these options; "
                        "run nothing")
    g = s.add_argument_group("post-training and evaluation (default: the preset's)")
    g.add_argument("--sft-steps", type=positive_int, default=None)
    g.add_argument("--sft-time-budget", type=positive_float, default=None, help="seconds of SFT training")
    g.add_argument("--rl-steps", type=positive_int, default=None)
    g.add_argument("--rl-time-budget", type=positive_float, default=None, help="seconds of GRPO training")
    g.add_argument("--task-eval-n", type=positive_int, default=None,
                   help="held-out synthetic problems per task after SFT and RL")
    g.add_argument("--eval-limit", type=positive_int, default=None, help="items per benchmark")
    add_model_args(s)
    g = add_train_args(s, skip=("out_dir",))
    add_options(g, PretrainOptions, ("batch_size", "seq_len", "eval_tokens"))
    s.set_defaults(func=cmd_speedrun, batch_size=None, max_steps=None, grad_accum=None)
