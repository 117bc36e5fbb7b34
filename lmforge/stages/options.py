"""The options of every training stage, declared once (lmforge.common.setting) with their training
defaults (each stage's TRAIN_DEFAULTS: what differs from TrainConfig's). The command line derives
its options from these fields; the stage modules (pretrain, sft, reward, dpo, rl) use them. No torch
here, so `lmforge --help` does not load it."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.common import setting
from lmforge.train.config import FineTuneOptions


# ----------------------------------------------------------------------------- pretrain
@dataclass
class PretrainOptions:
    data_dir: str
    model: str = "transformer"  # the model family
    preset: str | None = None  # the family's preset (default: the family's default, "cpu" for the transformer)
    model_overrides: dict | None = None
    batch_size: int = setting(8, "sequences per micro-batch per process", check="positive")
    seq_len: int | None = setting(None, "training sequence length (default: the model's context window; "
                                  "256 for a model without one)", check="positive")
    eval_tokens: int = setting(65536, "validation tokens per evaluation", check="positive")
    resume: bool = setting(False, "continue from the newest checkpoint in --out")
    peak_flops: float | None = None


# ----------------------------------------------------------------------------- sft
# Training defaults where they differ from TrainConfig's (the `lmforge sft` options and the
# speedrun's SFT stage both start from them).
SFT_TRAIN_DEFAULTS = dict(max_steps=500, optimizer="adamw", lr=1e-3, warmup_steps=10, eval_every=100, ckpt_every=250,
                          schedule="cosine", min_lr_frac=0.1)


@dataclass
class SFTOptions(FineTuneOptions):
    """data: conversation source specs, each optionally "*WEIGHT"."""

    tools: bool = setting(True, "worked examples of synthetic sources call tools")
    lora: object | None = None  # a LoRAConfig


# ----------------------------------------------------------------------------- reward, dpo
# Training defaults of `lmforge reward train` where they differ from TrainConfig's. No compilation:
# pairs of every length make many shapes, each a recompilation.
REWARD_TRAIN_DEFAULTS = dict(max_steps=300, optimizer="adamw", lr=1e-4, warmup_steps=10, eval_every=100,
                             ckpt_every=250,
                             schedule="cosine", min_lr_frac=0.1, compile="off")


@dataclass
class PairOptions(FineTuneOptions):
    """Options shared by `reward train` and `dpo` (data: preference-pair source specs)."""


# Training defaults of `lmforge dpo` where they differ from TrainConfig's (no compilation, as above).
DPO_TRAIN_DEFAULTS = dict(max_steps=200, optimizer="adamw", lr=5e-5, warmup_steps=10, eval_every=50, ckpt_every=250,
                          schedule="cosine", min_lr_frac=0.1, compile="off")


@dataclass
class DPOOptions(PairOptions):
    beta: float = setting(0.1, "strength of the pull towards the reference", check="positive")
    lora: object | None = None  # a LoRAConfig


# ----------------------------------------------------------------------------- rl
# Training defaults of `lmforge grpo` / `ppo` where they differ from TrainConfig's (the speedrun's RL
# stage starts from them too). No compilation: rollouts of every length make many shapes.
RL_TRAIN_DEFAULTS = dict(max_steps=100, optimizer="adamw", lr=1e-5, warmup_steps=5, eval_every=25, ckpt_every=50,
                         schedule="constant", log_every=1, compile="off")
KL_BETA = {"grpo": 0.04, "ppo": 0.05}  # the KL weight's default per algorithm


@dataclass
class RLOptions:
    checkpoint: str  # the policy to start from (usually an SFT run)
    algorithm: str = "grpo"  # "grpo" | "ppo"
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])  # prompt sources
    eval_tasks: list[str] | None = None  # held-out sources (default: the test split of `tasks`)
    reward_model: str | None = None  # score with this reward model instead of the checker
    prompts_per_step: int = setting(8, "prompts per rollout (each gets --group-size replies)", check="positive")
    group_size: int = setting(8, "sampled replies per prompt", check="positive")
    max_new_tokens: int = setting(32, "the policy's own tokens per reply", check="positive")
    tools: bool = setting(False, "run the tools the policy calls (calculator, python) in rollouts and "
                          "evaluation; tool results are not actions")
    tool_names: tuple[str, ...] | None = None  # with tools: which built-in tools run (None: all)
    temperature: float = setting(1.0, "sampling temperature of the rollouts", check="temperature")
    top_p: float | None = setting(None, "nucleus sampling of the rollouts", check="top_p")
    clip: float = setting(0.2, "PPO ratio clip epsilon", check="positive")
    kl_beta: float = setting(0.04, "weight of the KL penalty to the reference", check="nonneg")
    updates_per_rollout: int = setting(1, "optimizer steps on each rollout (>1: the clipping matters)",
                                       check="positive")
    # GRPO: leave out of the loss the groups whose replies all got the same reward (their
    # advantages are all 0: they would only add the KL term) — less compute per step, as DAPO does.
    skip_uniform_groups: bool = True
    gamma: float = setting(1.0, "PPO: discount", check="positive")
    lam: float = setting(0.95, "PPO: GAE lambda", check="unit")
    vf_coef: float = setting(0.5, "PPO: value-loss weight", check="positive")
    critic: str = setting("separate", "PPO: the value head on its own copy of the trunk (classic PPO) or on "
                          "the policy's", choices=("separate", "shared"))
    eval_n: int = setting(100, "held-out problems per task", check="positive")
    resume: bool = setting(False, "continue from the newest checkpoint in --out")


# ----------------------------------------------------------------------------- retrievers
# Training defaults of `lmforge retrieval train-biencoder` / `train-reranker` where they differ from
# TrainConfig's. No compilation: texts of every length make many shapes.
RETRIEVER_TRAIN_DEFAULTS = dict(max_steps=300, optimizer="adamw", lr=3e-4, warmup_steps=20, eval_every=100,
                                ckpt_every=250, schedule="cosine", min_lr_frac=0.1, compile="off")
# What the cross-encoder changes: each query is read with its positive and 7 hard negatives.
RERANKER_DEFAULTS = dict(batch_size=8, hard_negatives=7, passage_len=256)


@dataclass
class RetrieverOptions:
    """The settings of the two retriever stages (lmforge/stages/retriever.py)."""

    checkpoint: str  # an encoder run (lmforge pretrain --arch encoder) or checkpoint
    dataset: str  # squad | scifact | a BEIR folder | a SQuAD-format file
    split: str = setting("train", "the judgements trained on: a BEIR folder's qrels/SPLIT.tsv; SQuAD: train "
                         "(the even-numbered articles' questions; heldout is the rest)")
    batch_size: int = setting(32, "queries per micro-batch per process, each with its positive and hard "
                              "negatives", check="positive")
    hard_negatives: int = setting(1, "hard negatives per query: passages BM25 ranks high that are not "
                                  "relevant", check="nonneg")
    query_len: int = setting(64, "query tokens at most", check="positive")
    passage_len: int = setting(192, "passage tokens at most (re-ranker: the query and passage together)",
                               check="positive")
    temperature: float = setting(0.05, "InfoNCE temperature of the bi-encoder (scores = cosine / T)",
                                 check="positive")
    val_fraction: float = setting(0.05, "held-out share of the training queries", check="fraction")
    max_val: int = setting(512, "held-out queries per evaluation", check="positive")
    resume: bool = setting(False, "continue from the newest checkpoint in --out")
