import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    p = shared_data() / "tinyshakespeare" / "input.txt"
    if not p.is_file():
        pytest.fail(f"test corpus missing: {p} (set LMFORGE_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, shakespeare_path):
    """Byte-level tokenizer + shards of the first 120k characters of tinyshakespeare (10% val)."""
    from lmforge.data.prepare import prepare_shards
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    text = shakespeare_path.read_text()[:120_000]
    (root / "corpus.txt").write_text(text)
    Tokenizer.byte_level().save(root / "tokenizer.json")
    prepare_shards(str(root / "corpus.txt"), root / "tokenizer.json", root / "data", val_fraction=0.1,
                   workers=1, show_progress=False)
    return root / "data"


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

    from lmforge.model import GPT, get_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint

    tok = Tokenizer.byte_level()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=block_size))
    save_checkpoint(root / "checkpoints", 0, model, None, {"tokenizer_fingerprint": tok.fingerprint},
                    files={"tokenizer.json": (root / "tokenizer.json").read_bytes()})
    return root
