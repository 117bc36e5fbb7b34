import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.protocol import LanguageModel, ModelConfig, ModelFamily
from lmforge.models.registry import register

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Test models are tiny: one intra-op thread is faster, and on a busy machine extra threads
    spend their time waiting for cores (0.5 s instead of 3 ms a step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_data() -> Path:
    """The development corpora (never committed): $LMFORGE_SHARED_DATA or ../shared/data."""
    return Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


# .ci/run sets this: there every test must run, so what would skip for a user fails instead.
REQUIRE_ALL = os.environ.get("LMFORGE_REQUIRE_ALL", "") not in ("", "0")


def missing(what: str, how: str):
    """Skip a test whose data or tool is not on this machine, with one line saying what is missing
    and how to get it; under LMFORGE_REQUIRE_ALL=1 (CI) the same line fails the test."""
    message = f"needs {what}: {how}"
    if REQUIRE_ALL:
        pytest.fail(message + " [LMFORGE_REQUIRE_ALL=1: this test may not skip]", pytrace=False)
    pytest.skip(message)


def shared_file(relative: str) -> Path:
    """A file (or folder) of the development corpora, or a skip saying which one is missing."""
    path = shared_data() / relative
    if not path.exists():
        missing(f"{relative} from the development data",
                f"not found under {shared_data()}; point LMFORGE_SHARED_DATA at a folder that has it")
    return path


FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def sandbox():
    """The python tool's OS sandbox works here, or the test skips (fails under LMFORGE_REQUIRE_ALL=1):
    machines without user namespaces (some container and AppArmor policies) refuse to run the tool."""
    from lmforge.inference.sandbox import sandbox_problem

    problem = sandbox_problem()
    if problem:
        missing("an OS sandbox for the python tool", problem)


def stdlib_text(n_chars: int) -> str:
    """The first n_chars of the Python standard library's source (the speedrun's default corpus):
    text every machine has, for tests that need some real text but no particular one."""
    from lmforge.data.sources import iter_documents

    parts, total = [], 0
    for doc in iter_documents(None):
        parts.append(doc)
        total += len(doc) + 2
        if total >= n_chars:
            break
    return "\n\n".join(parts)[:n_chars]


def stdlib_prose(n_chars: int) -> str:
    """The first n_chars of the docstrings of the standard library (modules, classes, functions):
    English prose every machine has, for tests about word order rather than code."""
    import ast
    import warnings

    from lmforge.data.sources import iter_documents

    parts, total = [], 0
    for source in iter_documents(None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # e.g. old invalid escapes
                tree = ast.parse(source)
        except SyntaxError:  # a file this parser cannot read is not needed
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
                    total += len(doc) + 2
        if total >= n_chars:
            break
    return "\n\n".join(parts)[:n_chars]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """200k characters of standard-library source: the default corpus of the tests."""
    return stdlib_text(200_000)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_text):
    """Byte-level tokenizer + shards of the first 120k characters of the test corpus (10% val)."""
    from lmforge.data.prepare import prepare_shards
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    text = corpus_text[:120_000]
    (root / "corpus.txt").write_text(text)
    Tokenizer.byte_level().save(root / "tokenizer.json")
    prepare_shards(str(root / "corpus.txt"), root / "tokenizer.json", root / "data", val_fraction=0.1,
                   workers=1, show_progress=False)
    return root / "data"


def context_free_loss(data_dir, batch_size: int, seq_len: int, eval_tokens: int) -> float:
    """The lowest mean loss (nats/token) any predictor that ignores the context can reach on the
    validation targets pretraining evaluates (same windows as NextTokenTask.evaluate): the entropy of
    their own token frequencies. A model below it has learned to use the context."""
    import numpy as np

    from lmforge.data.loader import TokenSplit, eval_batches

    targets = [y.flatten().numpy() for _, y in eval_batches(TokenSplit(data_dir, "val"), batch_size, seq_len,
                                                           max_batches=max(1, eval_tokens // (batch_size * seq_len)))]
    counts = np.bincount(np.concatenate(targets))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_cli(*argv):
    """`lmforge ARGV...` in this process: (exit code, stdout, stderr); argparse exits become codes."""
    import contextlib
    import io

    from lmforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def save_tiny_checkpoint(root: Path, block_size: int = 96) -> Path:
    """A random `tiny` model with the byte-level tokenizer, saved as a run folder in root."""
    import torch

    from lmforge.models.transformer import GPT, get_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    tok = Tokenizer.byte_level()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=block_size))
    save_checkpoint(root / "checkpoints", 0, model, None, {"tokenizer_fingerprint": tok.fingerprint},
                    files={"tokenizer.json": (root / "tokenizer.json").read_bytes()})
    return root


# ----------------------------------------------------------------------------- a model family that is not a transformer
# (tests/test_reward_dpo.py and tests/test_rl.py wrap it in the reward and PPO heads)


@dataclass(frozen=True)
class PrefixMeanConfig(ModelConfig):
    vocab_size: int = 260
    n_embd: int = 8


class PrefixMeanLM(LanguageModel):
    """The hidden state at t is the mean of the embeddings of tokens 0..t; a linear output layer.
    What the heads may rely on is the protocol alone."""

    family = "test-prefix-mean"

    def __init__(self, cfg: PrefixMeanConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.out = nn.Linear(cfg.n_embd, cfg.vocab_size)

    hidden_size = property(lambda self: self.config.n_embd)

    def hidden_states(self, idx):
        return self.embed(idx).cumsum(1) / torch.arange(1, idx.size(1) + 1, device=idx.device)[:, None]

    def logits_from_hidden(self, h):
        return self.out(h).float()

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.logits_from_hidden(self.hidden_states(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)

    def param_groups(self):
        return {"embedding": [self.embed.weight, self.out.weight], "vector": [self.out.bias]}

    def output_head_names(self):
        return ["out.weight", "out.bias"]


register(ModelFamily("test-prefix-mean", PrefixMeanLM, PrefixMeanConfig, {"tiny": PrefixMeanConfig()},
                     default_preset="tiny"))


def check_exact_resume(run, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """run(out, resume=False) -> pretrain's result, for a 10-step run that checkpoints every 5 steps.
    10 steps in one go, or 7 (checkpoint at 5) cut by a crash in step 8 and then resumed, must give the
    same loss at every step and bit-identical weights. Returns both runs' results."""
    from lmforge.stages.pretrain import NextTokenTask
    from lmforge.train import checkpoint as ckpt_io
    from lmforge.train.logs import read_log

    def losses(out):
        return [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]

    straight = run(tmp_path / "straight")
    calls, real_loss = [], NextTokenTask.loss

    def crash_in_step_8(self, model, batch):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # steps 6 and 7 are logged but not checkpointed
        return real_loss(self, model, batch)

    monkeypatch.setattr(NextTokenTask, "loss", crash_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(NextTokenTask, "loss", real_loss)
    assert len(losses(tmp_path / "cut")) == 7
    resumed = run(tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    a = ckpt_io.load_model(tmp_path / "straight")[0].state_dict()
    b = ckpt_io.load_model(tmp_path / "cut")[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return straight, resumed


def free_port() -> int:
    """A loopback port nobody holds right now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*argv, nproc: int = 2, timeout: float = 300, check: bool = True):
    """`python -m torch.distributed.run --nproc_per_node=N ARGV...` from the repository, one thread per
    process; the finished process (stdout/stderr captured). check: its exit code must be 0."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={free_port()}", *map(str, argv)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r

