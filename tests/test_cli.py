"""Smoke tests of the `lmforge` command line: every subcommand on a tiny corpus, in-process through
`lmforge.cli.main([...])`, one real run of the console script, and the promise that bad input gives
exit status 2 with one clear `error:` line instead of a traceback."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.cli import main
from lmforge.tokenizer import Tokenizer
from lmforge.train.logs import read_log

# Model/training flags shared by every pretrain run here: a 1-layer model that trains in well
# under a second per run, with learning rates high enough that 6 steps visibly learn.
TINY = ["--model", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
        "--batch-size", "4", "--no-progress", "--compile", "off", "--lr", "0.03", "--muon-lr", "0.1",
        "--warmup-steps", "1"]
SPEEDRUN_TINY = [*TINY, "--grad-accum", "1"]  # the speedrun's --preset names a speedrun preset
CORPUS_CHARS = 50_000


def _main(argv, stdin: str | None) -> int:
    """main(argv) with optional stdin text; argparse errors (SystemExit) become their exit code. Any
    other exception propagates (that would be a traceback for the user)."""
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        try:
            return main([str(a) for a in argv])
        except SystemExit as e:
            return e.code
    finally:
        sys.stdin = old_stdin


def call(argv, stdin: str | None = None):
    """Run main in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main(argv, stdin)
    return code, out.getvalue(), err.getvalue()


def cli(capsys, *argv, stdin: str | None = None):
    """Like call(), but through pytest's capsys (for tests that run after the module fixture)."""
    capsys.readouterr()
    code = _main(argv, stdin)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(result):
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    return out


