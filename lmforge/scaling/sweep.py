"""IsoFLOP sweeps: for each compute budget, several model sizes, each trained for exactly the tokens
the budget buys, with a learning-rate schedule that ends at the budget's last step.

The FLOPs convention (the same as `GPT.flops_per_token`, PaLM's accounting):

    C = D * (6 * N + 12 * n_layer * n_head * head_dim * T)

with D the training tokens, T the sequence length and N the weights of every matrix multiply,
the output head included. N leaves out the input token table (a lookup costs no multiply-adds)
and the norms (a few thousand numbers). The second term is attention's two T x T products over
the full causal window. N is also the "parameters" of the fits (lmforge.scaling.fit); C = 6ND is
their closed-form shorthand. In these small models the attention term is 5-20% of C: the grid's
tokens are computed from the exact C, never from 6ND.

Every run is an ordinary `lmforge pretrain` run folder under DIR/runs/<budget>/d<depth>. A finished
run writes scaling.json (its point and final validation loss); a re-run of the sweep skips it, and
resumes a run that has checkpoints but no scaling.json from its newest checkpoint, exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.common import LmforgeError, atomic_write_json, read_json
from lmforge.scaling.options import SWEEP_PRESETS, SweepOptions, SweepPreset

SWEEP_FORMAT = "lmforge-scaling-sweep"
RESULT_FILE = "scaling.json"


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: a budget, a size on the dial, and the steps the budget buys."""

    budget: float
    depth: int
    n_embd: int
    params: int  # N: weights of the matrix multiplies (see the module docstring)
    flops_per_token: float
    steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def name(self) -> str:
        return f"{self.budget:.2e}/d{self.depth:02d}"


