"""torch.distributed for every stage: joining the torchrun process group, the few collectives the
Trainer and the Tasks use (on plain Python numbers), and leaving it. Without torchrun every
function here is a no-op on one process."""
from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.common import LmforgeError, default_device, dist_info


def setup_distributed(device: str) -> tuple[int, int, int, str]:
    """Initialise torch.distributed when launched by torchrun. Returns (rank, local_rank, world, device)."""
    rank, local_rank, world = dist_info()
    if device == "auto":
        device = default_device()
    if world > 1:
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world, device


def data_parallel_size(world: int, tensor_parallel: int) -> int:
    """How many groups of `tensor_parallel` processes (each one model copy, reading one batch) the
    world holds, or one clear error."""
    if tensor_parallel > 1 and (world == 1 or world % tensor_parallel):
        raise LmforgeError(f"--tensor-parallel {tensor_parallel} needs a multiple of {tensor_parallel} processes "
                           f"under torchrun (this run has {world})")
    return world // tensor_parallel


def all_reduce_mean(value: float, device: str) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_max(value: float, device: str) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
