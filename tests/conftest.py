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
