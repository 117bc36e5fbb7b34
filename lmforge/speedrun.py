"""`lmforge speedrun` presets: what changes between a laptop CPU and a node of GPUs.

The same stages run everywhere (tokenizer -> shards -> pretraining -> ...); a preset chooses the
corpus, the model, the batch and the budget. The batch is fixed in tokens per optimizer step, so a
preset with more devices or smaller micro-batches gets the same optimisation by accumulating
gradients: total_batch_tokens = batch_size * seq_len * grad_accum * nproc, exactly.

After pretraining, every preset runs the same post-training and evaluation stages (functions
below, called in order by `lmforge speedrun` in lmforge/cli/speedrun.py): chat SFT on a mixture of
tool-using synthetic tasks, identity and safety data; GRPO with tool use on a task with a
checkable answer; the multiple-choice benchmarks on the base and the final model; and a report
card with one metric per stage. Each
stage writes OUT/<stage>/stage.json when it finishes; a re-run with the same settings and input
skips it, and a stage that was interrupted resumes from its newest checkpoint.

`check_preset` validates a preset before anything runs: the model config, the batch arithmetic,
and (for GPU presets) the estimated memory per device against the GPU's memory
(`lmforge.train.budget`). The GPU presets cannot run on this project's CPU-only machine; the tests
hold their configurations to this check.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.models.transformer import get_config

# Chat SFT: tool-using arithmetic (calculator) and letter counting (python), who the model is, and
# when to refuse (lmforge/posttrain/safety.py). Weights after '*'.
SFT_MIXTURE = ("synthetic:arithmetic:4000*2", "synthetic:letters:3000", "synthetic:identity:500", "safety*0.5")
SFT_TASKS = ("arithmetic", "letters", "identity")  # evaluated after SFT (held-out problems)
# Where the python tool's sandbox cannot be built (macOS; Linux without user namespaces) the speedrun
# leaves out what needs it: letter counting (its worked examples call python) in SFT and its
# evaluation, and python in the tool loops; arithmetic runs with the calculator alone.
PYTHON_TASKS = ("letters",)
WITHOUT_PYTHON = ("calculator",)
# The benchmark table: multiple-choice tasks scored by log-likelihood (lmforge/eval).
EVAL_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "copa", "boolq")


@dataclass(frozen=True)
class SpeedrunPreset:
    name: str
    data: str  # corpus spec for lmforge.data.sources.iter_documents
    max_chars: int | None  # corpus characters read (None: all)
    vocab_size: int
    tokenizer_chars: int  # characters the tokenizer is trained on
    model: str  # lmforge.models.transformer preset
    nproc: int  # processes (one per GPU) under torchrun
    device: str
    batch_size: int  # sequences per micro-batch per process
    seq_len: int
    total_batch_tokens: int  # tokens per optimizer step, over all processes and micro-batches
    max_steps: int
    time_budget: float | None  # seconds of pretraining; None: max_steps decides
    gpu_memory_gib: float | None = None  # per device; None on CPU
    parallel: str = "ddp"  # with nproc > 1: ddp (whole model per device) or fsdp (FSDP2, 1/nproc of it each)
    # Post-training and evaluation (one process; the step or time budget, whichever ends first).
    sft_steps: int = 300
    sft_time_budget: float | None = None
    sft_batch_size: int = 16
    sft_lr: float = 2e-3  # AdamW
    # GRPO prompts (a synthetic task with a checker), with tool use: + and - on operands of up to 5
    # digits, longer than the SFT problems (3), so the SFT model is right only some of the time and
    # the groups of replies differ: what GRPO learns from.
    rl_task: str = "arithmetic:5:+-"
    rl_steps: int = 200
    rl_time_budget: float | None = None
    rl_prompts: int = 8  # prompts per step, each with rl_group sampled replies
    rl_group: int = 8
    rl_lr: float = 1e-4
    rl_temperature: float = 0.7  # sampling temperature of the rollouts (the loss uses the same)
    task_eval_n: int = 100  # held-out synthetic problems per task after SFT and RL
    eval_limit: int | None = None  # items per benchmark (None: all)

    @property
    def grad_accum(self) -> int:
        return self.total_batch_tokens // (self.batch_size * self.seq_len * self.nproc)

    def model_config(self):
        return get_config(self.model, vocab_size=self.vocab_size)


SPEEDRUN_PRESETS = {
    # A laptop CPU: the default `cpu` model on the built-in corpus (Python's standard library),
    # pretraining for 8 minutes of wall clock so the whole run fits in 20.
    "cpu": SpeedrunPreset(
        name="cpu", data="stdlib", max_chars=None, vocab_size=4096, tokenizer_chars=20_000_000, model="cpu",
        nproc=1, device="cpu", batch_size=8, seq_len=256, total_batch_tokens=8 * 256, max_steps=100_000,
        time_budget=420.0, sft_time_budget=180.0, rl_time_budget=240.0, eval_limit=200),
    # One 80 GB GPU: a 12-layer, 768-wide model (~135M parameters) for ~20 tokens per parameter
    # (Chinchilla) of FineWeb-Edu, 0.5M tokens per step through 8 accumulated micro-batches.
    "gpu-1": SpeedrunPreset(
        name="gpu-1", data="HuggingFaceFW/fineweb-edu:sample-10BT", max_chars=13_000_000_000, vocab_size=32768,
        tokenizer_chars=2_000_000_000, model="d12", nproc=1, device="cuda", batch_size=32, seq_len=2048,
        total_batch_tokens=524_288, max_steps=5_200, time_budget=None, gpu_memory_gib=80.0,
        sft_steps=1500, sft_batch_size=32, sft_lr=3e-4, rl_steps=300, rl_prompts=32, rl_lr=2e-5, task_eval_n=500),
    # Eight 80 GB GPUs under torchrun: a 20-layer, 1280-wide model (~560M parameters), ~11B tokens.
    "gpu-8": SpeedrunPreset(
        name="gpu-8", data="HuggingFaceFW/fineweb-edu:sample-100BT", max_chars=55_000_000_000, vocab_size=65536,
        tokenizer_chars=2_000_000_000, model="d20", nproc=8, device="cuda", batch_size=8, seq_len=2048,
        total_batch_tokens=524_288, max_steps=21_400, time_budget=None, gpu_memory_gib=80.0,
        sft_steps=1500, sft_batch_size=32, sft_lr=2e-4, rl_steps=300, rl_prompts=32, rl_lr=1e-5, task_eval_n=500),
}


def get_speedrun_preset(name: str) -> SpeedrunPreset:
    if name not in SPEEDRUN_PRESETS:
        raise LmforgeError(f"unknown speedrun preset {name!r}; choose from {', '.join(SPEEDRUN_PRESETS)}")
    return SPEEDRUN_PRESETS[name]


def check_preset(p: SpeedrunPreset) -> dict:
    """Validate a preset; returns its sizes and estimates (parameters, tokens, FLOPs, memory).
    Raises LmforgeError naming the first problem."""
    from lmforge.train.budget import training_footprint

    cfg = p.model_config()  # GPTConfig checks its own shapes
    if p.seq_len > cfg.block_size:
        raise LmforgeError(f"preset {p.name}: seq_len {p.seq_len} exceeds the model's context {cfg.block_size}")
    micro = p.batch_size * p.seq_len * p.nproc
    if p.total_batch_tokens % micro:
        raise LmforgeError(f"preset {p.name}: {p.total_batch_tokens} tokens per step is not a multiple of "
                           f"batch_size x seq_len x nproc = {micro}")
    fp = training_footprint(cfg, batch_size=p.batch_size, seq_len=p.seq_len, grad_accum=p.grad_accum,
                            world=p.nproc, parallel=p.parallel)
    gib = 2.0 ** 30
    if p.gpu_memory_gib is not None and fp.total / gib > p.gpu_memory_gib:
        raise LmforgeError(f"preset {p.name}: an estimated {fp.total / gib:.1f} GiB per device does not fit "
                           f"{p.gpu_memory_gib:.0f} GiB; lower batch_size"
                           + (" or shard the model (--parallel fsdp)" if p.nproc > 1 and p.parallel == "ddp" else ""))
    out = {"params": fp.params, "grad_accum": p.grad_accum, "memory_gib": fp.total / gib, "footprint": fp}
    if p.time_budget is None:  # a step budget fixes the tokens; a time budget depends on the machine
        out["tokens"] = p.total_batch_tokens * p.max_steps
        out["tokens_per_param"] = out["tokens"] / fp.params
        out["flops"] = fp.flops_per_step * p.max_steps
    return out


# ----------------------------------------------------------------------------- stage records


def stage_record(out: Path, stage: str, key: dict) -> dict | None:
    """The summary of a finished stage if it finished with these settings and input, else None."""
    path = Path(out) / stage / "stage.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("key") != json.loads(json.dumps(key)):
        return None
    if rec.get("checkpoint") is not None:
        from lmforge.train.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(rec["checkpoint"])  # the stage's model is still there
        except LmforgeError:
            return None
    return rec


def save_stage(out: Path, stage: str, key: dict, summary: dict) -> dict:
    rec = {"key": key, **summary, "finished": time.time()}
    path = Path(out) / stage / "stage.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    tmp.replace(path)  # a stage is finished only once its record is whole
    return rec


def start_stage(out: Path, stage: str, origin: dict, log=print) -> bool:
    """Get OUT/<stage> ready for a training stage whose starting point (input model, data, settings
    other than its budget) is `origin`. Returns True when a run from the same origin is there to
    resume (interrupted, or finished with a smaller budget). A run from another origin is moved
    aside to OUT/<stage>.old (replacing an older .old), never resumed."""
    import shutil

    from lmforge.train.checkpoint import list_checkpoints

    d = Path(out) / stage
    origin = json.loads(json.dumps(origin))
    if d.exists():
        try:
            same = json.loads((d / "origin.json").read_text()) == origin
        except (OSError, json.JSONDecodeError):
            same = not any(d.iterdir())
        if same:
            (d / "stage.json").unlink(missing_ok=True)
            return bool(list_checkpoints(d / "checkpoints"))
        old = d.with_name(d.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        d.rename(old)
        log(f"      {d} was started from something else: moved to {old}")
    d.mkdir(parents=True)
    (d / "origin.json").write_text(json.dumps(origin, indent=2) + "\n")
    return False


# ----------------------------------------------------------------------------- post-training stages


def _train_config(defaults: dict, out_dir: Path, **given):
    """A post-training stage's config: the stage's own TRAIN_DEFAULTS (those of its command), then
    what the speedrun sets: the preset's budget and learning rate, no evaluation during training
    (each stage evaluates once at its end), and eager mode (sequences of every length)."""
    from lmforge.train.loop import TrainConfig

    return TrainConfig(**{**defaults, "out_dir": str(out_dir), "eval_every": 0, "log_every": 10, "compile": "off",
                          **given})


def sft_stage(p: SpeedrunPreset, base: str, out_dir: Path, *, resume: bool, seed: int, device: str, dtype: str,
              progress: bool, python_tool: bool = True, log=print) -> dict:
    """Chat SFT from the pretrained checkpoint, then greedy evaluation on held-out synthetic problems
    (tools run) and the safety prompts. Resumes an interrupted run. Without the python tool, the
    tasks that need it are left out (PYTHON_TASKS)."""
    from lmforge.stages.sft import SFTOptions, evaluate_tasks, safety_eval, sft

    def keep(spec: str) -> bool:
        return python_tool or not any(spec.startswith(f"synthetic:{t}") for t in PYTHON_TASKS)

    from lmforge.stages.options import SFT_TRAIN_DEFAULTS

    cfg = _train_config(SFT_TRAIN_DEFAULTS, out_dir, max_steps=p.sft_steps, time_budget=p.sft_time_budget, lr=p.sft_lr,
                        seed=seed, device=device, dtype=dtype, progress=progress, ckpt_every=50)
    r = sft(SFTOptions(checkpoint=base, data=[s for s in SFT_MIXTURE if keep(s)], batch_size=p.sft_batch_size,
                       resume=resume), cfg, log=lambda m: log("      " + m))
    t0 = time.perf_counter()
    tasks = evaluate_tasks(r["model"].eval(), r["tokenizer"],
                           [t for t in SFT_TASKS if python_tool or t not in PYTHON_TASKS], p.task_eval_n,
                           tool_names=None if python_tool else WITHOUT_PYTHON, examples=2)
    safety = safety_eval(r["model"], r["tokenizer"])
    return {"checkpoint": r["checkpoint"], "steps": r["step"], "train_time": r["train_time"],
            "val_loss": r.get("val_loss"), "accuracy": tasks["accuracy"], "well_formed": tasks["well_formed"],
            "tasks": tasks["tasks"], "safety": safety, "eval_time": time.perf_counter() - t0,
            "python_tool": python_tool}


def rl_stage(p: SpeedrunPreset, sft_checkpoint: str, out_dir: Path, *, resume: bool, seed: int, device: str,
             dtype: str, progress: bool, python_tool: bool = True) -> dict:
    """GRPO with tool use on the preset's verifiable task; held-out accuracy before and after."""
    from lmforge.stages.rl import RLOptions, train_rl

    opts = RLOptions(checkpoint=sft_checkpoint, algorithm="grpo", tasks=[p.rl_task], tools=True,
                     tool_names=None if python_tool else WITHOUT_PYTHON,
                     prompts_per_step=p.rl_prompts, group_size=p.rl_group, max_new_tokens=96, kl_beta=0.02,
                     temperature=p.rl_temperature,
                     eval_n=p.task_eval_n, resume=resume)
    from lmforge.stages.options import RL_TRAIN_DEFAULTS

    cfg = _train_config(RL_TRAIN_DEFAULTS, out_dir, max_steps=p.rl_steps, time_budget=p.rl_time_budget, lr=p.rl_lr,
                        seed=seed, device=device, dtype=dtype, progress=progress, ckpt_every=25)
    r = train_rl(opts, cfg)
    start = r.get("start_val_accuracy")
    if start is None:  # resumed: the starting accuracy was measured by the interrupted run
        start = _first_eval(out_dir / "log.jsonl")
    return {"checkpoint": r["checkpoint"], "steps": r["step"], "train_time": r["train_time"], "task": p.rl_task,
            "start_accuracy": start, "accuracy": r["val_accuracy"], "length": r.get("val_length")}


