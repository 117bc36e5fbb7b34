"""Pretraining: next-token prediction on tokenized shards, through the shared Trainer.

Any model family (lmforge/models/registry.py): a trainable one runs the Trainer; a counted one
(n-grams) is fitted to the whole train split in one pass, then evaluated and checkpointed the same
way, so every family's val bits per byte comes from the same code on the same windows."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.common import LmforgeError, dist_info
from lmforge.data.loader import BatchLoader, SplitMissing, TokenSplit
from lmforge.data.prepare import load_manifest
from lmforge.data.rows import ProcessShare
from lmforge.eval.lm import split_loss
from lmforge.models.protocol import DEFAULT_SEQ_LEN
from lmforge.models.registry import build_model, get_family
from lmforge.stages.options import PretrainOptions
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.loop import TrainConfig
from lmforge.train.stage import run_stage, stage_device


class NextTokenTask:
    """The pretraining Task: batches from a BatchLoader, mean next-token cross-entropy, and
    validation loss plus bits per byte (nats summed over target tokens / (ln 2 * their UTF-8 bytes)),
    which does not depend on the tokenizer and so compares models with different vocabularies."""

    def __init__(self, train: TokenSplit, val: TokenSplit | None, token_bytes: torch.Tensor, *,
                 batch_size: int, seq_len: int, seed: int, device: str, eval_tokens: int,
                 share: ProcessShare | None = None):
        self.share = share or ProcessShare()  # which batches are this process's (tensor-parallel groups share)
        self.loader = BatchLoader(train, batch_size, seq_len, seed=seed, rank=self.share.rank,
                                  world_size=self.share.world, device=device)
        self.val = val
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, device
        self.token_bytes = token_bytes.to(device)
        self.eval_batches = max(1, eval_tokens // (batch_size * seq_len * self.share.world))

    def next_batch(self):
        return self.loader.next_batch()

    def loss(self, model: nn.Module, batch):
        x, y = batch
        return model(x, y), y.numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.val is None:
            return {}
        return split_loss(model, self.val, self.token_bytes, batch_size=self.batch_size, seq_len=self.seq_len,
                          max_batches=self.eval_batches, device=self.device, share=self.share)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)



def load_data_tokenizer(data_dir: str | Path) -> tuple[Tokenizer, Path]:
    """The tokenizer the shards in data_dir were made with (checked by hash), and its path."""
    manifest = load_manifest(data_dir)
    tok_path = Path(manifest["tokenizer_path"])
    if not tok_path.is_absolute():
        tok_path = Path(data_dir) / tok_path
    tok = Tokenizer.load(tok_path)
    if tok.fingerprint != manifest["tokenizer_fingerprint"]:
        raise LmforgeError(f"tokenizer {tok_path} has changed since the shards in {data_dir} were made "
                           "(hash mismatch) — re-run `lmforge data prepare`")
    return tok, tok_path.resolve()


def pretrain(opts: PretrainOptions, train_cfg: TrainConfig) -> dict:
    """Build the model, the task and the Trainer; train; return the final metrics."""
    tok, tok_path = load_data_tokenizer(opts.data_dir)
    overrides = dict(opts.model_overrides or {})
    overrides["vocab_size"] = tok.vocab_size
    family = get_family(opts.model)
    preset = opts.preset or family.default_preset
    cfg = family.config(preset, **overrides)
    torch.manual_seed(train_cfg.seed)  # same initial weights on every rank and every run
    model = build_model(family.name, cfg)
    limit = model.context_limit
    seq_len = opts.seq_len or limit or DEFAULT_SEQ_LEN
    if limit is not None and seq_len > limit:
        raise LmforgeError(f"--seq-len {seq_len} is longer than the model's context window ({limit})")
    if opts.batch_size <= 0:
        raise LmforgeError(f"--batch-size must be positive, got {opts.batch_size}")
    train = TokenSplit(opts.data_dir, "train", tokenizer=tok)
    try:
        val = TokenSplit(opts.data_dir, "val", tokenizer=tok)
    except SplitMissing:
        val = None  # no validation split (val_fraction=0); a damaged one raises
    device = stage_device(train_cfg)  # where the task's batches land: the Trainer's device
    task = NextTokenTask(train, val, torch.tensor(tok.token_byte_lengths(), dtype=torch.long),
                         batch_size=opts.batch_size, seq_len=seq_len, seed=train_cfg.seed, device=device,
                         eval_tokens=opts.eval_tokens, share=ProcessShare.of_data_parallel(train_cfg.tensor_parallel))
    extra = {"tokenizer_fingerprint": tok.fingerprint, "tokenizer_path": str(tok_path),
             "data_dir": str(Path(opts.data_dir).resolve()), "model": family.name, "preset": preset,
             "batch_size": opts.batch_size, "seq_len": seq_len}
    if not model.trainable:
        result = fit_counted(model, train, task, train_cfg, extra, {"tokenizer.json": tok_path.read_bytes()})
    else:
        def describe(trainer):
            if trainer.is_main:
                n, active = model.num_params(), model.num_params(active=True)
                print(f"model: {family.name} {preset} {n / 1e6:.2f}M parameters "
                      + (f"({active / 1e6:.2f}M active per token) " if active != n else "")
                      + f"({model.num_params(True) / 1e6:.2f}M non-embedding), "
                      f"{model.flops_per_token(seq_len) / 1e6:.1f} MFLOPs/token; "
                      f"{opts.batch_size * seq_len * train_cfg.grad_accum * trainer.data_world:,} tokens/step; "
                      f"train {train.num_tokens:,} tokens" + (f", val {val.num_tokens:,}" if val else ""))

        result = run_stage("pretrain", model, task, train_cfg, extra=extra, resume=opts.resume,
                           tokenizer_file=tok_path.read_bytes(), peak_flops=opts.peak_flops, before_fit=describe)
    result["model"] = model
    result["tokenizer"] = tok
    return result


def fit_counted(model, train: TokenSplit, task: NextTokenTask, train_cfg: TrainConfig, extra: dict,
                files: dict) -> dict:
    """A counted model: one pass over the train split, then the same validation and checkpoint
    layout as a trained one (step 0, no optimizer state)."""
    _, _, world = dist_info()
    ckpt_root = Path(train_cfg.out_dir) / "checkpoints"
    existing = ckpt_io.list_checkpoints(ckpt_root)
    if existing:
        raise LmforgeError(f"{train_cfg.out_dir} already holds checkpoints (newest: {existing[-1].name}); "
                           "choose another --out (a counted model is fitted in one pass, there is nothing to resume)")
    if world > 1:
        raise LmforgeError(f"the {model.family} family is fitted in one pass on one process; run it without torchrun")
    t0 = time.perf_counter()
    stats = model.fit(train.read(0, train.num_tokens), progress=train_cfg.progress)
    fit_time = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model)
    state = {"tokens_seen": train.num_tokens, "train_time": fit_time, "train_config": asdict(train_cfg),
             "last_eval": metrics, "world_size": 1, "fit": stats, **extra}
    path = ckpt_io.save_checkpoint(ckpt_root, 0, model, None, state, files=files)
    print(f"model: {extra['model']} {extra['preset']} fitted on {train.num_tokens:,} tokens in {fit_time:.1f} s; "
          + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))
    return {"step": 0, "tokens": train.num_tokens, "train_time": fit_time, "checkpoint": str(path.parent),
            **{f"val_{k}": v for k, v in metrics.items()}, **{f"fit_{k}": v for k, v in stats.items()
                                                                if isinstance(v, (int, float))}}
