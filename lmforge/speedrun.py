"""`lmforge speedrun` presets: what changes between a laptop CPU and a node of GPUs.

The same stages run everywhere (tokenizer -> shards -> pretraining -> ...); a preset chooses the
corpus, the model, the batch and the budget. The batch is fixed in tokens per optimizer step, so a
preset with more devices or smaller micro-batches gets the same optimisation by accumulating
gradients: total_batch_tokens = batch_size * seq_len * grad_accum * nproc, exactly.

`check_preset` validates a preset before anything runs: the model config, the batch arithmetic,
and (for GPU presets) the estimated memory per device against the GPU's memory
(`lmforge.train.budget`). The GPU presets cannot run on this project's CPU-only machine; the tests
hold their configurations to this check.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.common import LmforgeError
from lmforge.model import get_config


@dataclass(frozen=True)
class SpeedrunPreset:
    name: str
    data: str  # corpus spec for lmforge.data.sources.iter_documents
    max_chars: int | None  # corpus characters read (None: all)
    vocab_size: int
    tokenizer_chars: int  # characters the tokenizer is trained on
    model: str  # lmforge.model preset
    nproc: int  # processes (one per GPU) under torchrun
    device: str
    batch_size: int  # sequences per micro-batch per process
    seq_len: int
    total_batch_tokens: int  # tokens per optimizer step, over all processes and micro-batches
    max_steps: int
    time_budget: float | None  # seconds of pretraining; None: max_steps decides
    gpu_memory_gib: float | None = None  # per device; None on CPU

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
        time_budget=480.0),
    # One 80 GB GPU: a 12-layer, 768-wide model (~135M parameters) for ~20 tokens per parameter
    # (Chinchilla) of FineWeb-Edu, 0.5M tokens per step through 8 accumulated micro-batches.
    "gpu-1": SpeedrunPreset(
        name="gpu-1", data="HuggingFaceFW/fineweb-edu:sample-10BT", max_chars=13_000_000_000, vocab_size=32768,
        tokenizer_chars=2_000_000_000, model="d12", nproc=1, device="cuda", batch_size=32, seq_len=2048,
        total_batch_tokens=524_288, max_steps=5_200, time_budget=None, gpu_memory_gib=80.0),
    # Eight 80 GB GPUs under torchrun: a 20-layer, 1280-wide model (~560M parameters), ~11B tokens.
    "gpu-8": SpeedrunPreset(
        name="gpu-8", data="HuggingFaceFW/fineweb-edu:sample-100BT", max_chars=55_000_000_000, vocab_size=65536,
        tokenizer_chars=2_000_000_000, model="d20", nproc=8, device="cuda", batch_size=8, seq_len=2048,
        total_batch_tokens=524_288, max_steps=21_400, time_budget=None, gpu_memory_gib=80.0),
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
                            world=p.nproc)
    gib = 2.0 ** 30
    if p.gpu_memory_gib is not None and fp.total / gib > p.gpu_memory_gib:
        raise LmforgeError(f"preset {p.name}: an estimated {fp.total / gib:.1f} GiB per device does not fit "
                           f"{p.gpu_memory_gib:.0f} GiB; lower batch_size")
    out = {"params": fp.params, "grad_accum": p.grad_accum, "memory_gib": fp.total / gib}
    if p.time_budget is None:  # a step budget fixes the tokens; a time budget depends on the machine
        out["tokens"] = p.total_batch_tokens * p.max_steps
        out["tokens_per_param"] = out["tokens"] / fp.params
        out["flops"] = fp.flops_per_step * p.max_steps
    return out
