"""The n-gram and LSTM families through the same commands as the transformer: pretrain, eval
(--data-dir and --text), sample, generate, score, chat and the server's API."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli

# The LSTM trains on 64-token windows, not the 256 a model without a context window defaults to:
# `eval --data-dir` must use the windows the checkpoint was trained and validated on.
FAMILIES = {"ngram": ["--model", "kn3"], "lstm": ["--model", "tiny", "--max-steps", "30", "--batch-size", "8",
                                                   "--seq-len", "64", "--compile", "off"]}


def ok(result):
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tiny_data, tmp_path_factory):
    family = request.param
    run = tmp_path_factory.mktemp(f"run_{family}")
    out = ok(run_cli("pretrain", "--arch", family, "--data-dir", tiny_data, "--out", run, "--eval-tokens", "4096",
                     "--no-progress", *FAMILIES[family]))
    summary = json.loads(out[out.index("{"):])
    return family, run, summary


def test_pretrain_reports_val_bits_per_byte_below_uniform(trained):
    family, run, summary = trained
    assert 0 < summary["val_bpb"] < 8.0, summary  # 8 bits per byte = a uniform guess over bytes
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["model_family"] == family


def test_eval_data_dir_and_text(trained, tiny_data, tmp_path, corpus_text):
    """`lmforge eval --data-dir` is pretraining's own validation (same windows, same numbers); `--text`
    runs through the same harness path as for a transformer."""
    family, run, summary = trained
    text = tmp_path / "held_out.txt"
    text.write_text(corpus_text[150_000:156_000])
    out_json = tmp_path / "r.json"
    ok(run_cli("eval", "--checkpoint", run, "--text", text, "--data-dir", tiny_data, "--max-tokens", "4096",
               "--batch-size", "8", "--out", out_json, "--no-progress"))
    tasks = json.loads(out_json.read_text())["tasks"]
    shards = next(v["metrics"] for k, v in tasks.items() if k.startswith("shards:"))
    assert shards["bits_per_byte"] == pytest.approx(summary["val_bpb"], rel=1e-4)
    on_text = next(v["metrics"] for k, v in tasks.items() if k.startswith("text:"))
    assert 0 < on_text["bits_per_byte"] < 8 and on_text["bytes"] == 6000


def test_sample_generate_and_score(trained):
    family, run, _ = trained
    a = ok(run_cli("sample", "--checkpoint", run, "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"))
    b = ok(run_cli("sample", "--checkpoint", run, "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"))
    assert a == b and a.startswith("def ") and len(a) > len("def \n")
    g1 = ok(run_cli("generate", "--checkpoint", run, "import", "--max-new-tokens", "10", "--temperature", "0"))
    g2 = ok(run_cli("generate", "--checkpoint", run, "import", "--max-new-tokens", "10", "--temperature", "0"))
    assert g1 == g2
    # Noisy-channel use: the real snippet is more probable than its scrambled letters.
    real, scrambled = "import os\n", "tmiorp so\n"
    data = json.loads(ok(run_cli("score", "--checkpoint", run, "--json", real, scrambled)))
    assert data[0]["text"] == real and data[0]["logprob"] > data[1]["logprob"]


def test_chat_session(trained, monkeypatch):
    import io

    family, run, _ = trained
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhow are you\n/quit\n"))
    out = ok(run_cli("chat", "--checkpoint", run, "--max-new-tokens", "8", "--temperature", "0"))
    assert len(out.splitlines()) == 2  # one reply line per user turn


def test_served_through_the_openai_api(trained):
    from fastapi.testclient import TestClient

    from lmforge.inference.engine import Engine
    from lmforge.serve.app import ServeConfig, create_app
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    family, run, _ = trained
    model, _ = load_model(run)
    tok = load_checkpoint_tokenizer(run)
    app = create_app(model, tok, ServeConfig(api_key="k"))
    with TestClient(app) as client:
        r = client.get("/v1/models", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        name = r.json()["data"][0]["id"]
        r = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                        json={"model": name, "prompt": "def ", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] <= 12
        [ref] = Engine(model, tok).generate([[tok.bos_id] + tok.encode("def ")], 12, temperature=0)
        assert body["choices"][0]["text"] == ref.text


def test_export_arpa_through_the_cli(trained, tmp_path):
    """`lmforge export --format arpa` writes a file whose header counts every order; kenlm (when
    installed) reads it back. Other families refuse ARPA; n-grams refuse the HF format."""
    family, run, _ = trained
    if family != "ngram":
        code, _, err = run_cli("export", "--format", "arpa", "--checkpoint", run, tmp_path / "m.arpa")
        assert code == 2 and "exports n-gram models" in err
        return
    out = ok(run_cli("export", "--format", "arpa", "--checkpoint", run, tmp_path / "m.arpa"))
    assert "wrote" in out
    head = (tmp_path / "m.arpa").read_text().strip().split("\n\n")[0]
    assert head.startswith("\\data\\") and all(f"ngram {k}=" in head for k in (1, 2, 3))
    code, _, err = run_cli("export", "--checkpoint", run, tmp_path / "hf")
    assert code == 2 and "use --format arpa" in err
