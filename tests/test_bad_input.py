"""Bad input that used to end in a traceback: each must give one `error:` line and exit status 2.
(The server's cases, a 4xx each, are in tests/test_serve.py.)"""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, save_tiny_checkpoint

from lmforge.common import LmforgeError


def one_error_line(code, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_speedrun_without_validation_is_refused_before_any_stage(tmp_path):
    """--val-fraction 0 used to crash after the whole pretraining stage (its report needs validation
    bits per byte): now it is refused before the tokenizer is even trained."""
    out = tmp_path / "run"
    code, _, err = run_cli("speedrun", "--val-fraction", 0, "--out", out, "--max-chars", 2000)
    one_error_line(code, err, "--val-fraction 0", "validation")
    assert not (out / "tokenizer.json").exists()


def _copy_data(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


def test_corrupt_val_shard_is_an_error_not_missing_validation(tiny_data, tmp_path):
    """A damaged validation shard stops pretraining with a clear message; it used to be taken for
    "no validation split" and the run went on without one."""
    from lmforge.data.loader import SplitMissing, TokenSplit

    data = _copy_data(tiny_data, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["val"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])  # cut mid-token
    with pytest.raises(LmforgeError, match="corrupt") as e:
        TokenSplit(data, "val")
    assert not isinstance(e.value, SplitMissing)
    code, _, err = run_cli("pretrain", "--data-dir", data, "--out", tmp_path / "run", "--model", "tiny",
                           "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
                           "--batch-size", "2", "--max-steps", "1", "--no-progress", "--compile", "off",
                           "--device", "cpu")
    one_error_line(code, err, str(shard), "corrupt")
    shard.unlink()  # a shard the manifest lists but that is gone: damaged too, not "no validation"
    with pytest.raises(LmforgeError, match="missing") as e:
        TokenSplit(data, "val")
    assert not isinstance(e.value, SplitMissing)


def test_absent_or_empty_val_split_is_missing(tiny_data, tmp_path):
    from lmforge.data.loader import SplitMissing, TokenSplit

    data = _copy_data(tiny_data, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        (data / shard["file"]).write_bytes(b"")
        shard["tokens"] = 0  # what val_fraction=0 writes
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SplitMissing, match="empty"):
        TokenSplit(data, "val")
    del manifest["splits"]["val"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SplitMissing, match="no 'val' split"):
        TokenSplit(data, "val")


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_serve_port_out_of_range(tmp_path, port):
    code, _, err = run_cli("serve", "--checkpoint", tmp_path, "--port", port)
    assert code == 2
    # argparse's usage line, then one line naming the option and the range (no OverflowError)
    assert "argument --port: expected a TCP port number in 1..65535" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["sample", "chat", "generate"])
def test_seed_beyond_64_bits_is_an_option_error(tmp_path, command):
    code, _, err = run_cli(command, "--checkpoint", tmp_path, "--seed", str(2**64))
    assert code == 2
    assert "argument --seed: expected an integer seed that fits in 64 bits" in err and "Traceback" not in err


def test_report_card_reads_model_config_through_one_check(tmp_path):
    """The report card of a run whose state.json lost its model_config gives the same clear line
    as loading the model (resume, the reward model and the speedrun read it through the same check)."""
    from lmforge.eval.report import _run_facts

    run = save_tiny_checkpoint(tmp_path / "run")
    [ckpt] = (run / "checkpoints").iterdir()
    state = json.loads((ckpt / "state.json").read_text())
    del state["model_config"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(LmforgeError, match="has no 'model_config'"):
        _run_facts(run)


def test_state_without_model_config_is_one_clear_line(tmp_path):
    run = save_tiny_checkpoint(tmp_path / "run")
    [ckpt] = (run / "checkpoints").iterdir()
    state = json.loads((ckpt / "state.json").read_text())
    del state["model_config"]
    (ckpt / "state.json").write_text(json.dumps(state))
    for argv in (["sample", "--checkpoint", run, "--max-new-tokens", 2],
                 ["chat", "--checkpoint", run]):
        code, _, err = run_cli(*argv)
        one_error_line(code, err, "model_config", str(ckpt / "state.json"))
    state["model_config"] = {"n_layer": "two"}  # there, but not a configuration
    (ckpt / "state.json").write_text(json.dumps(state))
    code, _, err = run_cli("sample", "--checkpoint", run, "--max-new-tokens", 2)
    one_error_line(code, err, "model_config")


def test_data_without_validation_still_pretrains(tmp_path, corpus_text):
    """The other side of the corrupt-shard check: shards prepared with val_fraction=0 have no
    validation on purpose, and pretraining runs without it."""
    from lmforge.data.loader import SplitMissing, TokenSplit
    from lmforge.data.prepare import prepare_shards
    from lmforge.tokenizer import Tokenizer

    (tmp_path / "corpus.txt").write_text(corpus_text[:20_000])
    Tokenizer.byte_level().save(tmp_path / "tokenizer.json")
    prepare_shards(str(tmp_path / "corpus.txt"), tmp_path / "tokenizer.json", tmp_path / "data", val_fraction=0.0,
                   workers=1, show_progress=False)
    with pytest.raises(SplitMissing):
        TokenSplit(tmp_path / "data", "val")
    code, out, err = run_cli("pretrain", "--data-dir", tmp_path / "data", "--out", tmp_path / "run", "--model", "tiny",
                             "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
                             "--batch-size", "2", "--max-steps", "2", "--no-progress", "--compile", "off",
                             "--device", "cpu")
    assert code == 0, err
    assert list((tmp_path / "run" / "checkpoints").iterdir())
