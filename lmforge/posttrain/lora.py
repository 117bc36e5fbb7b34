"""LoRA: fine-tune a few low-rank matrices next to frozen weights.

A chosen linear layer y = x W^T becomes y = x W^T + (alpha / r) * x A^T B^T, i.e. the weight
W + (alpha/r) * B A with A (r x in) and B (out x r). W is frozen; only A and B learn. B starts at
zero, so the adapted model starts exactly equal to the base; A starts random so B's gradient is not
zero. The trainable parameters are r * (in + out) per layer instead of in * out.

`LoRALinear` subclasses nn.Linear and keeps its `weight`, so a LoRA model's state dict holds the
base weights under their usual names plus `*.lora_A` / `*.lora_B`: Trainer checkpoints (and resume)
work unchanged. `save_adapter` writes only the adapters (a small safetensors file and a JSON config),
`merge_lora` folds them into the weights, giving a plain model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError, atomic_write_json, read_json

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # linear layer names (last part of the module path)
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        expanded = []
        for t in self.targets:  # "all" = every linear layer of the blocks (not the output head)
            expanded += [a for a in ALL_LINEAR if a not in expanded] if t == "all" else [t] * (t not in expanded)
        self.targets = tuple(expanded)
        if self.rank <= 0:
            raise LmforgeError(f"--lora-rank must be positive, got {self.rank}")
        if not self.alpha > 0:
            raise LmforgeError(f"--lora-alpha must be positive, got {self.alpha}")
        if not self.targets:
            raise LmforgeError("--lora-targets is empty; e.g. q_proj,v_proj or all")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """nn.Linear with a frozen weight and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight  # the same Parameter objects: no copy
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as for any input layer
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + \
            F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        lin.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of the model and put adapters on the target linear layers (in place).
    Returns the adapted module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Linear and n.rpartition(".")[2] in cfg.targets]
    present = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.targets if t not in present]
    if missing:
        raise LmforgeError(f"--lora-targets {','.join(missing)} match no linear layer; "
                           f"this model has {', '.join(sorted(present))}")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    for name, lin in found:
        if name == "lm_head" and tied:
            raise LmforgeError("cannot put LoRA on lm_head: it is tied to the embeddings")
        _replace(model, name, LoRALinear(lin, cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return [n for n, _ in found]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place); the model becomes a plain model again."""
    for name, m in lora_modules(model).items():
        _replace(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def trainable_summary(model: nn.Module) -> dict:
    """Trainable vs total parameters (shared tensors counted once)."""
    seen, total, train = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return {"trainable": train, "total": total, "fraction": train / max(total, 1)}


def save_adapter(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write adapter.safetensors (the A and B matrices only) and adapter.json into out_dir."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise LmforgeError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in mods.items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    cfg = model.lora_config
    atomic_write_json(out / ADAPTER_CONFIG, {"format": "lmforge-lora", "version": 1, **asdict(cfg),
                                             "targets": list(cfg.targets), "modules": sorted(mods),
                                             "model_config": model.config.to_dict(), **(extra or {})})
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter" / ADAPTER_CONFIG).is_file():  # an sft run folder
        adapter_dir = adapter_dir / "adapter"
    meta = read_json(adapter_dir / ADAPTER_CONFIG, "LoRA adapter config", fmt="lmforge-lora", version=1)
    meta["path"] = str(adapter_dir)
    return meta


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Put the saved adapters onto a base model (in place). Returns the adapter config."""
    from safetensors.torch import load_file

    meta = read_adapter_config(adapter_dir)
    if meta["model_config"] != model.config.to_dict():
        raise LmforgeError(f"adapter {meta['path']} was trained on a model with a different config")
    apply_lora(model, LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], targets=tuple(meta["targets"]),
                                 dropout=meta.get("dropout", 0.0)))
    tensors = load_file(str(Path(meta["path"]) / ADAPTER_WEIGHTS))
    mods = lora_modules(model)
    if sorted(mods) != sorted(meta["modules"]) or len(tensors) != 2 * len(mods):
        raise LmforgeError(f"adapter {meta['path']} does not fit the model's layers")
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
    return meta
