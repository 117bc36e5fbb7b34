"""The settings of a scaling sweep, declared once (no torch here: the command line derives its
options from these fields without loading it).

A sweep preset is a model dial and a grid of compute budgets. The dial is one integer, the depth,
from which every other dimension follows (as nanochat's depth dial does): n_layer = depth,
n_embd = aspect * depth, heads of `head_dim` channels; everything else (RoPE, RMSNorm, SwiGLU,
QK-norm) comes from the base transformer preset. One dial makes the sizes of a sweep one family of
shapes, so loss against size is a curve and not a cloud.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.common import setting


@dataclass(frozen=True)
class SweepPreset:
    base: str  # the transformer preset every size shares its architecture with
    aspect: int  # n_embd per layer of depth
    head_dim: int
    depths: tuple[int, ...]  # the dial's range
    flops: tuple[float, ...]  # the compute budgets of the IsoFLOP grid
    batch_size: int
    seq_len: int
    note: str


SWEEP_PRESETS: dict[str, SweepPreset] = {
    # Sizes from 12k to 4M matrix parameters, budgets 1e11..3e12 FLOPs: the whole grid trains in about
    # 25 minutes on a 2-core CPU with --jobs 2 (docs/benchmarks.md, "Scaling laws").
    "cpu": SweepPreset(base="cpu", aspect=16, head_dim=16, depths=tuple(range(1, 13)),
                       flops=(1e11, 3e11, 1e12, 3e12), batch_size=8, seq_len=128,
                       note="2-core CPU, about 25 minutes with --jobs 2"),
    # nanochat's shapes (64 channels per layer, 128-channel heads); budgets of a single 8-GPU node.
    # Never run: the same code as the cpu grid with bigger numbers.
    "gpu": SweepPreset(base="d12", aspect=64, head_dim=128, depths=tuple(range(4, 33, 2)),
                       flops=(1e17, 3e17, 1e18, 3e18, 1e19), batch_size=32, seq_len=2048,
                       note="GPUs (never run)"),
}


@dataclass
class SweepOptions:
    """What `lmforge scaling sweep` trains; the preset fills what is not given."""

    preset: str = setting("cpu", "sweep preset: the model dial, budgets, batch and sequence length",
                          choices=tuple(SWEEP_PRESETS))
    sizes: int = setting(5, "model sizes per budget: consecutive depths of the dial centred on the expected "
                         "optimum (about --tokens-per-param tokens per parameter)", check="positive")
    tokens_per_param: float = setting(20.0, "the prior that centres each budget's sizes (Chinchilla's ~20)",
                                      check="positive")
    min_steps: int = setting(25, "a size that would train for fewer optimizer steps at a budget is left out",
                             check="positive")
    batch_size: int | None = setting(None, "sequences per step (default: the preset's)", check="positive")
    seq_len: int | None = setting(None, "tokens per sequence (default: the preset's)", check="positive")
    jobs: int = setting(1, "runs trained at the same time, in separate processes sharing the cores (the small "
                        "models of a CPU grid barely use a second core: two jobs of one thread each finish the "
                        "cpu grid about 1.7x sooner)", check="positive")
    eval_tokens: int = setting(131072, "validation tokens each run's final loss is measured on", check="positive")


# Training settings of every sweep run where they differ from TrainConfig's. No compilation: on the
# cpu grid it costs 20-30 s per run, more than most runs train.
SWEEP_TRAIN_DEFAULTS = dict(compile="off", log_every=50)
# Set by the sweep for each run (the budget decides them), so not options of `scaling sweep`.
SWEEP_FIXED = ("out_dir", "max_steps", "time_budget", "eval_every", "ckpt_every", "min_lr_frac")