def _first_eval(log_path: Path) -> float | None:
    from lmforge.train.logs import read_log

    for rec in read_log(log_path):
        if "val_accuracy" in rec:
            return rec["val_accuracy"]
    return None


def eval_stage(p: SpeedrunPreset, checkpoints: dict[str, str], out_dir: Path, *, device: str, progress: bool,
               log=print) -> dict:
    """The benchmark table for each named checkpoint (e.g. base and final). A benchmark whose data
    is neither in the data root nor on a reachable hub (tasks.DataUnavailable) is not run, and the
    record keeps why and what gets its data; any other error is a bug and stops the run."""
    from lmforge.common import default_device
    from lmforge.eval.harness import LmforgeModel
    from lmforge.eval.run import run_tasks
    from lmforge.eval.tasks import DataUnavailable, load_mc_task

    device = default_device() if device == "auto" else device
    available, skipped = [], {}
    for name in EVAL_TASKS:
        try:
            load_mc_task(name)
            available.append(name)
        except DataUnavailable as e:
            skipped[name] = {"reason": e.reason, "how": e.how}
            log(f"      not run: {e}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    if available:
        for label, ckpt in checkpoints.items():
            lm = LmforgeModel.load(ckpt, device=device)
            res = run_tasks(lm, available, limit=p.eval_limit, progress=progress)
            res["model"] = f"{label} ({ckpt})"
            (out_dir / f"{label}.json").write_text(json.dumps(res, indent=2) + "\n")
            results[label] = str(out_dir / f"{label}.json")
    return {"results": results, "tasks": available, "skipped": skipped, "limit": p.eval_limit}


# ----------------------------------------------------------------------------- the report card


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def write_report(out: Path, preset: SpeedrunPreset, stages: dict[str, dict], total_seconds: float) -> Path:
    """OUT/report/report.md: one row per stage with the metric the stage exists to move, then the
    benchmark table (base vs final model), per-task details and the plots. Returns the path."""
    import platform
    import shutil

    import torch

    from lmforge.common import read_json
    from lmforge.eval.report import centred_scores, plot_task_bars, primary_metric
    from lmforge.train.logs import plot_loss_curve

    rep = Path(out) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    tokd, data, pre, sft, rl, ev = (stages.get(k, {}) for k in ("tokenizer", "data", "pretrain", "sft", "rl", "eval"))
    evals = {label: read_json(path, "eval results") for label, path in ev.get("results", {}).items()}
    centred = {label: centred_scores(r) for label, r in evals.items()}
    agg = {label: sum(c.values()) / len(c) if c else None for label, c in centred.items()}

    def secs(d, key="train_time"):
        return f"{d[key]:.0f} s" if d.get(key) is not None else "–"

    lines = [f"# lmforge speedrun report card — preset `{preset.name}`", "",
             f"Model `{preset.model}`, {pre.get('params', 0) / 1e6:.2f}M parameters; data `{preset.data}`; "
             f"{total_seconds / 60:.1f} minutes this run (stages reused from an earlier run count 0); "
             f"torch {torch.__version__} on {platform.machine()} ({pre.get('device', preset.device)}).", "",
             "| stage | what it moves | result | training time |", "|---|---|---|---|"]
    if tokd:
        lines.append(f"| tokenizer | compression | {tokd['vocab_size']:,} ids, {tokd['bytes_per_token']:.2f} bytes per "
                     f"token | – |")
    if data:
        lines.append(f"| data | tokens | {data['train_tokens']:,} train, {data['val_tokens']:,} validation | – |")
    if pre:
        lines.append(f"| pretrain | validation bits per byte | **{pre['val_bpb']:.3f}** bits/byte "
                     f"({pre['val_loss']:.3f} nats/token) after {pre['tokens']:,} tokens | {secs(pre)} |")
    if sft:
        t = sft["tasks"]
        per = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in t.items())
        lines.append(f"| SFT | well-formed turns; task accuracy | **{_pct(sft['well_formed'])}** well-formed; "
                     f"accuracy **{sft['accuracy']:.2f}** ({per}); refusals {sft['safety']['refusal_rate']:.2f}, "
                     f"over-refusals {sft['safety']['over_refusal_rate']:.2f} | {secs(sft)} |")
    if rl:
        lines.append(f"| RL (GRPO, tools) | held-out {rl['task']} accuracy | {_pct(rl['start_accuracy'])} → "
                     f"**{_pct(rl['accuracy'])}** | {secs(rl)} |")
    if agg:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in agg.items() if v is not None)
        lines.append(f"| eval | centred benchmark score (0 = chance) | {shown} | – |")
    elif ev:
        lines.append(f"| eval | centred benchmark score (0 = chance) | not run: no benchmark data on this machine "
                     f"({len(ev.get('skipped', {}))} benchmarks, listed below) | – |")
    lines.append("")
    if sft and sft.get("python_tool") is False:
        lines += ["The python tool's sandbox cannot be built on this machine, so SFT and RL left out what needs "
                  "it: no letter counting, arithmetic with the calculator only (docs/posttraining.md).", ""]
    if evals:
        labels = list(evals)
        names = [n for n in next(iter(evals.values()))["tasks"]]
        lines += ["## Benchmarks", "",
                  f"Multiple choice by log-likelihood, {ev.get('limit') or 'all'} items per task; acc_norm (length-"
                  "normalised, as lm-evaluation-harness), centred = (score − chance) / (1 − chance).", "",
                  "| task | chance | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for n in names:
            m0 = evals[labels[0]]["tasks"][n]["metrics"]
            cells = []
            for lab in labels:
                m = evals[lab]["tasks"][n]["metrics"]
                k, v = primary_metric(m)
                cells.append(f"{v:.3f} ± {m.get(k + '_stderr', 0):.3f}")
            lines.append(f"| {n} | {m0.get('chance', float('nan')):.3f} | " + " | ".join(cells) + " |")
        lines.append("| **centred aggregate** | 0 | " + " | ".join(
            f"**{agg[lab]:.3f}**" if agg[lab] is not None else "–" for lab in labels) + " |")
        lines.append("")
        final = labels[-1]
        if plot_task_bars(centred[final], rep / "tasks.png"):
            lines += [f"![centred scores of the {final} model](tasks.png)", ""]
    if ev.get("skipped"):  # also when no benchmark ran at all
        if not evals:
            lines += ["## Benchmarks", ""]
        lines += ["Not run (their data is not on this machine):", ""]
        for name, why in ev["skipped"].items():
            if isinstance(why, dict):
                lines.append(f"- **{name}**: {why['reason']}. To run it: {why['how']}.")
            else:  # a record written by an older lmforge: the reason only
                lines.append(f"- **{name}**: {why}")
        lines.append("")
    if sft:
        lines += ["## After SFT", "", "| task | accuracy | well-formed | tool calls per reply |", "|---|---|---|---|"]
        # the identity questions are a small fixed set that the SFT data contains: recall, not generalisation
        shown = {"identity": "identity (memorised)"}
        lines += [f"| {shown.get(k, k)} | {v['accuracy']:.2f} | {v['well_formed']:.2f} | "
                  f"{v['tool_calls_per_reply']:.2f} |" for k, v in sft["tasks"].items()]
        examples = [(k, e) for k, v in sft["tasks"].items() for e in v.get("examples", [])[:1]]
        if examples:
            lines += ["", "Examples (greedy, tools run):", ""]
            for k, e in examples:
                mark = "right" if e["correct"] else "wrong"
                lines.append(f"- {k} ({mark}): *{e['prompt']}* → `{e['reply'][:200]!r}`")
        lines.append("")
    plots = []
    for stage, src, png, title in (("pretrain", "pretrain", "pretrain_loss.png", "Pretraining loss"),
                                   ("sft", "sft", "sft_loss.png", "SFT loss")):
        if stages.get(stage) and plot_loss_curve(Path(out) / src / "log.jsonl", rep / png):
            plots.append((title, png))
    if rl and (Path(out) / "rl" / "rewards.png").is_file():
        shutil.copy(Path(out) / "rl" / "rewards.png", rep / "rl_rewards.png")
        plots.append(("GRPO rewards and held-out accuracy", "rl_rewards.png"))
    if plots:
        lines += ["## Curves", ""] + [f"### {t}\n\n![{t}]({png})\n" for t, png in plots]
    report = rep / "report.md"
    report.write_text("\n".join(lines))
    (rep / "report.json").write_text(json.dumps({"preset": preset.name, "total_seconds": total_seconds,
                                                 "stages": stages, "centred_aggregate": agg}, indent=2,
                                                default=str) + "\n")
    return report
