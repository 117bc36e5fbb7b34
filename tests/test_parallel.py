"""Parallelism beyond DDP (lmforge/train/parallel.py), with two gloo processes on this CPU: FSDP2
trains like one process on the same global batch and halves what each rank holds; tensor
parallelism gives the whole model's logits; a checkpoint written by two sharded ranks loads in one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, run_cli, torchrun

from lmforge.train import checkpoint as ckpt_io
from lmforge.train.logs import read_log


def test_tensor_parallel_logits_and_fsdp_memory_per_rank(tmp_path):
    torchrun(REPO / "tests" / "parallel_worker.py", tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert rep["tp_max_abs_diff"] < 1e-5  # two ranks, half the heads and MLP units each: the same logits
        assert rep["tp_local_q_rows"] == 32  # of 64: each rank computes half the query heads
        # FSDP2: each rank holds half the parameters, half the gradients and half the optimizer state
        assert rep["local_params"] == pytest.approx(rep["full_params"] / 2, rel=0.01)
        assert rep["local_grads"] == rep["local_params"]
        assert rep["local_optimizer_state"] <= 2 * rep["local_params"] * 1.01  # AdamW's two moments at most
    assert sum(r["local_params"] for r in reports) == reports[0]["full_params"]


ARGV = ["pretrain", "--model", "tiny", "--seq-len", "32", "--max-steps", "4", "--eval-every", "0", "--ckpt-every", "0",
        "--eval-tokens", "1024", "--log-every", "1", "--warmup-steps", "1", "--dtype", "fp32", "--compile", "off",
        "--device", "cpu", "--no-progress"]


def test_fsdp_trains_like_one_process_and_its_checkpoint_loads_in_one(tiny_data, tmp_path):
    """2 sharded ranks of 2 rows == 1 process of 4 rows, step by step (AdamW: see test_lstm's DDP test for
    why Muon's bf16 iteration is not the tool to compare summation orders), and the checkpoint, gathered
    from the shards, is an ordinary one."""
    argv = [*ARGV, "--data-dir", tiny_data, "--optimizer", "adamw"]
    code, _, err = run_cli(*argv, "--batch-size", "4", "--out", tmp_path / "one")
    assert code == 0, err
    torchrun("-m", "lmforge.cli", *argv, "--batch-size", "2", "--parallel", "fsdp", "--out", tmp_path / "two")

    def losses(out):
        return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]

    assert len(losses(tmp_path / "two")) == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    a = ckpt_io.load_model(tmp_path / "one")[0].state_dict()
    b = ckpt_io.load_model(tmp_path / "two")[0].state_dict()  # written by two ranks, read by one
    torch.manual_seed(1337)  # pretrain's seed: where both started
    from lmforge.models.transformer import GPT, get_config

    start = GPT(get_config("tiny", vocab_size=268)).state_dict()
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-4 * (a[k] - start[k]).norm() + 1e-7, k


def test_fsdp_with_muon_resumes_exactly_and_in_one_process(tiny_data, tmp_path):
    """10 sharded steps in one go == 5, stopped, then resumed to 10 (a constant learning rate, so the
    shorter first run follows the same schedule): the same losses and the same weights, bit for bit.
    The sharded run's checkpoint also resumes in a single process (its optimizer state is saved whole)."""
    argv = [*ARGV, "--data-dir", tiny_data, "--batch-size", "2", "--parallel", "fsdp", "--schedule", "constant",
            "--ckpt-every", "5"]
    argv = [a for a in argv if a != "--max-steps" and a != "4"]

    def losses(out):
        return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]

    torchrun("-m", "lmforge.cli", *argv, "--max-steps", "10", "--out", tmp_path / "straight")
    torchrun("-m", "lmforge.cli", *argv, "--max-steps", "5", "--out", tmp_path / "cut")
    torchrun("-m", "lmforge.cli", *argv, "--max-steps", "10", "--out", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "straight")[-1] < losses(tmp_path / "straight")[0]  # Muon, sharded, learns
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    a = ckpt_io.load_model(tmp_path / "straight")[0].state_dict()
    b = ckpt_io.load_model(tmp_path / "cut")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the same checkpoint, resumed by one process with the same global batch (4 rows instead of 2 x 2)
    import shutil

    single = [x for x in argv if x not in ("--parallel", "fsdp")]
    single[single.index("--batch-size") + 1] = "4"
    shutil.copytree(tmp_path / "cut" / "checkpoints" / "step_000005", tmp_path / "one" / "checkpoints" / "step_000005")
    code, _, err = run_cli(*single, "--max-steps", "7", "--out", tmp_path / "one", "--resume")
    assert code == 0, err
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "straight")[5:7], rel=1e-3)


def test_two_nodes_on_loopback_train_like_one_process(tiny_data, tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d`, started twice as two "nodes" of one process each on
    this machine: they meet at the rendezvous and train as one DDP job of two ranks."""
    argv = [*ARGV, "--data-dir", tiny_data, "--optimizer", "adamw"]
    code, _, err = run_cli(*argv, "--batch-size", "4", "--out", tmp_path / "one")
    assert code == 0, err
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lmforge-test",
                               "-m", "lmforge.cli", *map(str, argv), "--batch-size", "2", "--out",
                               str(tmp_path / "two")],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]

    def losses(out):
        return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    state = json.loads((ckpt_io.resolve_checkpoint(tmp_path / "two") / "state.json").read_text())
    assert state["world_size"] == 2


def test_pipeline_stages_give_the_whole_models_loss_and_gradients(tmp_path):
    """Two stages of two blocks, four micro-batches, GPipe and 1F1B: the mean micro-batch loss is the
    whole batch's, and each stage's gradients are the one-process gradients of its own parameters."""
    torchrun(REPO / "tests" / "pipeline_worker.py", tmp_path)
    first, last = (json.loads((tmp_path / f"pipe{r}.json").read_text()) for r in range(2))
    for name in ("gpipe", "1f1b"):
        assert last[name]["loss"] == pytest.approx(last[name]["want_loss"], rel=1e-5)
        for stage in (first, last):
            assert stage[name]["params"] > 0 and stage[name]["others_have_no_grad"]
            assert stage[name]["max_grad_diff"] < 1e-6
    # the stages split the model: every parameter in exactly one
    from lmforge.models.transformer import GPT, get_config

    n_params = len(list(GPT(get_config("tiny", vocab_size=300, n_layer=4)).parameters()))
    assert first["gpipe"]["params"] + last["gpipe"]["params"] == n_params
