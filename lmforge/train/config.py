"""The settings of training, declared once (see lmforge.common.setting): the loop's own
(TrainConfig) and those every fine-tuning stage shares (FineTuneOptions). No torch here, so the
command line can derive its options from these fields without loading it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from lmforge.common import setting


@dataclass
class TrainConfig:
    """Every setting of the training loop, declared once: the command-line options of every training
    command and the speedrun's torchrun re-entry are derived from these fields (lmforge.cli.common).
    A stage changes defaults through its TRAIN_DEFAULTS, never by restating a field."""

    out_dir: str = setting("runs/default", "run folder (checkpoints, log.jsonl, loss.png)", flag="--out")
    max_steps: int = setting(1000, "optimizer steps (with --time-budget: whichever ends first)", check="positive")
    time_budget: float | None = setting(None, "seconds of training; the LR schedule follows the clock",
                                        check="positive")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", check="positive")
    optimizer: str = setting("muon", "muon: Muon for hidden matrices + AdamW for the rest; adamw: AdamW for all",
                             choices=("muon", "adamw"))
    lr: float = setting(3e-3, "AdamW learning rate (embeddings, head, norms; everything with adamw)",
                        check="positive")
    muon_lr: float = setting(0.02, "Muon learning rate (hidden matrices)", check="positive")
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum", check="fraction")
    weight_decay: float = setting(0.0, "decoupled weight decay (hidden matrices)", check="nonneg")
    beta1: float = setting(0.9, "AdamW beta1", check="fraction")
    beta2: float = setting(0.95, "AdamW beta2", check="fraction")
    grad_clip: float = setting(1.0, "clip the total gradient norm to this (0 disables)", check="nonneg")
    warmup_steps: int = setting(20, "linear learning-rate warm-up steps", check="nonneg")
    schedule: str = setting("wsd", "learning-rate schedule: warmup-stable-decay, cosine or constant",
                            choices=("wsd", "cosine", "constant"))
    min_lr_frac: float = setting(0.0, "final learning rate as a fraction of the peak", check="fraction")
    decay_frac: float = setting(0.4, "wsd: fraction of the run spent decaying", check="fraction")
    eval_every: int = setting(250, "steps between evaluations (0 = only at the end)", check="nonneg")
    ckpt_every: int = setting(500, "steps between checkpoints (0 = only at the end)", check="nonneg")
    keep_checkpoints: int = setting(2, "checkpoints kept in the run folder (older ones are deleted)",
                                    check="positive")
    log_every: int = setting(10, "steps between log lines", check="positive")
    seed: int = setting(1337, "random seed (initialisation, data order, dropout)", check="seed")
    dtype: str = setting("auto", "auto: bf16 autocast where it is faster (CUDA with bf16, CPU); or bf16, fp32",
                         choices=("auto", "bf16", "fp32"))
    compile: str = setting("auto", "torch.compile the training step; auto = on CUDA, and on CPU unless the model "
                           "drops out attention weights (falls back to eager with a warning if compiling fails; "
                           "see docs/benchmarks.md)", choices=("auto", "on", "off"))
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    parallel: str = setting("ddp", "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: "
                            "parameters, gradients and optimizer state sharded over the processes; with bf16 "
                            "the weights are gathered in bf16 and gradients reduced in fp32)",
                            choices=("ddp", "fsdp"))
    tensor_parallel: int = setting(1, "under torchrun: processes that split each weight matrix (Megatron-style "
                                   "tensor parallelism, pretraining only); with --parallel fsdp and more processes "
                                   "than this, a 2-D mesh (tensor parallel within groups, FSDP2 across)",
                                   check="positive")
    checkpoint_format: str = setting("auto", "full: one safetensors file gathered on the first process; sharded: "
                                     "torch.distributed.checkpoint, each process writes its own shards (loads in "
                                     "any number of processes, or one); auto: sharded when the weights are "
                                     "(fsdp, tensor parallel)", choices=("auto", "full", "sharded"))
    progress: bool = setting(True, "progress bar")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FineTuneOptions:
    """The settings of every stage that starts from a checkpoint and trains on examples
    (conversations, preference pairs): SFTOptions and PairOptions add their own."""

    checkpoint: str  # the run or checkpoint folder to start from
    data: list[str]  # source specs
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = setting(0.05, "held-out share of each --data source (without --val-data)",
                                  check="fraction")
    max_val: int = setting(512, "held-out examples used per evaluation", check="positive")
    batch_size: int = setting(8, "examples (conversations, preference pairs) per micro-batch per process",
                              check="positive")
    seq_len: int | None = setting(None, "tokens per example at most (default: the model's context window)",
                                  check="positive")
    skip_invalid: bool = setting(False, "skip malformed records (counted and reported)")
    resume: bool = setting(False, "continue from the newest checkpoint in --out")
