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
    for rep in reports:  # --dtype bf16 under fsdp: bf16 on the wire and in the matmuls, fp32 master weights
        assert rep["mp_gathered_dtype"] == "torch.bfloat16"
        assert rep["mp_shard_dtypes"] == rep["mp_grad_dtypes"] == ["torch.float32"]


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

    assert len(losses(tmp_path / "two")) == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    # the same global batch as 2 accumulated micro-batches of 1 row: gradients reduce-scattered once per step
    torchrun("-m", "lmforge.cli", *argv, "--batch-size", "1", "--grad-accum", "2", "--parallel", "fsdp",
             "--out", tmp_path / "accum")
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
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
    The checkpoint is sharded (each rank writes its own part) and also resumes in a single process, which
    reads every part."""
    argv = [*ARGV, "--data-dir", tiny_data, "--batch-size", "2", "--parallel", "fsdp", "--schedule", "constant",
            "--ckpt-every", "5"]
    argv = [a for a in argv if a != "--max-steps" and a != "4"]

    torchrun("-m", "lmforge.cli", *argv, "--max-steps", "10", "--out", tmp_path / "straight")
    torchrun("-m", "lmforge.cli", *argv, "--max-steps", "5", "--out", tmp_path / "cut")
    # torch.distributed.checkpoint: each rank wrote its own shards, about half of the bytes each
    shards = sorted((tmp_path / "cut" / "checkpoints" / "step_000005" / "sharded").glob("*.distcp"))
    assert len(shards) == 2 and not (tmp_path / "cut" / "checkpoints" / "step_000005" / "model.safetensors").exists()
    sizes = [f.stat().st_size for f in shards]
    assert min(sizes) > 0.4 * sum(sizes)
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


def losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]


def drop(argv: list, flag: str) -> list:
    """argv without `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def test_tensor_parallel_training_equals_one_process_and_resumes(tiny_data, tmp_path):
    """--tensor-parallel 2: both ranks read the same batch and each computes half of every block; the
    losses are one process's, a sharded checkpoint resumes exactly and loads whole in one process."""
    argv = drop([*ARGV, "--data-dir", tiny_data, "--optimizer", "adamw", "--batch-size", "4", "--schedule", "constant"],
                "--max-steps")
    code, _, err = run_cli(*argv, "--max-steps", "6", "--out", tmp_path / "one")
    assert code == 0, err
    tp = [*argv, "--tensor-parallel", "2", "--ckpt-every", "3"]
    torchrun("-m", "lmforge.cli", *tp, "--max-steps", "6", "--out", tmp_path / "tp")
    assert losses(tmp_path / "tp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    state = ckpt_io.read_checkpoint_state(ckpt_io.resolve_checkpoint(tmp_path / "tp"))
    assert state["tokens_seen"] == 6 * 4 * 32  # each batch counted once, not once per rank of the group
    a = ckpt_io.load_model(tmp_path / "one")[0].state_dict()
    b = ckpt_io.load_model(tmp_path / "tp")[0].state_dict()  # two ranks' halves, read whole by one process
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)

    torchrun("-m", "lmforge.cli", *tp, "--max-steps", "3", "--out", tmp_path / "cut")
    torchrun("-m", "lmforge.cli", *tp, "--max-steps", "6", "--out", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "tp")


def test_fsdp_and_tensor_parallel_on_a_2d_mesh(tiny_data, tmp_path):
    """Four processes as 2 x 2: tensor parallel within each pair, FSDP2 across the pairs, each pair
    reading its own half of the global batch: the losses of one process on the whole batch. The
    checkpoint written by the four resumes in two (FSDP2 alone)."""
    argv = [*ARGV, "--data-dir", tiny_data, "--optimizer", "adamw", "--schedule", "constant"]
    code, _, err = run_cli(*argv, "--batch-size", "4", "--out", tmp_path / "one")
    assert code == 0, err
    torchrun("-m", "lmforge.cli", *argv, "--batch-size", "2", "--parallel", "fsdp", "--tensor-parallel", "2",
             "--out", tmp_path / "mesh", nproc=4)
    assert losses(tmp_path / "mesh") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    assert len(list((ckpt_io.resolve_checkpoint(tmp_path / "mesh") / "sharded").glob("*.distcp"))) == 4
    torchrun("-m", "lmforge.cli", *drop(argv, "--max-steps"), "--max-steps", "6", "--batch-size", "2",
             "--parallel", "fsdp", "--out", tmp_path / "mesh", "--resume")
    assert len(losses(tmp_path / "mesh")) == 6


def test_tensor_parallel_refusals(tiny_data, tmp_path):
    argv = [*ARGV, "--data-dir", tiny_data, "--batch-size", "2", "--out", tmp_path / "x"]
    code, _, err = run_cli(*argv, "--tensor-parallel", "2")
    assert code == 2 and "needs a multiple of 2 processes" in err
    r = torchrun("-m", "lmforge.cli", *argv, "--tensor-parallel", "3", check=False)
    assert r.returncode != 0 and "error: --tensor-parallel 3 needs a multiple of 3 processes" in r.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_fsdp_compiles_each_block(tiny_data, tmp_path, monkeypatch):
    """--compile on under FSDP2: each block compiled before it is sharded (inductor writes its kernels),
    and the losses are eager FSDP2's."""
    argv = [*ARGV, "--data-dir", tiny_data, "--optimizer", "adamw", "--batch-size", "2", "--parallel", "fsdp"]
    torchrun("-m", "lmforge.cli", *argv, "--out", tmp_path / "eager")
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    r = torchrun("-m", "lmforge.cli", *drop(argv, "--compile"), "--compile", "on", "--out", tmp_path / "compiled")
    assert "torch.compile failed" not in r.stderr
    assert any(cache.rglob("*.py"))  # inductor generated code: something was compiled
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


def test_sharded_checkpoints_in_one_process_resume_exactly_and_export(tiny_data, tmp_path, monkeypatch):
    """--checkpoint-format sharded without torchrun: the torch.distributed.checkpoint folder holds the
    weights and Muon's state, a crashed run resumes from it bit for bit (conftest.check_exact_resume),
    and `lmforge export` reads it like any checkpoint."""
    from conftest import check_exact_resume

    from lmforge.stages.options import PretrainOptions
    from lmforge.stages.pretrain import pretrain
    from lmforge.train.config import TrainConfig

    def run(out, resume=False):
        cfg = TrainConfig(out_dir=str(out), max_steps=10, ckpt_every=5, eval_every=0, log_every=1, warmup_steps=2,
                          dtype="fp32", compile="off", progress=False, checkpoint_format="sharded")
        return pretrain(PretrainOptions(data_dir=str(tiny_data), preset="tiny", batch_size=4, seq_len=32,
                                        eval_tokens=1024, resume=resume), cfg)

    check_exact_resume(run, tmp_path, monkeypatch)
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "straight")
    assert ckpt_io.is_sharded_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    code, _, err = run_cli("export", "--checkpoint", ckpt, tmp_path / "hf")
    assert code == 0, err
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    model = ckpt_io.load_model(ckpt)[0]
    assert torch.equal(exported["model.embed_tokens.weight"], model.embed_tokens.weight)


def test_fsdp_killed_mid_run_resumes_to_the_uninterrupted_curve(tiny_data, tmp_path):
    """SIGKILL to the whole torchrun job once a sharded checkpoint exists (wherever it is then: in a
    step, in a save), then --resume: the curve equals a run that was never interrupted."""
    import signal
    import time

    argv = [*drop(ARGV, "--max-steps"), "--max-steps", "60", "--data-dir", tiny_data, "--batch-size", "2",
            "--parallel", "fsdp", "--schedule", "constant", "--ckpt-every", "5"]
    torchrun("-m", "lmforge.cli", *argv, "--out", tmp_path / "straight")
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "lmforge.cli", *map(str, argv), "--out",
                            str(tmp_path / "cut")], env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not ckpt_io.list_checkpoints(tmp_path / "cut" / "checkpoints") and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    found = ckpt_io.list_checkpoints(tmp_path / "cut" / "checkpoints")
    assert found and int(found[-1].name.split("_")[1]) < 60  # killed before the end
    torchrun("-m", "lmforge.cli", *argv, "--out", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
