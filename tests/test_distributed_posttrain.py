"""Every post-training stage under DDP: two gloo processes under torchrun, each with half of the
global batch, must give the losses (and held-out metrics) of one process with the whole batch, as
test_train.py::test_ddp_two_processes_match_one_process does for pretraining.

SFT, the reward model and DPO draw their rows from one global stream that every process walks, so
the global batch is the same by construction. GRPO and PPO sample their rollouts, and a process
samples with its own seed: the same prompts split over two processes would get other replies than
on one. So the RL tests fix the rollouts: the replies come from `scripted_replies`, a pure function
of each prompt and of the reply's place in its group (the prompts themselves are drawn per global
row, the same whatever the number of processes). What is compared is then the distributed loss,
gradient and optimizer step on identical rollouts — including processes holding different numbers
of replies and tokens, which the scripted replies are made to produce.
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli, save_tiny_checkpoint

from lmforge.train.logs import read_log

TESTS = Path(__file__).resolve().parent
TRAIN = ["--max-steps", "3", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0", "--warmup-steps", "1",
         "--optimizer", "adamw", "--lr", "3e-3", "--dtype", "fp32", "--compile", "off", "--device", "cpu",
         "--no-progress", "--seed", "3"]

# The torchrun workers run the CLI with generate_replies replaced by scripted_replies (RL only).
DRIVER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
if sys.argv[1] in ("grpo", "ppo"):
    from lmforge.posttrain import verifiable
    from test_distributed_posttrain import scripted_replies
    verifiable.generate_replies = scripted_replies
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def scripted_replies(engine, prompts, max_new_tokens, *, tools, **sampling):
    """Replies to `arithmetic:1:+` prompts (rendered, each repeated group-size times in a row) that
    depend only on the question and on the reply's place j in its group: reply j of "a + b" is right
    when j < a % 3 (so a group is all wrong when a % 3 == 0: uniform, dropped by GRPO), and
    carries a % 4 words of preamble (so the processes hold different numbers of tokens)."""
    from lmforge.posttrain.verifiable import Reply

    tok = engine.tokenizer
    end = tok.special_id("<|assistant_end|>")
    out, j, previous = [], 0, None
    for p in prompts:
        j = j + 1 if p == previous else 0
        previous = p
        a, b = map(int, re.findall(r"\d+", tok.decode(p))[-2:])
        text = "so " * (a % 4) + str(a + b if j < a % 3 else a + b + 1)
        tokens = (tok.encode(text) + [end])[:max_new_tokens]
        out.append(Reply(tokens, [1] * len(tokens), text, tokens[-1] == end))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ddp_base"))


def torchrun(tmp_path, argv):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with socket.socket() as sock:  # a free port: a fixed one can still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(driver), *map(str, argv)], env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def one_process(monkeypatch, argv):
    if argv[0] in ("grpo", "ppo"):
        from lmforge.posttrain import verifiable

        monkeypatch.setattr(verifiable, "generate_replies", scripted_replies)
    code, stdout, err = run_cli(*argv)
    assert code == 0, err
    return json.loads(stdout[stdout.index("{"):])


def compare(tmp_path, monkeypatch, argv, per_process: int, logged: tuple[str, ...] = ()):
    """Run argv with a batch (--batch-size; prompts per step for RL) of 2·per_process on one process
    and per_process on each of two; return both results after checking the logged loss and `logged`
    metrics of every step."""
    batch = "--prompts-per-step" if argv[0] in ("grpo", "ppo") else "--batch-size"
    one = one_process(monkeypatch, [*argv, batch, 2 * per_process, "--out", tmp_path / "one"])
    two = torchrun(tmp_path, [*argv, batch, per_process, "--out", tmp_path / "two"])
    steps = {n: [r for r in read_log(tmp_path / n / "log.jsonl") if "loss" in r] for n in ("one", "two")}
    assert len(steps["one"]) == len(steps["two"]) == 3
    for a, b in zip(steps["one"], steps["two"]):
        for key in ("loss", *logged):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
    assert a["tokens"] == b["tokens"]
    state = json.loads((sorted((tmp_path / "two" / "checkpoints").iterdir())[-1] / "state.json").read_text())
    assert state["world_size"] == 2
    for key in [k for k in one if k.startswith(("val_", "start_val_"))]:
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key
    return one, two, steps


def test_sft_two_processes_match_one(base, tmp_path, monkeypatch):
    # Conversations of different lengths: the processes hold different numbers of target tokens.
    one, _, _ = compare(tmp_path, monkeypatch, ["sft", "--checkpoint", base, "--data", "synthetic:arithmetic:40",
                                                "--data", "synthetic:identity:20", "--val-fraction", "0.2", *TRAIN],
                        per_process=2)
    assert "val_loss" in one


def test_reward_model_two_processes_match_one(base, tmp_path, monkeypatch):
    # Needs every trainable parameter to get a gradient: DDP fails on the second step otherwise.
    one, _, _ = compare(tmp_path, monkeypatch, ["reward", "train", "--checkpoint", base, "--data",
                                                "synthetic:arithmetic:40", "--val-fraction", "0.2", *TRAIN],
                        per_process=2, logged=("accuracy", "margin"))
    assert {"val_accuracy", "val_margin"} <= set(one)


@pytest.mark.slow  # the file is over a minute on 2 busy cores; DPO's batches split like the reward model's
def test_dpo_two_processes_match_one(base, tmp_path, monkeypatch):
    one, _, _ = compare(tmp_path, monkeypatch, ["dpo", "--checkpoint", base, "--data", "synthetic:arithmetic:40",
                                                "--val-fraction", "0.2", "--beta", "0.2", *TRAIN],
                        per_process=2, logged=("margin", "reward_chosen", "accuracy"))
    assert one["val_margin"] != 0.0  # the policy moved away from the reference


RL = ["--checkpoint", None, "--task", "arithmetic:1:+", "--group-size", "3", "--max-new-tokens", "12", "--eval-n",
      "6", *TRAIN]


def test_grpo_two_processes_match_one(base, tmp_path, monkeypatch):
    argv = ["grpo", *RL]
    argv[argv.index(None)] = base
    _, _, steps = compare(tmp_path, monkeypatch, argv, per_process=2, logged=("reward", "accuracy", "kl",
                                                                               "informative", "length"))
    # 1 or 3 of the 4 groups informative in some step: the processes kept different numbers of replies.
    assert any(r["informative"] in (0.25, 0.75) for r in steps["one"]), steps["one"]
    assert any(0 < r["reward"] < 1 for r in steps["one"])


@pytest.mark.slow  # the RL path under DDP is in the default run through GRPO
def test_ppo_two_processes_match_one(base, tmp_path, monkeypatch):
    argv = ["ppo", *RL, "--updates-per-rollout", "2"]
    argv[argv.index(None)] = base
    compare(tmp_path, monkeypatch, argv, per_process=2, logged=("reward", "value_loss", "kl", "clip_frac"))
