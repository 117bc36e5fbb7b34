"""Parallelism beyond DDP, applied to a built model from outside (the model knows nothing about it):

  * FSDP2 (`shard_model`): `torch.distributed.fsdp.fully_shard` on each of the model's shard units
    (its blocks, from the protocol's `shard_units()`), then on the root. Every rank then holds 1/N of
    the parameters, gradients and optimizer state; a block's parameters are all-gathered just before
    it runs and freed after. Numerics are those of one process on the global batch: autocast decides
    the matmul dtype as before, gradients are averaged by reduce-scatter.
  * Pipeline parallel (`pipeline`): the model cut by layers into one stage per rank
    (`pipeline_stage(i, n)`), micro-batches scheduled by `torch.distributed.pipelining` (GPipe, 1F1B).
  * Tensor parallel (`tensor_parallel`): DTensor's `parallelize_module` with the model's own plan
    (`tensor_parallel_plan()`: which linear layers split by output columns — q/k/v, gate/up — and
    which by input rows — o, down), so a block's attention heads and MLP units are spread over the
    ranks and one all-reduce per sublayer joins them.

The state these produce is gathered back to ordinary full tensors for checkpoints (`full_state_dict`,
`full_optimizer_state`), so a checkpoint written by N sharded ranks loads in one process (sample,
export), resumes in M ranks, sharded or not (`load_optimizer_states` cuts the state back to shards).
Never run on GPUs or several nodes here: tested with gloo processes on one CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.common import LmforgeError

PARALLEL = ("ddp", "fsdp")


def _mesh(world: int, device: str):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.split(":")[0], (world,))


def shard_model(model: nn.Module, world: int, device: str) -> nn.Module:
    """FSDP2 in place: each shard unit, then the root (which holds what is left: embeddings, final
    norm, output head)."""
    from torch.distributed.fsdp import fully_shard

    units = model.shard_units() if hasattr(model, "shard_units") else []
    mesh = _mesh(world, device)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tensor_parallel(model: nn.Module, world: int, device: str) -> nn.Module:
    """Tensor parallelism in place, from the model's plan {module name: "colwise" | "rowwise"}."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = model.tensor_parallel_plan() if hasattr(model, "tensor_parallel_plan") else {}
    if not plan:
        raise LmforgeError(f"the {getattr(model, 'family', type(model).__name__)} family has no tensor-parallel plan")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, _mesh(world, device), {name: styles[kind]() for name, kind in plan.items()})
    return model


SCHEDULES = ("gpipe", "1f1b")


def pipeline(model: nn.Module, rank: int, world: int, n_microbatches: int, loss_fn, schedule: str = "1f1b",
             device: str = "cpu"):
    """(schedule, stage module) for pipeline parallelism: this rank runs stage `rank` of `world`
    (`model.pipeline_stage`), micro-batches flow through `torch.distributed.pipelining`'s GPipe (all
    forwards, then all backwards) or 1F1B (one forward, one backward, interleaved once the pipe is
    full) schedule. The first rank calls `schedule.step(ids)`, the last `schedule.step(target=...,
    losses=[...])`, the rest `schedule.step()`. Idle time per step, in theory: (p - 1) / (m + p - 1)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise LmforgeError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    stage_module = model.pipeline_stage(rank, world)
    stage = PipelineStage(stage_module, rank, world, torch.device(device))
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn), stage_module


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else t itself."""
    return t.full_tensor() if is_sharded(t) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full tensors on the CPU, gathered from every rank (all ranks must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with every sharded tensor gathered whole (all ranks must call it):
    the layout one process would save, so checkpoints move between DDP, FSDP2 and any process count."""
    sd = opt.state_dict()
    sd["state"] = {pid: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                   for pid, s in sd["state"].items()}
    return sd


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank holds (a shard's, under FSDP2 or tensor parallelism)."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())