def assert_clean_error(result, *needles):
    """Exit status 2 and either one `error: ...` line or argparse's usage + `prog: error: ...`."""
    code, out, err = result
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    if lines[0].startswith("usage:"):
        assert lines[-1].startswith("lmforge") and ": error: " in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def final_json(stdout: str) -> dict:
    """The JSON summary `lmforge pretrain` prints after its log lines."""
    lines = stdout.splitlines()
    start = max(i for i, ln in enumerate(lines) if ln == "{")
    return json.loads("\n".join(lines[start:]))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, corpus_text, one_thread):
    """tokenizer train -> data prepare -> pretrain (6 steps, evals at 3 and 6), all through main()."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text[:CORPUS_CHARS])
    tok, data, run = root / "tok.json", root / "data", root / "run"
    tok_out = ok(call(["tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", tok,
                       "--max-chars", CORPUS_CHARS, "--no-progress"]))
    prep_out = ok(call(["data", "prepare", "--data", corpus, "--tokenizer", tok, "--out", data,
                        "--workers", 1, "--no-progress"]))
    train_out = ok(call(["pretrain", "--data-dir", data, "--out", run, *TINY, "--max-steps", 6,
                         "--eval-every", 3]))
    return SimpleNamespace(root=root, corpus=corpus, tok=tok, data=data, run=run,
                           tok_out=tok_out, prep_out=prep_out, train_out=train_out)


# ----------------------------------------------------------------------------- the happy path


def test_tokenizer_train(pipe):
    assert "tokenizer: 300 ids" in pipe.tok_out
    tok = Tokenizer.load(pipe.tok)
    assert tok.vocab_size == 300
    assert tok.n_merges == 300 - 256 - 12


def test_encode_decode_round_trip_arguments_and_stdin(pipe, capsys):
    tok = Tokenizer.load(pipe.tok)
    text = "First Citizen:\nBefore we proceed any further, hear me speak. 123 ünïcode!"
    want = tok.encode(text)

    out = ok(cli(capsys, "tokenizer", "encode", "--tokenizer", pipe.tok, text))
    assert [int(t) for t in out.split()] == want
    out_stdin = ok(cli(capsys, "tokenizer", "encode", "--tokenizer", pipe.tok, stdin=text))
    assert out_stdin == out

    back = ok(cli(capsys, "tokenizer", "decode", "--tokenizer", pipe.tok, *out.split()))
    assert back == text + "\n"
    # stdin accepts ids separated by spaces, commas and newlines
    back_stdin = ok(cli(capsys, "tokenizer", "decode", "--tokenizer", pipe.tok, stdin=",\n".join(out.split())))
    assert back_stdin == text + "\n"


def test_export_hf_gives_same_ids(pipe, capsys, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    out = ok(cli(capsys, "tokenizer", "export-hf", "--tokenizer", pipe.tok, tmp_path / "hf"))
    path = tmp_path / "hf" / "tokenizer.json"
    assert str(path) in out and path.is_file()
    hf = HFTokenizer.from_file(str(path))
    tok = Tokenizer.load(pipe.tok)
    text = "MENENIUS:\nWhat work's, my countrymen, in hand? Where go you?"
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert hf.token_to_id("<|bos|>") == tok.bos_id


def test_data_prepare(pipe):
    assert "train:" in pipe.prep_out and "val:" in pipe.prep_out
    manifest = json.loads((pipe.data / "manifest.json").read_text())
    assert manifest["tokenizer_fingerprint"] == Tokenizer.load(pipe.tok).fingerprint
    assert manifest["vocab_size"] == 300
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    # The default 5% of the corpus's documents (~60 between "two blank lines") go to val, whole.
    assert manifest["val_fraction"] == 0.05 and manifest["split_rule"] == "smallest-hash"
    assert val["documents"] == round(0.05 * (train["documents"] + val["documents"])) > 0
    assert train["tokens"] > 3 * val["tokens"] > 0
    assert (pipe.data / "train_000.bin").is_file()


def test_pretrain(pipe):
    summary = final_json(pipe.train_out)
    assert summary["step"] == 6
    assert summary["tokens"] == 6 * 4 * 32
    # A fresh model guesses about uniformly over the 300 ids (5.70 nats); 6 steps bring the
    # validation loss to ~4.1 (4.6 at step 3), measured. Without learning it stays near 5.7.
    val_losses = [r["val_loss"] for r in read_log(pipe.run / "log.jsonl") if "val_loss" in r]
    assert summary["val_loss"] == val_losses[-1] < val_losses[0] < math.log(300) - 0.5
    assert summary["val_loss"] < math.log(300) - 1.0
    assert "step 3: val loss" in pipe.train_out
    ckpt = pipe.run / "checkpoints" / "step_000006"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    assert (pipe.run / "loss.png").is_file()
    log = [json.loads(ln) for ln in (pipe.run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [3, 6]


def test_sample_is_reproducible_with_a_seed(pipe, capsys):
    from lmforge.inference.sampling import generate
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    args = ["sample", "--checkpoint", pipe.run, "--prompt", "ROMEO:", "--max-new-tokens", 10]
    a = ok(cli(capsys, *args, "--seed", 0))
    b = ok(cli(capsys, *args, "--seed", 0))
    c = ok(cli(capsys, *args, "--seed", 1))
    assert a == b
    assert a != c
    assert a.startswith("ROMEO:")

    # the CLI prints exactly what the library generates with the same settings
    model, _ = load_model(pipe.run)
    tok = load_checkpoint_tokenizer(pipe.run)
    new = generate(model, [tok.bos_id] + tok.encode("ROMEO:"), 10, temperature=0.8, top_p=0.95, seed=0,
                   stop_ids={tok.bos_id})
    assert a == "ROMEO:" + tok.decode(new) + "\n"


def test_sample_greedy_is_deterministic(pipe, capsys):
    args = ["sample", "--checkpoint", pipe.run, "--prompt", "KING", "--max-new-tokens", 8, "--temperature", 0]
    a = ok(cli(capsys, *args, "--seed", 1))
    b = ok(cli(capsys, *args, "--seed", 2))
    c = ok(cli(capsys, *args))
    assert a == b == c


def test_sample_several(pipe, capsys):
    out = ok(cli(capsys, "sample", "--checkpoint", pipe.run / "checkpoints" / "step_000006",
                 "--num-samples", 2, "--max-new-tokens", 4, "--seed", 3))
    assert "--- sample 1" in out and "--- sample 2" in out


def parse_table(out: str) -> list[tuple[int, float, float, str]]:
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["rank", "log", "p"])
    rows = []
    for ln in lines[head + 1:]:
        rank, lp, ppl, text = ln.split(maxsplit=3)
        rows.append((int(rank), float(lp), float(ppl), text))
    return rows


def test_score_ranks_texts(pipe, capsys):
    texts = ["the king is dead", "zq xv kj wq"]
    rows = parse_table(ok(cli(capsys, "score", "--checkpoint", pipe.run, *texts)))
    assert len(rows) == 2
    assert [r[0] for r in rows] == [1, 2]
    assert rows[0][1] >= rows[1][1]
    assert sorted(r[3] for r in rows) == sorted(texts)


def test_score_json(pipe, capsys):
    from lmforge.inference.sampling import score_text
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    texts = ["the king is dead", "zq xv kj wq"]
    data = json.loads(ok(cli(capsys, "score", "--checkpoint", pipe.run, "--json", *texts)))
    assert len(data) == 2 and sorted(d["text"] for d in data) == sorted(texts)
    assert data[0]["logprob"] >= data[1]["logprob"]
    model, _ = load_model(pipe.run)
    tok = load_checkpoint_tokenizer(pipe.run)
    for d in data:
        lps = [t["logprob"] for t in d["tokens"]]
        assert sum(lps) == pytest.approx(d["logprob"], abs=1e-6)
        assert all(lp <= 0 for lp in lps)
        assert "".join(t["token"] for t in d["tokens"]) == d["text"]
        assert d["perplexity"] == pytest.approx(math.exp(-d["logprob"] / len(lps)))
        assert d["logprob"] == pytest.approx(score_text(model, tok, d["text"]).logprob, abs=1e-4)


def test_score_one_text_from_stdin_lists_tokens(pipe, capsys):
    out = ok(cli(capsys, "score", "--checkpoint", pipe.run, stdin="Hark"))
    rows = parse_table(out)
    assert len(rows) == 1 and rows[0][3] == "Hark"
    assert out.startswith("'Hark'\n")  # per-token log-probs come first for a single text


def test_pretrain_resume_continues(pipe, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipe.run, run)
    out = ok(cli(capsys, "pretrain", "--data-dir", pipe.data, "--out", run, *TINY, "--max-steps", 9,
                 "--eval-every", 3, "--resume"))
    assert "resumed from" in out and "step 6" in out
    summary = final_json(out)
    assert summary["step"] == 9 and summary["tokens"] == 9 * 4 * 32
    assert (run / "checkpoints" / "step_000009" / "model.safetensors").is_file()
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 9 and 6 in steps  # the log of the first 6 steps is kept


def test_speedrun_end_to_end(pipe, capsys, tmp_path):
    out_dir = tmp_path / "speedrun"
    out = ok(cli(capsys, "speedrun", "--data", pipe.corpus, "--out", out_dir, "--vocab-size", 300, *SPEEDRUN_TINY,
                 "--max-steps", 5, "--eval-every", 0, "--max-new-tokens", 5, "--tokenizer-chars", CORPUS_CHARS,
                 "--prompt", "QUEEN:", "--stop-after", "pretrain"))
    for stage in ("[1/3]", "[2/3]", "[3/3]", "sample:"):
        assert stage in out
    lines = out.splitlines()
    sample = lines[lines.index("      sample:") + 1]
    assert sample.startswith("QUEEN:")
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "data" / "manifest.json").is_file()
    assert (out_dir / "pretrain" / "checkpoints" / "step_000005" / "model.safetensors").is_file()
    assert "val loss" in out and "lmforge sample --checkpoint" in out
    # The same command again reuses every finished stage.
    same = ok(cli(capsys, "speedrun", "--data", pipe.corpus, "--out", out_dir, "--vocab-size", 300, *SPEEDRUN_TINY,
                  "--max-steps", 5, "--eval-every", 0, "--max-new-tokens", 5, "--prompt", "QUEEN:",
                  "--stop-after", "pretrain"))
    assert "[3/3] pretrain: reusing" in same and "sample:" not in same
    # A longer budget continues pretraining from its checkpoint.
    again = ok(cli(capsys, "speedrun", "--data", pipe.corpus, "--out", out_dir, "--vocab-size", 300, *SPEEDRUN_TINY,
                   "--max-steps", 8, "--eval-every", 0, "--max-new-tokens", 5, "--prompt", "QUEEN:",
                   "--stop-after", "pretrain"))
    assert "reusing" in again.split("[2/3]")[0] and "reusing shards" in again
    assert "(resuming)" in again and "resumed from" in again
    assert (out_dir / "pretrain" / "checkpoints" / "step_000008").is_dir()


def test_default_corpus_is_the_stdlib(capsys, tmp_path, one_thread):
    out = ok(cli(capsys, "tokenizer", "train", "--vocab-size", 300, "--max-chars", 200_000,
                 "--out", tmp_path / "tok.json", "--no-progress"))
    assert "tokenizer: 300 ids" in out
    tok = Tokenizer.load(tmp_path / "tok.json")
    # trained on Python source: common code fragments are single tokens
    assert len(tok.encode("    def ")) < len("    def ")


def test_console_script_runs(pipe):
    exe = Path(sys.executable).parent / "lmforge"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "lmforge.cli"]
    text = "To be, or not to be"
    proc = subprocess.run(cmd + ["tokenizer", "encode", "--tokenizer", str(pipe.tok)], input=text,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [int(t) for t in proc.stdout.split()] == Tokenizer.load(pipe.tok).encode(text)


# ----------------------------------------------------------------------------- bad input


def test_missing_data_file(capsys, tmp_path):
    assert_clean_error(cli(capsys, "tokenizer", "train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "t.json"),
                       "nope.txt")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data_file(capsys, tmp_path, pipe, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    assert_clean_error(cli(capsys, "tokenizer", "train", "--data", empty, "--vocab-size", 300,
                           "--out", tmp_path / "t.json", "--no-progress"), "no non-empty documents")
    assert_clean_error(cli(capsys, "data", "prepare", "--data", empty, "--tokenizer", pipe.tok,
                           "--out", tmp_path / "d", "--workers", 1, "--no-progress"), "no non-empty documents")


def test_glob_without_match(capsys, tmp_path, pipe):
    assert_clean_error(cli(capsys, "data", "prepare", "--data", str(tmp_path / "*.txt"), "--tokenizer", pipe.tok,
                           "--out", tmp_path / "d", "--workers", 1, "--no-progress"), "matches no")


def test_tokenizer_file_missing(capsys, tmp_path, pipe):
    missing = tmp_path / "missing.json"
    assert_clean_error(cli(capsys, "tokenizer", "encode", "--tokenizer", missing, "hi"), "not found")
    assert_clean_error(cli(capsys, "tokenizer", "decode", "--tokenizer", missing, "1"), "not found")
    assert_clean_error(cli(capsys, "data", "prepare", "--data", pipe.corpus, "--tokenizer", missing,
                           "--out", tmp_path / "d", "--no-progress"), "not found")


@pytest.mark.parametrize("content", [
    '{"format": "lmforge-bpe", "version": 1, "merg',  # truncated
    "[1, 2, 3]",  # JSON, but not a tokenizer
    '{"format": "lmforge-bpe", "version": 1, "pattern": "x", "merges": [[1]]}',  # bad merge
    "\xff\xfe not utf-8",
])
def test_corrupt_tokenizer_file(capsys, tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("latin-1"))
    assert_clean_error(cli(capsys, "tokenizer", "encode", "--tokenizer", bad, "hi"), str(bad))


def test_tokenizer_changed_since_shards_were_made(capsys, tmp_path, pipe):
    """pretrain reads the tokenizer path recorded in the manifest and checks its hash."""
    tok = tmp_path / "tok.json"
    shutil.copy(pipe.tok, tok)
    data = tmp_path / "data"
    ok(cli(capsys, "data", "prepare", "--data", pipe.corpus, "--tokenizer", tok, "--out", data,
           "--workers", 1, "--no-progress"))
    Tokenizer.byte_level().save(tok)  # a different tokenizer now sits at the recorded path
    assert_clean_error(cli(capsys, "pretrain", "--data-dir", data, "--out", tmp_path / "run", *TINY,
                           "--max-steps", 1), "hash mismatch")


def test_manifest_pointing_to_another_tokenizer(capsys, tmp_path, pipe):
    data = tmp_path / "data"
    shutil.copytree(pipe.data, data)
    other = tmp_path / "other.json"
    Tokenizer.byte_level().save(other)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer_path"] = str(other)
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(cli(capsys, "pretrain", "--data-dir", data, "--out", tmp_path / "run", *TINY,
                           "--max-steps", 1), "hash mismatch")


def test_checkpoint_tokenizer_replaced(capsys, tmp_path, pipe):
    run = tmp_path / "run"
    shutil.copytree(pipe.run, run)
    Tokenizer.byte_level().save(run / "checkpoints" / "step_000006" / "tokenizer.json")
    assert_clean_error(cli(capsys, "sample", "--checkpoint", run, "--max-new-tokens", 2),
                       "does not match")


def test_data_dir_missing(capsys, tmp_path):
    assert_clean_error(cli(capsys, "pretrain", "--data-dir", tmp_path / "nodata", "--out", tmp_path / "run",
                           *TINY), "does not exist")


@pytest.mark.parametrize("command", ["sample", "score"])
def test_checkpoint_missing(capsys, tmp_path, command):
    extra = ["some text"] if command == "score" else []
    assert_clean_error(cli(capsys, command, "--checkpoint", tmp_path / "norun", *extra), "checkpoint not found")
    (tmp_path / "empty_run").mkdir()
    assert_clean_error(cli(capsys, command, "--checkpoint", tmp_path / "empty_run", *extra),
                       "no complete checkpoint")


def test_resume_with_a_different_model(capsys, tmp_path, pipe):
    run = tmp_path / "run"
    shutil.copytree(pipe.run, run)
    assert_clean_error(cli(capsys, "pretrain", "--data-dir", pipe.data, "--out", run, *TINY, "--n-layer", 2,
                           "--max-steps", 9,
                           "--resume"), "different model config", "n_layer")


def test_resume_without_checkpoint(capsys, tmp_path, pipe):
    assert_clean_error(cli(capsys, "pretrain", "--data-dir", pipe.data, "--out", tmp_path / "fresh", *TINY,
                           "--max-steps", 2, "--resume"), "no checkpoint")


def test_prompt_longer_than_window(capsys, pipe):
    prompt = pipe.corpus.read_text()[:400]
    assert_clean_error(cli(capsys, "sample", "--checkpoint", pipe.run, "--prompt", prompt, "--max-new-tokens", 2),
                       "context window")


def test_score_text_longer_than_window(capsys, pipe):
    text = pipe.corpus.read_text()[:400]
    assert_clean_error(cli(capsys, "score", "--checkpoint", pipe.run, text), "context window")


def test_score_empty_text(capsys, pipe):
    assert_clean_error(cli(capsys, "score", "--checkpoint", pipe.run, ""), "empty")


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--checkpoint", "RUN", "--temperature", "-1"], "temperature"),
    (["sample", "--checkpoint", "RUN", "--top-p", "2"], "top-p"),
    (["sample", "--checkpoint", "RUN", "--top-p", "0"], "top-p"),
    (["sample", "--checkpoint", "RUN", "--top-k", "0"], "--top-k"),
    (["sample", "--checkpoint", "RUN", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["sample", "--checkpoint", "RUN", "--temperature", "warm"], "--temperature"),
    (["tokenizer", "train", "--vocab-size", "0", "--out", "t.json"], "--vocab-size"),
    (["tokenizer", "train", "--vocab-size", "100", "--data", "CORPUS", "--out", "OUT/t.json"], "at least 268"),
    (["data", "prepare", "--tokenizer", "TOK", "--out", "OUT/d", "--val-fraction", "1.5"], "--val-fraction"),
    (["pretrain", "--data-dir", "DATA", "--out", "OUT/r", "--batch-size", "0"], "--batch-size"),
    (["pretrain", "--data-dir", "DATA", "--out", "OUT/r", "--model", "huge"], "--model"),
    (["pretrain", "--data-dir", "DATA", "--out", "OUT/r", "--model", "tiny", "--n-embd", "30"], "divisible"),
    (["pretrain", "--data-dir", "DATA", "--out", "OUT/r", "--model", "tiny", "--set", "mlp=magic"], "mlp"),
    (["speedrun", "--out", "OUT/s", "--batch-size", "0"], "--batch-size"),
    (["speedrun", "--out", "OUT/s", "--val-fraction", "1.5"], "--val-fraction"),
])
def test_invalid_option_values(capsys, tmp_path, pipe, argv, needle):
    subst = {"RUN": pipe.run, "CORPUS": pipe.corpus, "TOK": pipe.tok, "DATA": pipe.data}
    argv = [str(subst.get(a, a)).replace("OUT", str(tmp_path)) for a in argv]
    assert_clean_error(cli(capsys, *argv), needle)


@pytest.mark.parametrize("ids, needle", [
    (["72", "300"], "out of range"),
    (["-1"], "out of range"),
    (["72", "x"], "integer"),
    (["1.5"], "integer"),
])
def test_decode_bad_ids(capsys, pipe, ids, needle):
    assert_clean_error(cli(capsys, "tokenizer", "decode", "--tokenizer", pipe.tok, *ids), needle)


# ----------------------------------------------------------------------------- known bugs


def test_temperature_nan(capsys, pipe):
    assert_clean_error(cli(capsys, "sample", "--checkpoint", pipe.run, "--temperature", "nan",
                           "--max-new-tokens", 2), "temperature")


def test_tiny_temperature(capsys, pipe):
    ok(cli(capsys, "sample", "--checkpoint", pipe.run, "--temperature", "1e-45", "--max-new-tokens", 2,
           "--seed", 0))


def test_corrupt_checkpoint_weights(capsys, tmp_path, pipe):
    run = tmp_path / "run"
    shutil.copytree(pipe.run, run)
    (run / "checkpoints" / "step_000006" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_clean_error(cli(capsys, "sample", "--checkpoint", run, "--max-new-tokens", 2), "model.safetensors")


def test_tokenizer_out_is_a_folder(capsys, tmp_path, pipe):
    assert_clean_error(cli(capsys, "tokenizer", "train", "--data", pipe.corpus, "--vocab-size", 280,
                           "--max-chars", 5000, "--out", tmp_path, "--no-progress"))


def test_export_hf_into_a_file(capsys, pipe):
    assert_clean_error(cli(capsys, "tokenizer", "export-hf", "--tokenizer", pipe.tok, pipe.corpus))


def test_incomplete_command_exits_2(capsys):
    code, out, _ = cli(capsys, "tokenizer")
    assert "train" in out and "export-hf" in out
    assert code == 2


def test_main_with_empty_argv_shows_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["host-program", "host-arg"])
    code, out, err = cli(capsys)
    assert "speedrun" in out and "host-arg" not in err


# ----------------------------------------------------------------------------- generate and chat


def test_generate_prints_only_the_completion(pipe, capsys):
    from lmforge.inference.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    out = ok(cli(capsys, "generate", "--checkpoint", pipe.run, "ROMEO:", "--max-new-tokens", 12,
                 "--temperature", 0))
    model, _ = load_model(pipe.run)
    tok = load_checkpoint_tokenizer(pipe.run)
    [want] = Engine(model, tok).generate([[tok.bos_id] + tok.encode("ROMEO:")], 12, temperature=0)
    assert out == want.text + "\n"  # no prompt echo, nothing else
    # the prompt can come from stdin, and a stop string cuts the output before it
    piped = ok(cli(capsys, "generate", "--checkpoint", pipe.run, "--max-new-tokens", 12, "--temperature", 0,
                   stdin="ROMEO:"))
    assert piped == out
    if len(want.text) > 3:
        stop = want.text[2:4]
        cut = ok(cli(capsys, "generate", "--checkpoint", pipe.run, "ROMEO:", "--max-new-tokens", 12,
                     "--temperature", 0, "--stop", stop))
        assert cut == want.text[: want.text.index(stop)] + "\n"


def test_generate_in_bf16_on_one_thread(pipe, capsys):
    """--dtype bf16 casts the weights once at load (the same text as the bf16 engine); --threads sets
    torch's thread pool for the process."""
    import torch

    from lmforge.inference.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    threads = torch.get_num_threads()
    try:
        out = ok(cli(capsys, "generate", "--checkpoint", pipe.run, "ROMEO:", "--max-new-tokens", 12,
                     "--temperature", 0, "--dtype", "bf16", "--threads", 1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    model, _ = load_model(pipe.run)
    tok = load_checkpoint_tokenizer(pipe.run)
    [want] = Engine(model, tok, dtype="bf16").generate([[tok.bos_id] + tok.encode("ROMEO:")], 12, temperature=0)
    assert out == want.text + "\n"


def test_chat_session_from_stdin(pipe, capsys):
    from lmforge.chat import render_messages
    from lmforge.inference.engine import Engine
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    script = "hello there\n/temperature 0\n/temperature -3\n/bogus\nhow are you\n/reset\n/quit\nnever read\n"
    code, out, err = cli(capsys, "chat", "--checkpoint", pipe.run, "--temperature", 0, "--max-new-tokens", 8,
                         "--system", "Be brief.", stdin=script)
    assert code == 0, err
    assert "(temperature 0.0)" in err and "error:" in err and "unknown command /bogus" in err
    assert "(new conversation)" in err
    replies = out.splitlines()
    assert len(replies) == 2  # two user turns, two streamed replies; nothing after /quit
    # the first reply is exactly what the engine gives for the rendered conversation
    model, _ = load_model(pipe.run)
    tok = load_checkpoint_tokenizer(pipe.run)
    ids = render_messages(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}])
    [first] = Engine(model, tok).generate([ids], 8, temperature=0)
    assert replies[0] == first.text