def model_overrides(preset: SweepPreset, depth: int, seq_len: int) -> dict:
    """The transformer config fields one position of the dial sets (the rest is the base preset's)."""
    width = preset.aspect * depth
    heads = max(1, width // preset.head_dim)
    return {"n_layer": depth, "n_embd": width, "n_head": heads, "n_kv_head": heads, "block_size": seq_len,
            "dropout": 0.0}


def matmul_params(model: nn.Module) -> int:
    """N of the FLOPs convention: the weights of every linear layer (the output head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def size_of(preset: SweepPreset, depth: int, vocab_size: int, seq_len: int) -> tuple[int, float]:
    """(N, training FLOPs per token) of one position of the dial, from a model built on the meta
    device (shapes only, no memory)."""
    from lmforge.models.transformer import GPT, get_config

    cfg = get_config(preset.base, vocab_size=vocab_size, **model_overrides(preset, depth, seq_len))
    with torch.device("meta"):
        model = GPT(cfg)
    return matmul_params(model), model.flops_per_token(seq_len)


def point_at(preset: SweepPreset, budget: float, depth: int, *, vocab_size: int, batch_size: int,
             seq_len: int) -> SweepPoint:
    """A size trained for the whole optimizer steps closest to `budget` (within half a step of it)."""
    n, fpt = size_of(preset, depth, vocab_size, seq_len)
    per_step = batch_size * seq_len
    steps = max(1, round(budget / (fpt * per_step)))
    return SweepPoint(budget=budget, depth=depth, n_embd=preset.aspect * depth, params=n, flops_per_token=fpt,
                      steps=steps, tokens_per_step=per_step)


def batch_and_length(opts: SweepOptions) -> tuple[int, int]:
    """Sequences per step and tokens per sequence: the options', else the preset's."""
    preset = SWEEP_PRESETS[opts.preset]
    return opts.batch_size or preset.batch_size, opts.seq_len or preset.seq_len


def plan_sweep(opts: SweepOptions, *, vocab_size: int, flops: list[float] | None = None,
               depths: list[int] | None = None) -> list[SweepPoint]:
    """The IsoFLOP grid. With `depths` given, every budget trains exactly those sizes; otherwise
    each budget gets `opts.sizes` consecutive depths of the preset's dial, the window whose middle
    (in log N) is nearest the size that would see `opts.tokens_per_param` tokens per parameter,
    among the sizes that train for at least `opts.min_steps` steps."""
    preset = SWEEP_PRESETS[opts.preset]
    batch, seq = batch_and_length(opts)
    budgets = sorted(set(flops or preset.flops))
    grid = []
    for budget in budgets:
        candidates = [point_at(preset, budget, d, vocab_size=vocab_size, batch_size=batch, seq_len=seq)
                      for d in sorted(set(depths or preset.depths))]
        if depths:
            short = [p for p in candidates if p.steps < opts.min_steps]
            if short:
                raise LmforgeError(f"at budget {budget:.2e} FLOPs depth {short[0].depth} would train {short[0].steps} "
                                   f"steps, fewer than --min-steps {opts.min_steps}; give a larger budget, smaller "
                                   "depths, or a lower --min-steps")
            grid += candidates
            continue
        candidates = [p for p in candidates if p.steps >= opts.min_steps]
        if len(candidates) < min(3, opts.sizes):
            raise LmforgeError(f"budget {budget:.2e} FLOPs is too small for the {opts.preset} dial: only "
                               f"{len(candidates)} size(s) train for --min-steps {opts.min_steps} steps")
        guess = math.log(math.sqrt(budget / (6.0 * opts.tokens_per_param)))  # C = 6 N D with D = ratio * N
        k = min(opts.sizes, len(candidates))
        windows = [candidates[i:i + k] for i in range(len(candidates) - k + 1)]
        grid += min(windows, key=lambda w, g=guess: abs((math.log(w[0].params) + math.log(w[-1].params)) / 2 - g))
    return grid


# ----------------------------------------------------------------------------- time estimate


def measure_tokens_per_second(preset: SweepPreset, depth: int, *, vocab_size: int, batch_size: int,
                              seq_len: int, device: str = "cpu", steps: int = 4) -> float:
    """Training tokens per second of one size on this machine: a few real forward/backward/update
    steps on `device` (with the autocast dtype training would use there), after one untimed warm-up
    step."""
    from lmforge.models.transformer import GPT, get_config
    from lmforge.train.precision import autocast_dtype

    cfg = get_config(preset.base, vocab_size=vocab_size, **model_overrides(preset, depth, seq_len))
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    kind = device.split(":")[0]
    dtype = autocast_dtype(kind, "auto")
    elapsed = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(kind, dtype=dtype, enabled=dtype is not None):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "cuda":
            torch.cuda.synchronize()
        if i:
            elapsed += time.perf_counter() - t0
    return steps * batch_size * seq_len / elapsed


def threads_per_job(jobs: int) -> int:
    return max(1, torch.get_num_threads() // jobs)


def estimate_seconds(grid: list[SweepPoint], opts: SweepOptions, vocab_size: int,
                     device: str = "cpu") -> dict[int, float]:
    """Tokens per second of every depth in the grid, measured here on `device` with the threads one
    of `opts.jobs` jobs gets."""
    preset = SWEEP_PRESETS[opts.preset]
    batch, seq = batch_and_length(opts)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(opts.jobs))
    try:
        return {d: measure_tokens_per_second(preset, d, vocab_size=vocab_size, batch_size=batch, seq_len=seq,
                                             device=device)
                for d in sorted({p.depth for p in grid})}
    finally:
        torch.set_num_threads(threads)


CONVENTION = ("FLOPs = tokens x (6 N + 12 n_layer n_head head_dim T): forward and backward of every matrix "
              "multiply (N: all linear layers' weights incl. the output head; not the input embedding table, "
              "a lookup, nor norms) plus attention's two T x T products (PaLM's accounting)")


def grid_lines(grid: list[SweepPoint], speeds: dict[int, float] | None = None, jobs: int = 1) -> list[str]:
    """The grid as `--dry-run` prints it: one row per run, with the wall time if speeds are known."""
    lines = [CONVENTION,
             f"{'budget':>9} {'depth':>5} {'width':>5} {'N':>9} {'tokens':>11} {'D/N':>7} {'steps':>6} "
             f"{'FLOPs':>9} {'est. s':>7}"]
    total = 0.0
    for p in grid:
        secs = p.tokens / speeds[p.depth] if speeds else None
        total += secs or 0.0
        lines.append(f"{p.budget:9.2e} {p.depth:5d} {p.n_embd:5d} {p.params:9,d} {p.tokens:11,d} "
                     f"{p.tokens / p.params:7.1f} {p.steps:6d} {p.flops:9.2e} "
                     + (f"{secs:7.0f}" if secs is not None else f"{'-':>7}"))
    summary = f"{len(grid)} runs over {len({p.budget for p in grid})} budgets, {sum(p.flops for p in grid):.2e} FLOPs"
    if speeds:
        summary += (f"; estimated {total / jobs / 60:.1f} min of training on this machine with {jobs} job(s) "
                    "(measured tokens/s per size; evaluation and checkpoints add a few seconds per run)")
    return lines + [summary]


# ----------------------------------------------------------------------------- running


def sweep_record(opts: SweepOptions, data_dir: str, fingerprint: str, vocab_size: int) -> dict:
    batch, seq = batch_and_length(opts)
    return {"format": SWEEP_FORMAT, "version": 1, "preset": opts.preset,
            "preset_fields": dataclasses.asdict(SWEEP_PRESETS[opts.preset]), "batch_size": batch, "seq_len": seq,
            "eval_tokens": opts.eval_tokens, "data_dir": str(Path(data_dir).resolve()),
            "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size}


def check_sweep_folder(out: Path, record: dict) -> None:
    """A sweep folder holds one experiment: the same data, tokenizer, batch and dial for every run
    (budgets can be added). Anything else is refused before a run is started."""
    path = out / "sweep.json"
    if not path.exists():
        atomic_write_json(path, record)
        return
    old = read_json(path, "sweep record", fmt=SWEEP_FORMAT)
    keys = ("dial", "batch_size", "seq_len", "eval_tokens", "tokenizer_fingerprint", "vocab_size")

    def value(rec: dict, key: str):
        if key == "dial":  # the preset's budgets and depth range may differ: they are not the experiment
            return {k: rec["preset_fields"].get(k) for k in ("base", "aspect", "head_dim")}
        return rec.get(key)

    changed = [k for k in keys if value(old, k) != value(record, k)]
    if changed:
        raise LmforgeError(f"{out} holds a sweep with different {', '.join(changed)}; choose another --out "
                           "(a scaling fit must compare runs that differ only in size and tokens)")


def run_point(point: SweepPoint, opts: SweepOptions, train_cfg, data_dir: str, run_dir: Path) -> dict:
    """Train one point of the grid in its run folder (skipped if finished, resumed if interrupted)
    and return its record: the point plus the final validation loss (nats per token) and bpb."""
    from lmforge.stages.options import PretrainOptions
    from lmforge.stages.pretrain import pretrain
    from lmforge.train import checkpoint as ckpt_io

    done = run_dir / RESULT_FILE
    if done.exists():
        return read_json(done, "scaling run record")
    preset = SWEEP_PRESETS[opts.preset]
    batch, seq = batch_and_length(opts)
    resume = bool(ckpt_io.list_checkpoints(run_dir / "checkpoints"))
    popts = PretrainOptions(data_dir=data_dir, model="transformer", preset=preset.base,
                            model_overrides=model_overrides(preset, point.depth, seq), batch_size=batch,
                            seq_len=seq, eval_tokens=opts.eval_tokens, resume=resume)
    # The schedule decays to zero at the last step: a run stopped early, or one whose decay ended
    # before the budget, would not be a fair point of its IsoFLOP curve.
    cfg = dataclasses.replace(train_cfg, out_dir=str(run_dir), max_steps=point.steps, time_budget=None,
                              eval_every=0, min_lr_frac=0.0,
                              warmup_steps=min(train_cfg.warmup_steps, max(1, point.steps // 10)),
                              ckpt_every=max(1, point.steps // 4))
    result = pretrain(popts, cfg)
    if result["tokens"] != point.tokens:
        raise LmforgeError(f"run {run_dir} trained {result['tokens']:,} tokens, not the {point.tokens:,} planned "
                           "(was it started with other settings?)")
    record = {**dataclasses.asdict(point), "name": point.name, "tokens": point.tokens, "flops": point.flops,
              "loss": result["val_loss"], "bpb": result["val_bpb"], "train_time": result["train_time"],
              "tokens_per_s": point.tokens / max(result["train_time"], 1e-9),
              "epochs": point.tokens / _train_tokens(data_dir)}  # > 1: the corpus was repeated
    atomic_write_json(done, record)
    return record


def _train_tokens(data_dir: str) -> int:
    from lmforge.data.prepare import load_manifest

    return load_manifest(data_dir)["splits"]["train"]["tokens"]


def _run_in_worker(threads: int, *args) -> dict:
    torch.set_num_threads(threads)
    return run_point(*args)


def run_sweep(grid: list[SweepPoint], opts: SweepOptions, train_cfg, data_dir: str, out: Path) -> list[dict]:
    """Every point of the grid, smallest budget first, `opts.jobs` at a time (each job a process with
    its share of the cores); returns their records in grid order."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    def started(i: int, point: SweepPoint) -> Path:
        run_dir = out / "runs" / point.name
        state = "done" if (run_dir / RESULT_FILE).exists() else ("training" if opts.jobs == 1 else "queued")
        print(f"[{i}/{len(grid)}] budget {point.budget:.2e}, depth {point.depth} (N {point.params:,}, "
              f"{point.tokens:,} tokens, {point.steps} steps): {state}", flush=True)
        return run_dir

    def finished(i: int, point: SweepPoint, rec: dict) -> dict:
        print(f"[{i}/{len(grid)}] budget {point.budget:.2e}, depth {point.depth}: val loss {rec['loss']:.4f} "
              f"nats/token ({rec['bpb']:.4f} bits/byte) in {rec['train_time']:.0f} s", flush=True)
        return rec

    if opts.jobs == 1:
        return [finished(i, p, run_point(p, opts, train_cfg, data_dir, started(i, p))) for i, p in enumerate(grid, 1)]
    quiet = dataclasses.replace(train_cfg, progress=False)  # several bars in one terminal garble each other
    threads = threads_per_job(opts.jobs)
    with ProcessPoolExecutor(opts.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_in_worker, threads, p, opts, quiet, data_dir, started(i, p))
                   for i, p in enumerate(grid, 1)]
        return [finished(i, p, f.result()) for i, (p, f) in enumerate(zip(grid, futures), 1)]


def collect_runs(out: str | Path) -> list[dict]:
    """The records of the finished runs of a sweep folder (unfinished ones have none yet)."""
    root = Path(out) / "runs"
    if not (Path(out) / "sweep.json").exists():
        raise LmforgeError(f"{out} is not a sweep folder (no sweep.json); run `lmforge scaling sweep --out {out}`")
    return [read_json(p, "scaling run record") for p in sorted(root.glob(f"*/*/{RESULT_FILE}"))]
