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


def device_mesh(world: int, device: str, tensor_parallel: int = 1):
    """The processes as a ("dp", "tp") grid: `tensor_parallel` consecutive ranks split each matrix
    (they exchange activations every sublayer, so they belong on one machine's fast links), and the
    world / tensor_parallel groups of them split the data (and, under FSDP2, the weights)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.train.distributed import data_parallel_size

    return init_device_mesh(device.split(":")[0], (data_parallel_size(world, tensor_parallel), tensor_parallel),
                            mesh_dim_names=("dp", "tp"))


def _mesh(world: int, device: str):
    return device_mesh(world, device)["dp"]


def mixed_precision(param_dtype: torch.dtype | None):
    """FSDP2's precision policy for a bf16 run: each block's weights all-gathered and computed in bf16
    (half the bytes on the wire and in the gathered copy), gradients reduce-scattered in fp32 into the
    fp32 shards the optimizer updates (bf16 sums over many ranks lose bits). None: all fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, world: int, device: str, *, mesh=None, param_dtype: torch.dtype | None = None,
                compile_blocks: bool = False) -> nn.Module:
    """FSDP2 in place: each shard unit, then the root (which holds what is left: embeddings, final
    norm, output head). `mesh`: the data-parallel dimension of a 2-D mesh whose "tp" dimension
    tensor_parallel already split (then the shards are 2-D: rows over dp within each tp split).
    `compile_blocks`: torch.compile each unit before sharding, FSDP2's supported order (one graph per
    block; the all-gathers stay outside the graphs)."""
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else _mesh(world, device)
    policy = mixed_precision(param_dtype)
    if compile_blocks:
        compile_units(model)
    for unit in _units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _units(model: nn.Module) -> list[nn.Module]:
    return model.shard_units() if hasattr(model, "shard_units") else []


def compile_units(model: nn.Module) -> None:
    """torch.compile each block in place (the module tree and parameter names stay as they are, so
    sharding, state dicts and checkpoints do not see it)."""
    for unit in _units(model):
        unit.compile()


def uncompile_units(model: nn.Module) -> None:
    """Undo compile_units (the Trainer's fallback when compiling fails)."""
    for unit in _units(model):
        unit._compiled_call_impl = None


def tensor_parallel(model: nn.Module, world: int, device: str, *, mesh=None) -> nn.Module:
    """Tensor parallelism in place, from the model's plan {module name: "colwise" | "rowwise"}, over
    `world` ranks (or the given 1-D mesh, the "tp" dimension of a 2-D one)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = model.tensor_parallel_plan() if hasattr(model, "tensor_parallel_plan") else {}
    if not plan:
        raise LmforgeError(f"the {getattr(model, 'family', type(model).__name__)} family has no tensor-parallel plan")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    mesh = mesh if mesh is not None else device_mesh(world, device, world)["tp"]
    parallelize_module(model, mesh, {name: styles[kind]() for name, kind in plan.items()})
    return model


def check_tensor_parallel(model: nn.Module, degree: int) -> None:
    """One clear error before any collective when the model cannot be split `degree` ways."""
    cfg = getattr(model, "config", None)
    heads = {"query heads": getattr(cfg, "n_head", None), "key/value heads": getattr(cfg, "n_kv_head", None)}
    for what, n in heads.items():
        if n is not None and n % degree:
            raise LmforgeError(f"--tensor-parallel {degree} does not divide the model's {n} {what}")
    if not (hasattr(model, "tensor_parallel_plan") and model.tensor_parallel_plan()):
        raise LmforgeError(f"the {getattr(model, 'family', type(model).__name__)} family has no tensor-parallel plan")


def _grad_groups(params) -> list[list[torch.Tensor]]:
    """Gradients in groups of like placement (plain tensors; DTensors by mesh and placements): torch's
    foreach norms and scaling take one kind at a time."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            groups.setdefault((id(g.device_mesh), tuple(g.placements)) if is_sharded(g) else None, []).append(g)
    return list(groups.values())


def grad_norm(params) -> torch.Tensor:
    """The total gradient norm over parameters that may be plain tensors (replicated), FSDP2 shards,
    tensor-parallel splits or both: torch's norm per group of like-placed gradients (partial sums
    reduced over that group's mesh), then combined, identical on every rank."""
    norms = [full_tensor(torch.nn.utils.get_total_norm(gs)).float().reshape(()) for gs in _grad_groups(params)]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def clip_grads_(params, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by max_norm / total_norm when that is below 1 (a group at a time, as
    grad_norm: one foreach call may not mix plain tensors and DTensors)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for gs in _grad_groups(params):
        torch._foreach_mul_(gs, coef.to(gs[0].device))


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
