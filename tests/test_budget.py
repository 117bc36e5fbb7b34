"""Tests for lmforge.train.budget: memory and compute estimates of a training step."""
from __future__ import annotations

import re

import pytest

from lmforge.models.transformer import GPT, get_config
from lmforge.train.budget import activation_bytes_per_token, saved_activation_bytes, training_footprint


@pytest.mark.parametrize("preset", ["cpu", "gpt2-classic"])
def test_activation_estimate_extrapolates_to_the_full_model(preset):
    """The per-token costs probed on 1- and 2-layer models with small vocabularies predict what the
    whole model (4 layers, its own vocabulary) saves for backward as the sequence grows."""
    cfg = get_config(preset, n_layer=4, n_embd=64, n_head=4, vocab_size=3000, block_size=96,
                     **({"n_kv_head": 2} if preset == "cpu" else {}))
    per_layer, rest = activation_bytes_per_token(cfg)
    model = GPT(cfg)
    measured = (saved_activation_bytes(model, 96) - saved_activation_bytes(model, 32)) / 64
    assert measured == pytest.approx(cfg.n_layer * per_layer + rest, rel=0.01)
    assert per_layer > 10 * cfg.n_embd  # the residual stream alone is saved several times per layer


def test_footprint_arithmetic():
    cfg = get_config("tiny")
    n = GPT(cfg).num_params()
    hidden = sum(p.numel() for name, p in GPT(cfg).named_parameters()
                 if p.ndim == 2 and "embed" not in name and "lm_head" not in name)
    adam = training_footprint(cfg, batch_size=2, seq_len=64, optimizer="adamw")
    muon = training_footprint(cfg, batch_size=2, seq_len=64, grad_accum=3, world=2, optimizer="muon")
    assert adam.params == n and adam.weights == 6 * n and adam.gradients == 4 * n
    assert adam.optimizer == 8 * n
    assert muon.optimizer == 4 * hidden + 8 * (n - hidden)
    # Activations scale with the micro-batch only; compute with everything a step processes.
    assert muon.activations == adam.activations
    assert muon.flops_per_step == pytest.approx(6 * adam.flops_per_step)
    assert adam.flops_per_step == pytest.approx(GPT(cfg).flops_per_token(64) * 2 * 64)
    double = training_footprint(cfg, batch_size=4, seq_len=64, optimizer="adamw")
    assert double.activations == pytest.approx(2 * adam.activations)
    assert adam.total == adam.weights + adam.gradients + adam.optimizer + adam.activations


def test_fsdp_footprint_shards_the_state_and_keeps_two_blocks_and_the_root_whole():
    cfg = get_config("cpu", vocab_size=4096)
    model = GPT(cfg)
    n = model.num_params()
    block = sum(p.numel() for p in model.shard_units()[0].parameters())
    root = n - cfg.n_layer * block  # embeddings, final norm, output head: gathered through the whole step
    ddp = training_footprint(cfg, batch_size=2, seq_len=64, world=4)
    fsdp = training_footprint(cfg, batch_size=2, seq_len=64, world=4, parallel="fsdp")
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 4)
    assert fsdp.weights == pytest.approx(4 * n / 4 + 2 * root + 2 * 2 * block)
    assert fsdp.gradients == pytest.approx(4 * n / 4 + 2 * root + 2 * 2 * block)
    assert fsdp.activations == ddp.activations and fsdp.flops_per_step == ddp.flops_per_step
    assert training_footprint(cfg, batch_size=2, seq_len=64, world=1, parallel="fsdp").total == ddp.total


def test_dry_run_prints_the_estimate_without_training(tiny_data, tmp_path, capsys):
    from lmforge.cli import main

    assert main(["pretrain", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"), "--model", "tiny",
                 "--batch-size", "4", "--grad-accum", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 sequences x 64 tokens x 2 accumulation steps x 1 processes = 512 tokens per step" in out
    assert "memory per device (estimate)" in out and "TFLOP per step" in out
    assert not (tmp_path / "run").exists()


def test_dry_run_for_sharded_processes(tiny_data, tmp_path, capsys):
    from lmforge.cli import main

    argv = ["pretrain", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"), "--model", "gpt2-classic",
            "--batch-size", "1", "--seq-len", "64", "--nproc", "4", "--dry-run"]

    def memory(*more) -> dict:
        assert main(argv + list(more)) == 0
        m = re.search(r"([\d.]+) GiB = weights ([\d.]+) \+ gradients ([\d.]+) \+ optimizer ([\d.]+)",
                      capsys.readouterr().out)
        return dict(zip(("total", "weights", "gradients", "optimizer"), map(float, m.groups())))

    ddp, fsdp = memory(), memory("--parallel", "fsdp")
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 4, abs=0.01)
    assert fsdp["total"] < ddp["total"] / 3  # nearly all of it is the model's state at this tiny batch
    assert main(argv + ["--tensor-parallel", "2"]) == 2
    assert "does not estimate tensor parallelism" in capsys.readouterr().err
