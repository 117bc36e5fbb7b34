"""The skeleton every training stage shares (pretraining, SFT, reward model, DPO, GRPO, PPO, and
the stages still to come). A stage's own code says only what is particular to it: its data, its
Task, its model (or the head around it), and what it records. The rest is here, in this order:

    start = load_start(checkpoint)        # the model and tokenizer a fine-tuning stage starts from
    device = stage_device(train_cfg)      # torch.distributed under torchrun; the Task's device
    ref = frozen_copy(start.model, device)  # DPO, GRPO, PPO: the reference policy
    lora = add_lora(model, opts.lora, train_cfg)  # LoRA as a transform of the built model
    result = run_stage("dpo", model, task, train_cfg, start=start, extra={...}, resume=...,
                       start_eval=True, lora=lora)

`run_stage` records the stage, its tokenizer and its starting checkpoint in every checkpoint,
copies the tokenizer file in, evaluates before the first step when asked (logged at step 0), trains,
and saves the LoRA adapter of a LoRA run.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.common import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import FineTuneOptions, TrainConfig  # noqa: F401 (FineTuneOptions: re-exported)
from lmforge.train.distributed import setup_distributed
from lmforge.train.loop import Trainer


@dataclass
class Start:
    """The run a fine-tuning stage starts from."""

    model: nn.Module
    tokenizer: Tokenizer
    checkpoint: Path  # the resolved checkpoint folder

    def record(self) -> dict:
        return {"tokenizer_fingerprint": self.tokenizer.fingerprint, "base_checkpoint": str(self.checkpoint.resolve())}

    def tokenizer_file(self) -> bytes:
        return (self.checkpoint / "tokenizer.json").read_bytes()


def load_start(checkpoint: str | Path, *, diffusion: bool = False) -> Start:
    """The model a post-training stage starts from. The reward model, DPO and RL work on chat turns
    that are generated or scored token by token: a model that generates otherwise (masked diffusion)
    is refused here, before any work, with the line saying what it can do instead. SFT (diffusion=True)
    also fine-tunes a masked diffusion model (lmforge/stages/sft.py)."""
    from lmforge.models.protocol import require_decoding
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint

    base = resolve_checkpoint(checkpoint)
    model, _ = load_model(base)
    if not (diffusion and getattr(model, "generation", None) == "diffusion"):
        require_decoding(model, "SFT" if diffusion else "this post-training stage (reward model, DPO, RL)")
    # Weights stored in bf16 (an imported model) train as fp32 master weights; --dtype bf16 still
    # runs the matrix products in bf16.
    model.float()
    return Start(model, load_checkpoint_tokenizer(base), base)


def stage_device(train_cfg: TrainConfig) -> str:
    """Join the torchrun process group (when there is one) and fix the device the Task builds its
    batches on; train_cfg.device is set to it, so the Trainer uses the same one."""
    _, _, _, device = setup_distributed(train_cfg.device)
    train_cfg.device = device
    return device


def frozen_copy(model: nn.Module, device: str) -> nn.Module:
    """A copy that never trains (a reference policy, a reward model's scorer)."""
    ref = copy.deepcopy(model).to(device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def add_lora(model: nn.Module, lora, train_cfg: TrainConfig) -> dict | None:
    """Wrap the model's target layers with LoRA adapters (a LoRAConfig; None: full fine-tuning).
    Returns the adapter record the checkpoints keep."""
    if lora is None:
        return None
    if train_cfg.optimizer != "adamw":
        # Muon orthogonalises whole weight matrices; for rank-r adapters plain AdamW is the usual choice.
        raise LmforgeError("LoRA fine-tuning uses AdamW: pass --optimizer adamw")
    from lmforge.posttrain.lora import apply_lora

    torch.manual_seed(train_cfg.seed)  # the adapters' initial A matrices
    apply_lora(model, lora)
    return {**asdict(lora), "targets": list(lora.targets)}


def run_stage(name: str, model: nn.Module, task, train_cfg: TrainConfig, *, extra: dict, resume: bool,
              start: Start | None = None, tokenizer_file: bytes | None = None, start_eval: bool = False,
              lora: dict | None = None, peak_flops: float | None = None, before_fit=None) -> dict:
    """Train `model` on `task` and return the Trainer's final metrics plus "checkpoint" (and
    "start_val_*" with start_eval, "adapter" for a LoRA run). `extra` is what this stage records
    in its checkpoints besides the stage name and the start; `before_fit(trainer)` runs once the
    Trainer has wrapped the model (RL samples from the wrapped weights)."""
    record = {"stage": name, **(start.record() if start else {}), **extra}
    if lora is not None:
        record["lora"] = lora
    if tokenizer_file is None:
        tokenizer_file = start.tokenizer_file()
    trainer = Trainer(model, task, train_cfg, extra_state=record, resume=resume, peak_flops=peak_flops,
                      extra_files={"tokenizer.json": tokenizer_file})
    if before_fit is not None:
        before_fit(trainer)
    start_metrics = trainer.evaluate() if start_eval and not resume else None  # logged at step 0
    result = trainer.fit()
    result["checkpoint"] = str(trainer.ckpt_root)
    if start_metrics:
        result.update({f"start_val_{k}": v for k, v in start_metrics.items()})
    if lora is not None and trainer.is_main:
        from lmforge.posttrain.lora import save_adapter

        path = save_adapter(model, Path(train_cfg.out_dir) / "adapter", extra=start.record())
        result["adapter"] = str(path)
    return result
