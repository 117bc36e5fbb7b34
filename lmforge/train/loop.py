"""The one training loop every stage shares (pretraining now; SFT, reward model, DPO, RL later).

A stage describes itself as a `Task`: where its micro-batches come from, how its loss is computed,
how it evaluates, and how its data position is saved. The `Trainer` owns everything else:
distributed setup (torchrun + DDP), mixed precision, gradient accumulation and clipping, the
optimizers and LR schedule, NaN detection (of the loss and of the gradient norm), logging, progress
bar, loss-curve plot, and atomic checkpoints with exact resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from lmforge.common import LmforgeError
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.config import TrainConfig  # noqa: F401 (also imported from here)
from lmforge.train.distributed import (
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    data_parallel_size,
    setup_distributed,
)
from lmforge.train.logs import plot_expert_loads, plot_loss_curve
from lmforge.train.optim import build_optimizers, lr_multiplier
from lmforge.train.precision import autocast_dtype, use_compile


class Task(Protocol):
    """What a training stage plugs into the Trainer."""

    def next_batch(self) -> Any:
        """The next micro-batch for this rank (already on the right device)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's targets, number of target tokens in the batch)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, identical on every rank (reduce across ranks inside)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    # Optional: `train_metrics() -> dict[str, float]`, the task's own numbers since the previous log
    # line (reward, accuracy, KL, margins; see RunningMetrics). The Trainer adds them to each training
    # log line, averaged over the processes, so the line describes the whole step.