def test_chat_history_is_trimmed_to_the_window(pipe):
    from lmforge.chat import render_messages
    from lmforge.cli.generate import fit_history
    from lmforge.train.checkpoint import load_checkpoint_tokenizer

    tok = load_checkpoint_tokenizer(pipe.run)
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last"})
    budget = len(render_messages(tok, msgs)) // 2
    kept = fit_history(tok, msgs, budget)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]  # system prompt and newest message survive
    assert len(render_messages(tok, kept)) <= budget < len(render_messages(tok, msgs))
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1:]  # the oldest turns were the ones dropped


def test_export_and_import_hf_round_trip(pipe, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.train.checkpoint import load_model

    out = ok(cli(capsys, "export", "--format", "hf", "--checkpoint", pipe.run, tmp_path / "hf"))
    assert "LlamaForCausalLM" in out  # the tiny preset: RoPE, RMSNorm, SwiGLU, GQA, no QK-norm
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_model(pipe.run)
    x = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
    ok(cli(capsys, "import", tmp_path / "hf", "--out", tmp_path / "back"))
    back, _ = load_model(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=1e-5, rtol=0)
    assert_clean_error(cli(capsys, "import", tmp_path / "missing", "--out", tmp_path / "x"), "not found")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_command(pipe, capsys, tmp_path, bits):

    from lmforge.train.checkpoint import load_model

    out = ok(cli(capsys, "quantize", "--checkpoint", pipe.run, "--out", tmp_path / "q", "--bits", bits))
    assert f"int{bits} checkpoint" in out
    q, state = load_model(tmp_path / "q")  # the plain loader rebuilds quantized layers
    assert state["quantization"]["bits"] == bits
    ref, _ = load_model(pipe.run)
    x = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = ref(x), q(x)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95
    # generation runs on the quantized checkpoint, and HF export refuses it with a clear line
    ok(cli(capsys, "generate", "--checkpoint", tmp_path / "q", "ROMEO:", "--max-new-tokens", 4))
    assert_clean_error(cli(capsys, "export", "--checkpoint", tmp_path / "q", tmp_path / "hf"), "quantized")
