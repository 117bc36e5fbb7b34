"""Tests for the speedrun presets (lmforge/speedrun.py) and the multi-process pretraining stage."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
from test_eval import build_data_root, offline_hub, unreachable_hub  # noqa: F401 (the last two: fixtures)

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.speedrun import EVAL_TASKS, SPEEDRUN_PRESETS, check_preset, get_speedrun_preset


@pytest.mark.parametrize("name", ["gpu-1", "gpu-8"])
def test_gpu_presets_fit_an_80gb_gpu_with_exact_batch_arithmetic(name):
    p = get_speedrun_preset(name)
    r = check_preset(p)
    assert p.device == "cuda" and p.gpu_memory_gib == 80
    assert p.batch_size * p.seq_len * p.grad_accum * p.nproc == p.total_batch_tokens
    assert r["memory_gib"] < 80
    assert 15 < r["tokens_per_param"] < 30  # about Chinchilla's 20 tokens per parameter
    # Training FLOPs: 6 per parameter and token plus attention, within what a node can do in a day
    # (8 x ~400 TFLOP/s bf16 at 40% utilisation).
    assert 6 * r["params"] * r["tokens"] < r["flops"] < 8 * 400e12 * 0.4 * 86400
    assert r["params"] > 100e6


def test_cpu_preset_is_the_default_model_on_a_time_budget():
    p = get_speedrun_preset("cpu")
    r = check_preset(p)
    assert p.device == "cpu" and p.nproc == 1 and p.model == "cpu" and p.data == "stdlib"
    assert p.time_budget is not None and p.time_budget <= 10 * 60 and "tokens" not in r
    assert r["grad_accum"] == 1


def test_gpu8_fsdp_option_and_dry_run(capsys):
    """The gpu-8 preset with --parallel fsdp: the estimate per device shrinks by the sharded state, and
    a batch that does not fit under ddp is told to shard."""
    gpu8 = SPEEDRUN_PRESETS["gpu-8"]
    ddp, fsdp = check_preset(gpu8), check_preset(replace(gpu8, parallel="fsdp"))
    state = lambda f: f.weights + f.gradients + f.optimizer  # noqa: E731
    assert state(fsdp["footprint"]) < state(ddp["footprint"]) / 4
    assert fsdp["footprint"].activations == ddp["footprint"].activations
    with pytest.raises(LmforgeError, match="shard the model"):
        check_preset(replace(gpu8, batch_size=64, total_batch_tokens=64 * 2048 * 8))
    assert main(["speedrun", "--preset", "gpu-8", "--parallel", "fsdp", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "each holds 1/8 of the model (fsdp)" in out and "fits a 80 GiB device" in out
    assert f"{fsdp['memory_gib']:.2f} GiB" in out


def test_check_preset_names_the_problem():
    gpu8 = SPEEDRUN_PRESETS["gpu-8"]
    with pytest.raises(LmforgeError, match="GiB per device does not fit 80 GiB"):
        check_preset(replace(gpu8, batch_size=64, total_batch_tokens=64 * 2048 * 8))
    with pytest.raises(LmforgeError, match="not a multiple"):
        check_preset(replace(gpu8, total_batch_tokens=500_000))
    with pytest.raises(LmforgeError, match="exceeds the model's context"):
        check_preset(replace(gpu8, seq_len=4096))
    with pytest.raises(LmforgeError, match="unknown speedrun preset"):
        get_speedrun_preset("tpu")


def test_multi_process_preset_pretrains_under_torchrun(monkeypatch, tmp_path, corpus_text, capsys):
    """A two-process preset on the CPU (gloo) exercises the path the 8-GPU preset takes: the
    pretraining stage runs as `torchrun -m lmforge.cli pretrain`, and its checkpoint lands in the run."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:30_000])
    two = replace(SPEEDRUN_PRESETS["cpu"], name="gpu-8", nproc=2, batch_size=2, seq_len=32,
                  total_batch_tokens=2 * 32 * 2 * 2, time_budget=None, max_steps=3)
    monkeypatch.setitem(SPEEDRUN_PRESETS, "gpu-8", two)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = main(["speedrun", "--preset", "gpu-8", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--vocab-size", "300", "--tokenizer-chars", "30000", "--model", "tiny", "--block-size", "32",
                 "--eval-every", "0", "--compile", "off", "--no-progress", "--stop-after", "pretrain"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--nproc_per_node=2" in out and "--grad-accum 2" in out
    assert "bits/byte" in out  # read back from the run's log by the parent process
    assert (tmp_path / "run" / "pretrain" / "checkpoints" / "step_000003" / "model.safetensors").is_file()


def test_killed_speedrun_resumes_where_it_stopped(tmp_path, corpus_text):
    """Kill -9 the speedrun in the middle of pretraining; running the same command again reuses the
    tokenizer and shards and continues from the last checkpoint instead of starting over."""
    import signal
    import subprocess
    import sys
    import time

    from lmforge.train.checkpoint import list_checkpoints

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:30_000])
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "lmforge.cli", "speedrun", "--data", str(corpus), "--out", str(run),
            "--vocab-size", "300", "--tokenizer-chars", "30000", "--model", "tiny", "--block-size", "32",
            "--batch-size", "2", "--grad-accum", "1", "--eval-every", "0", "--ckpt-every", "5", "--compile", "off",
            "--no-progress", "--stop-after", "pretrain", "--max-new-tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv + ["--max-steps", "1000000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not any(c.name >= "step_000010" for c in list_checkpoints(run / "pretrain" / "checkpoints")):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = int(list_checkpoints(run / "pretrain" / "checkpoints")[-1].name.split("_")[1])
    again = subprocess.run(argv + ["--max-steps", str(killed_at + 5)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stdout and "reusing shards" in again.stdout and "(resuming)" in again.stdout
    assert f"at step {killed_at}" in again.stdout + again.stderr  # "resumed from <checkpoint> at step N"
    assert (run / "pretrain" / "checkpoints" / f"step_{killed_at + 5:06d}").is_dir()


@pytest.mark.usefixtures("offline_hub")
def test_full_speedrun_runs_every_stage_reports_each_metric_and_reuses_them(tmp_path, corpus_text, capsys,
                                                                           monkeypatch, sandbox):
    """tokenizer -> data -> pretrain -> SFT -> GRPO -> eval -> report card on a tiny model; the
    report card shows each stage's metric and a number for every benchmark (the data root is the
    fixture data: a few items per benchmark); the same command again reuses every stage."""
    import json
    import re

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LMFORGE_SHARED_DATA", str(build_data_root(tmp_path / "data_root")))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:40_000])
    run = tmp_path / "run"
    argv = ["speedrun", "--data", str(corpus), "--out", str(run), "--vocab-size", "300", "--tokenizer-chars", "40000",
            "--model", "tiny", "--block-size", "128", "--batch-size", "4", "--max-steps", "3", "--eval-every", "0",
            "--compile", "off", "--no-progress", "--max-new-tokens", "4", "--sft-steps", "2", "--rl-steps", "1",
            "--task-eval-n", "3", "--eval-limit", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for i, stage in enumerate(["tokenizer", "data", "pretrain", "sft", "rl", "eval", "report card"], 1):
        assert f"[{i}/7] {stage}" in out
    assert f"lmforge chat --checkpoint {run / 'rl' / 'checkpoints'}" in out and "lmforge serve --checkpoint" in out
    report = (run / "report" / "report.md").read_text()
    for row in ("| pretrain | validation bits per byte |", "| SFT | well-formed turns; task accuracy |",
                "| RL (GRPO, tools) | held-out arithmetic:5:+- accuracy |"):
        assert row in report
    for png in ("pretrain_loss.png", "sft_loss.png", "rl_rewards.png"):
        assert (run / "report" / png).is_file()
    card = json.loads((run / "report" / "report.json").read_text())
    assert set(card["stages"]) >= {"tokenizer", "data", "pretrain", "sft", "rl", "eval"}
    assert card["stages"]["rl"]["steps"] == 1 and card["stages"]["sft"]["steps"] == 2
    ev = card["stages"]["eval"]
    assert ev["tasks"] == list(EVAL_TASKS) and ev["skipped"] == {}
    assert "| task | chance | base | final |" in report and "![centred scores" in report
    for name in EVAL_TASKS:  # a base and a final number per benchmark, each on the fixture's first 4 items
        cell = r"[01]\.[0-9]{3} ± [0-9.]+"
        assert re.search(rf"^\| {name} \| 0\.[0-9]{{3}} \| {cell} \| {cell} \|$", report, re.M), name
        assert json.loads((run / "eval" / "final.json").read_text())["tasks"][name]["metrics"]["n"] == 4
    assert "Not run" not in report
    assert re.search(r"^\| eval \| centred benchmark score .* base -?[0-9.]+, final", report, re.M)
    # Nothing left to do: every stage is reused, and the report is written again.
    assert main(argv) == 0
    again = capsys.readouterr().out
    for i, stage in enumerate(["tokenizer", "data", "pretrain", "sft", "rl", "eval"], 1):
        assert f"[{i}/7] {stage}: reusing" in again
    # A larger RL budget runs RL again, from the same SFT model, and keeps SFT.
    assert main(argv[:-6] + ["--rl-steps", "2", "--task-eval-n", "3", "--eval-limit", "4"]) == 0
    third = capsys.readouterr().out
    assert "[4/7] sft: reusing" in third and "[5/7] rl: GRPO" in third and "[6/7] eval: benchmarks" in third
    # More SFT steps: SFT resumes from its own checkpoint, and RL, whose input changed, starts over
    # (its old folder kept aside).
    assert main(argv[:-6] + ["--sft-steps", "3", "--rl-steps", "2", "--task-eval-n", "3", "--eval-limit", "4"]) == 0
    fourth = capsys.readouterr().out
    assert "[4/7] sft: chat" in fourth and "(resuming)" in fourth.split("[5/7]")[0]
    assert "moved to" in fourth and (run / "rl.old" / "stage.json").is_file()
    assert "(resuming)" not in fourth.split("[5/7]")[1]
    assert json.loads((run / "sft" / "stage.json").read_text())["steps"] == 3


def smallest_speedrun_without_data(tmp_path, corpus_text, monkeypatch, capsys):
    """Every stage at its smallest, with no benchmark data: (run folder, what it printed, its argv)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LMFORGE_SHARED_DATA", str(tmp_path / "no_data"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:20_000])
    run = tmp_path / "run"
    argv = ["speedrun", "--data", str(corpus), "--out", str(run), "--vocab-size", "300", "--tokenizer-chars", "20000",
            "--model", "tiny", "--block-size", "128", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0",
            "--compile", "off", "--no-progress", "--max-new-tokens", "4", "--sft-steps", "1", "--rl-steps", "1",
            "--task-eval-n", "2", "--eval-limit", "2"]
    assert main(argv) == 0
    return run, capsys.readouterr().out, argv


@pytest.mark.usefixtures("unreachable_hub")
def test_report_card_without_benchmark_data_lists_every_benchmark_and_keeps_the_other_metrics(
        tmp_path, corpus_text, capsys, monkeypatch, sandbox):
    """A machine with neither the benchmark files nor the hub: the speedrun still finishes, its
    report card says for every benchmark that it was not run, why and what gets its data, and
    still has what needs no download: bits per byte, the SFT task accuracies and tool calls, GRPO."""
    import json

    run, out, argv = smallest_speedrun_without_data(tmp_path, corpus_text, monkeypatch, capsys)
    assert out.count("      not run: ") == len(EVAL_TASKS)  # one line per benchmark while the stage runs
    report = (run / "report" / "report.md").read_text()
    ev = json.loads((run / "report" / "report.json").read_text())["stages"]["eval"]
    assert ev["tasks"] == [] and set(ev["skipped"]) == set(EVAL_TASKS) and ev["results"] == {}
    from lmforge.eval.tasks import MC_TASKS

    for name in EVAL_TASKS:
        line = next(x for x in report.splitlines() if x.startswith(f"- **{name}**: "))
        assert MC_TASKS[name].local_file + " not found" in line and "is not reachable" in line
        assert f"To run it: set LMFORGE_SHARED_DATA / --data-root to a folder with {MC_TASKS[name].local_file}" in line
        assert MC_TASKS[name].hub[0] in line
    assert "| eval | centred benchmark score (0 = chance) | not run: no benchmark data on this machine" in report
    assert "| task | chance |" not in report
    # the metrics that need no download are all there, with numbers
    import re

    assert re.search(r"^\| pretrain \| validation bits per byte \| \*\*[0-9.]+\*\* bits/byte", report, re.M)
    assert re.search(r"^\| SFT \| well-formed turns; task accuracy \| .* accuracy \*\*[0-9.]+\*\* \(arithmetic "
                     r"[0-9.]+, letters [0-9.]+, identity [0-9.]+\)", report, re.M)
    assert re.search(r"^\| arithmetic \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", report, re.M)  # tool calls per reply
    assert re.search(r"^\| RL \(GRPO, tools\) \| held-out .* accuracy \| [0-9.]+% → \*\*[0-9.]+%\*\*", report, re.M)
    # the data arrives (what the report card says to do): the same command runs the benchmarks now
    monkeypatch.setenv("LMFORGE_SHARED_DATA", str(build_data_root(tmp_path / "data_root")))
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "[5/7] rl: reusing" in again and "[6/7] eval: benchmarks of the base and the final model" in again
    report = (run / "report" / "report.md").read_text()
    assert "Not run" not in report and "| task | chance | base | final |" in report
    assert all(re.search(rf"^\| {name} \| 0\.[0-9]{{3}} \| [01]\.[0-9]{{3}} ± ", report, re.M) for name in EVAL_TASKS)


@pytest.mark.usefixtures("unreachable_hub")
def test_without_a_sandbox_the_speedrun_leaves_the_python_tool_out(tmp_path, corpus_text, capsys, monkeypatch):
    """Where the python tool's sandbox cannot be built (macOS, no user namespaces) the speedrun still
    runs end to end: SFT without letter counting, tool loops with the calculator only, the report
    saying so — and model-written Python is never run."""
    import json

    import lmforge.inference.sandbox as sandbox
    import lmforge.inference.tools as tools

    def never(code, *args, **kwargs):
        raise AssertionError(f"the python tool ran without a sandbox: {code!r}")

    monkeypatch.setattr(sandbox, "sandbox_problem", lambda: "python tool: no sandbox here (test)")
    monkeypatch.setattr(tools, "run_python", never)
    run, out, argv = smallest_speedrun_without_data(tmp_path, corpus_text, monkeypatch, capsys)
    assert "note: python tool: no sandbox here (test)" in out and "leave out the python tool" in out
    stages = json.loads((run / "report" / "report.json").read_text())["stages"]
    assert set(stages["sft"]["tasks"]) == {"arithmetic", "identity"} and stages["sft"]["python_tool"] is False
    rl_state = json.loads(next((run / "rl" / "checkpoints").glob("step_*/state.json")).read_text())
    assert rl_state["rl"]["tool_names"] == ["calculator"]
    assert "sandbox cannot be built on this machine" in (run / "report" / "report.md").read_text()