class RunningMetrics:
    """Sums of named training metrics since the last log line (means reported): what a Task's
    `train_metrics` usually returns."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def pop(self) -> dict[str, float]:
        out = {k: round(v / self.count, 6) for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out


class TrainingDiverged(LmforgeError):
    pass


class Trainer:
    """Runs `task` on `model` under `cfg`. `extra_state` is stored in every checkpoint (e.g. the
    tokenizer fingerprint and data folder) so later stages can check what they load."""

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, *, extra_state: dict | None = None,
                 extra_files: dict[str, bytes] | None = None, resume: bool = False,
                 peak_flops: float | None = None):
        self.cfg = cfg
        self.task = task
        self.extra_state = extra_state or {}
        self.extra_files = extra_files or {}
        self.rank, self.local_rank, self.world, self.device = setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.log_path = self.out_dir / "log.jsonl"
        self.peak_flops = peak_flops
        for name in ("max_steps", "grad_accum", "log_every"):
            if getattr(cfg, name) <= 0:
                raise LmforgeError(f"{name} must be positive, got {getattr(cfg, name)}")
        if cfg.time_budget is not None and cfg.time_budget <= 0:
            raise LmforgeError(f"time budget must be positive, got {cfg.time_budget}")

        self.raw_model = model.to(self.device)
        self.amp_dtype = autocast_dtype(self.device.split(":")[0], cfg.dtype)
        self.tp = cfg.tensor_parallel
        self.data_world = self._check_parallel(model, task)  # processes that read different data
        self.fsdp = cfg.parallel == "fsdp" and self.data_world > 1
        self.sharded = self.fsdp or self.tp > 1  # the weights are DTensors: split over the processes
        self.compiled = use_compile(cfg.compile, self.device, self.raw_model)
        if self.sharded:
            self._parallelize(resume)  # before the optimizers: they hold the shards
        self.optimizers = build_optimizers(
            self.raw_model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
            fused_ok=self.device.startswith("cuda"))
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]

        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds spent in training steps (excludes eval and checkpointing)
        self.last_eval: dict[str, float] = {}
        if resume:
            self._resume()  # restores every rank's RNG state as it was at the checkpoint
        else:
            torch.manual_seed(cfg.seed + self.rank)  # dropout etc.; the model was initialised before
            existing = ckpt_io.list_checkpoints(self.ckpt_root)
            if existing:
                # Never mix two runs' checkpoints in one folder, and never delete one silently.
                raise LmforgeError(f"{self.out_dir} already holds checkpoints (newest: {existing[-1].name}); "
                                   "pass --resume to continue that run, or choose another --out")
            if self.is_main and self.log_path.exists():
                self.log_path.unlink()  # a fresh run starts a fresh log

        self.model = self._wrap(self.raw_model, self.compiled)

    def _check_parallel(self, model: nn.Module, task) -> int:
        """The data-parallel world size, after one clear error for a combination that cannot run."""
        tp, world = self.tp, self.world
        if data_parallel_size(world, tp) == world:
            return world
        if world > tp and self.cfg.parallel != "fsdp":
            raise LmforgeError(f"--tensor-parallel {tp} with {world} processes: add --parallel fsdp to shard the "
                               f"data-parallel groups (a 2-D mesh); DDP over tensor-parallel weights is not offered")
        share = getattr(task, "share", None)
        if share is None or share.world != world // tp:
            raise LmforgeError("tensor parallelism is offered for pretraining only: this stage's data is not "
                               "divided by tensor-parallel groups")
        from lmforge.train.parallel import check_tensor_parallel

        check_tensor_parallel(model, tp)
        return world // tp

    def _parallelize(self, resume: bool) -> None:
        """Tensor parallel inside groups of `tp` processes, then FSDP2 across the groups (a 2-D mesh),
        each block compiled first when compiling. A whole-tensor checkpoint to resume goes in before the
        weights are split; a sharded one is read into the shards later (_resume)."""
        from lmforge.train import parallel

        found = ckpt_io.list_checkpoints(self.ckpt_root) if resume else []
        if found and not ckpt_io.is_sharded_checkpoint(found[-1]):
            ckpt_io.load_model_weights(self.raw_model, found[-1])
        mesh = parallel.device_mesh(self.world, self.device, self.tp)
        if self.tp > 1:
            parallel.tensor_parallel(self.raw_model, self.tp, self.device, mesh=mesh["tp"])
        if self.fsdp:
            parallel.shard_model(self.raw_model, self.data_world, self.device, mesh=mesh["dp"],
                                 param_dtype=self.amp_dtype, compile_blocks=self.compiled)
        elif self.compiled:
            parallel.compile_units(self.raw_model)

    def _wrap(self, model: nn.Module, compiled: bool) -> nn.Module:
        """The module the training step calls: optionally compiled, then DDP-wrapped (parallelism
        applied from outside; the model itself knows nothing about it)."""
        if self.sharded:  # split in place in __init__ (each block compiled there when compiling)
            if not compiled:
                from lmforge.train.parallel import uncompile_units

                uncompile_units(model)
            return model
        if compiled:
            model = torch.compile(model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.local_rank] if self.device.startswith("cuda") else None)
        return model

    def _first_step_with_fallback(self) -> float:
        """Run the first step; if torch.compile cannot compile here (no C++ compiler, unsupported
        backend), warn, rewind data position and RNG, and redo the step eagerly."""
        task_state, rng = self.task.state_dict(), ckpt_io.capture_rng()
        try:
            return self.train_step()
        except Exception as e:  # inductor raises many exception types; anything here is a compile failure
            if isinstance(e, LmforgeError) or not self.compiled:
                raise
            self._print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "continuing without it (--compile off skips the attempt)")
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.task.load_state_dict(task_state)
            ckpt_io.restore_rng(rng)
            self.compiled = False
            self.model = self._wrap(self.raw_model, False)
            return self.train_step()

    # ------------------------------------------------------------------ resume

    def _resume(self):
        found = ckpt_io.list_checkpoints(self.ckpt_root)
        if not found:
            raise LmforgeError(f"--resume: no checkpoint in {self.ckpt_root}")
        path = found[-1]
        state = ckpt_io.read_checkpoint_state(path)
        family = getattr(self.raw_model, "family", "transformer")
        if ckpt_io.checkpoint_family(state) != family:
            raise LmforgeError(f"--resume: checkpoint {path} holds a {ckpt_io.checkpoint_family(state)} model, "
                               f"this run trains a {family}")
        ours = self.raw_model.config.to_dict()
        theirs = ckpt_io.checkpoint_model_config(path, state).to_dict()
        if theirs != ours:
            diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
            raise LmforgeError(f"--resume: checkpoint {path} was trained with a different model config "
                               f"(checkpoint vs now: {diff})")
        for key in ("tokenizer_fingerprint",):
            if key in self.extra_state and state.get(key) not in (None, self.extra_state[key]):
                raise LmforgeError(f"--resume: checkpoint {path} used a different tokenizer than this run's data")
        if not self.sharded or ckpt_io.is_sharded_checkpoint(path):  # (else loaded before sharding, in __init__)
            ckpt_io.load_model_weights(self.raw_model, path)
            self.raw_model.to(self.device)
        ckpt_io.load_optimizer_states(self.optimizers, path, state)
        self.task.load_state_dict(state["task"])
        ckpt_io.restore_rng(state["rng"][str(self.rank)] if str(self.rank) in state["rng"] else state["rng"]["0"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.train_time = state["train_time"]
        self.last_eval = state.get("last_eval", {})
        if self.is_main and self.log_path.exists():
            # Drop log lines written after this checkpoint (the run died later): the resumed run
            # will write them again.
            kept = [ln for ln in self.log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            self.log_path.write_text("".join(k + "\n" for k in kept))
        self._print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ helpers

    def _print(self, msg: str):
        if self.is_main:
            tqdm.write(msg)

    def _log(self, record: dict):
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp_dtype)

    def progress(self) -> float:
        """Fraction of the run done: by wall clock when a time budget is set, else by steps."""
        if self.cfg.time_budget is not None:
            return self.train_time / self.cfg.time_budget
        return self.step / self.cfg.max_steps

    def done(self) -> bool:
        if self.step >= self.cfg.max_steps:
            return True
        return self.cfg.time_budget is not None and self.train_time >= self.cfg.time_budget

    def save(self):
        """Checkpoint on rank 0 (model and optimizer state are identical across DDP ranks); every
        rank's RNG state and the task's data position are gathered so resume is exact."""
        # The step checks stop a NaN before it reaches the weights; this is the last line of defence
        # for "the last good checkpoint".
        # a rank's own shard under FSDP2 (a plain tensor where it has just been gathered, e.g. after eval)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.raw_model.parameters()]
        if not all(torch.isfinite(p).all() for p in local):  # a rank's own shard: every rank checks
            self._diverged(f"the weights are not finite after step {self.step}; not saved")
        sharded_format = self.cfg.checkpoint_format == "sharded" or (self.cfg.checkpoint_format == "auto"
                                                                      and self.sharded)
        full, optimizers = None, self.optimizers
        if self.sharded and not sharded_format:  # --checkpoint-format full: gathered whole for the first rank
            from lmforge.train.parallel import full_optimizer_state, full_state_dict

            full = full_state_dict(self.raw_model)
            optimizers = [full_optimizer_state(opt) for opt in self.optimizers]
        rng = ckpt_io.capture_rng()
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rngs = {str(r): g for r, g in enumerate(gathered)}
        else:
            rngs = {"0": rng}
        state = {"tokens_seen": self.tokens_seen, "train_time": self.train_time,
                 "task": self.task.state_dict(), "rng": rngs, "train_config": asdict(self.cfg),
                 "last_eval": self.last_eval, "world_size": self.world, **self.extra_state}
        if sharded_format:  # every rank writes its own shards
            ckpt_io.save_sharded_checkpoint(self.ckpt_root, self.step, self.raw_model, self.optimizers, state,
                                            keep=self.cfg.keep_checkpoints, files=self.extra_files)
            return
        if self.is_main:
            ckpt_io.save_checkpoint(self.ckpt_root, self.step, self.raw_model, optimizers, state,
                                    keep=self.cfg.keep_checkpoints, files=self.extra_files, state_dict=full)
        if self.world > 1:
            dist.barrier()

    def evaluate(self) -> dict[str, float]:
        self.raw_model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.raw_model)
        self.raw_model.train()
        self.last_eval = metrics
        self._log({"step": self.step, "tokens": self.tokens_seen, "time": round(self.train_time, 3),
                   **{f"val_{k}": v for k, v in metrics.items()}})
        if metrics:
            self._print(f"step {self.step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> float:
        """One optimizer step: grad_accum micro-batches, clip, schedule, update. Returns the mean loss."""
        cfg = self.cfg
        mult = lr_multiplier(self.progress(), self.step, warmup_steps=cfg.warmup_steps,
                             schedule=cfg.schedule, min_lr_frac=cfg.min_lr_frac, decay_frac=cfg.decay_frac)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        loss_sum, ntok = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = self.task.next_batch()
            # Only the last micro-batch all-reduces (DDP) or reduce-scatters (FSDP2) gradients.
            sync = micro == cfg.grad_accum - 1 or self.data_world == 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)
            ctx = contextlib.nullcontext() if sync or self.sharded else self.model.no_sync()
            with ctx:
                with self._autocast():
                    loss, n = self.task.loss(self.model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float().item()
            ntok += n
        loss_mean = all_reduce_mean(loss_sum / cfg.grad_accum, self.device)
        if not math.isfinite(loss_mean):
            self._diverged(f"loss became {loss_mean} at step {self.step + 1}")
        # A finite loss can still have an inf/NaN gradient (an overflow in the backward pass): one
        # such step would make every weight NaN, and the next checkpoint would save them. The norm
        # is of the gradients after DDP's all-reduce, so every rank sees the same one and stops.
        if self.sharded:  # the norm of the whole gradient, not of this rank's shards
            from lmforge.train.parallel import grad_norm as sharded_grad_norm

            grad_norm = sharded_grad_norm(self.raw_model.parameters())
        else:
            grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not torch.isfinite(grad_norm):
            self._diverged(f"the gradient norm became {grad_norm.item()} at step {self.step + 1} "
                           f"(loss {loss_mean:.4f})")
        if cfg.grad_clip > 0 and self.sharded:
            from lmforge.train.parallel import clip_grads_

            clip_grads_(self.raw_model.parameters(), cfg.grad_clip, grad_norm)
        elif cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.raw_model.parameters(), cfg.grad_clip, grad_norm)
        self.last_grad_norm = grad_norm.item()
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if hasattr(self.raw_model, "after_step"):  # a language model (a head around one has none)
            self.raw_model.after_step()  # e.g. MoE bias balancing, from this step's loads
        self.step += 1
        self.tokens_seen += int(all_reduce_sum([ntok], self.device)[0]) // self.tp  # a group reads one batch
        self.current_lr_mult = mult
        return loss_mean

    def _task_metrics(self) -> dict[str, float]:
        """The model's and the task's train_metrics(), averaged over the processes (each reports the same
        names)."""
        metrics = dict(self.raw_model.train_metrics()) if hasattr(self.raw_model, "train_metrics") else {}
        if hasattr(self.task, "train_metrics"):
            metrics.update(self.task.train_metrics())
        if not metrics:
            return {}
        if self.world > 1:
            names = sorted(metrics)
            metrics = {k: round(v / self.world, 6)
                       for k, v in zip(names, all_reduce_sum([metrics[k] for k in names], self.device))}
        return metrics

    def _diverged(self, what: str):
        """Stop without stepping: nothing of this step reaches the weights or a checkpoint."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        last = ckpt_io.list_checkpoints(self.ckpt_root)
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what}; stopping ({keep}). "
                               "Try a lower learning rate or more warmup.")

    def fit(self) -> dict:
        cfg = self.cfg
        self.raw_model.train()
        flops_per_token = getattr(self.raw_model, "flops_per_token", lambda: None)()
        total = None if cfg.time_budget is not None else cfg.max_steps
        bar = tqdm(total=total, initial=self.step, disable=not (cfg.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        window_t, window_tok = 0.0, 0
        last_loss = float("nan")
        first = True
        while not self.done():
            t0 = time.perf_counter()
            tok_before = self.tokens_seen
            last_loss = self._first_step_with_fallback() if first else self.train_step()
            first = False
            dt = time.perf_counter() - t0
            if self.world > 1 and cfg.time_budget is not None:
                dt = all_reduce_max(dt, self.device)  # every rank must agree on when to stop
            self.train_time += dt
            window_t += dt
            window_tok += self.tokens_seen - tok_before
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.done():
                tok_s = window_tok / max(window_t, 1e-9)
                rec = {"step": self.step, "loss": round(last_loss, 6), "lr_mult": round(self.current_lr_mult, 6),
                       "grad_norm": round(self.last_grad_norm, 6), "tokens": self.tokens_seen,
                       "tok_per_s": round(tok_s, 1), "time": round(self.train_time, 3)}
                if flops_per_token and self.peak_flops:
                    rec["mfu"] = round(flops_per_token * tok_s / self.peak_flops, 4)
                self._log({**rec, **self._task_metrics()})
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}")
                window_t, window_tok = 0.0, 0
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not self.done():
                self.evaluate()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not self.done():
                self.save()
        bar.close()
        metrics = self.evaluate()
        self.save()
        if self.is_main:
            plot_loss_curve(self.log_path, self.out_dir / "loss.png")
            plot_expert_loads(self.log_path, self.out_dir / "experts.png")  # nothing unless a mixture of experts
        return {"step": self.step, "tokens": self.tokens_seen, "train_time": self.train_time,
                "train_loss": last_loss, **{f"val_{k}": v for k, v in metrics.items()}}


