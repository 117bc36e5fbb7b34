"""The curation run end to end on small inputs written here: counts that add up, duplicates removed
across files, the output `data prepare` reads, shards and resume, and one-line errors for bad input."""
import gzip
import json
import os
import random
import subprocess
import sys

import pytest

from lmforge.common import LmforgeError
from lmforge.curate.config import CurateConfig, config_toml, load_config
from lmforge.curate.pipeline import curate, parse_shard

WORDS = ("river valley farm town bank forest wheat mill trade family land school bridge church road market "
         "winter summer harvest village story letter teacher doctor garden house window water stone field "
         "horse cattle morning evening company railway station bakery council harbour boat fisherman "
         "weather storm season record museum library painting music song festival neighbour "
         "old new small large quiet busy early late long short bright dark warm cold").split()
GLUE = "the a of and to in that with was were had for on by from as it they their this which".split()


def article(topic: str, n: int = 4) -> str:
    """A distinct English article of about 70*n words, seeded by its topic: no two articles share
    many word 5-grams, and no article repeats itself."""
    rng = random.Random(topic)
    paras = []
    for i in range(n):
        sentences = []
        for _ in range(5):
            words = [rng.choice(WORDS) if j % 2 == 0 else rng.choice(GLUE) for j in range(rng.randint(10, 18))]
            sentences.append(" ".join(words).capitalize() + ".")
        paras.append(f"Part {i} of the {topic} story. " + " ".join(sentences))
    return "\n\n".join(paras)


GERMAN = ("Die Geschichte des Flusstals wird durch die Höfe und Städte erzählt, die an seinen Ufern wuchsen. "
          "Frühe Siedler rodeten die Wälder und pflanzten Weizen, und am Ende des Jahrhunderts waren die Mühlen, "
          "die sie gebaut hatten, zum Mittelpunkt eines kleinen, aber regen Handels geworden. ") * 4

NAV = "\n".join(["Home", "About", "Contact", "Login", "Menu", "Search", "Cart"] * 5)


def html_page(body: str) -> str:
    paras = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
    return (f"<html><head><title>t</title></head><body><nav><ul><li><a href='/'>Home</a></li>"
            f"<li><a href='/a'>About us</a></li></ul></nav><article><h1>Title</h1>{paras}</article>"
            f"<footer>Copyright 2024 Example Inc. All rights reserved. Privacy policy.</footer></body></html>")


def write_inputs(root):
    """Three input files: HTML pages, a jsonl of texts (one an exact duplicate of a page's article in
    another file, one German, one navigation junk) and a gzipped jsonl with a near-duplicate."""
    root.mkdir()
    (root / "a.html").write_text(html_page(article("Ashford")))
    (root / "b.html").write_text(html_page(article("Bramley")))
    docs = [
        {"id": "dup-of-ashford", "text": article("Ashford")},
        {"id": "german", "text": GERMAN},
        {"id": "nav", "text": NAV},
        {"id": "clean-1", "text": article("Coleford")},
        {"id": "contact", "text": article("Dunmore") + "\n\nWrite to jane.doe@example.com or 8.8.4.4 for details."},
    ]
    (root / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    near = article("Coleford").replace("wheat", "barley", 1)
    with gzip.open(root / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "near-coleford", "text": near}) + "\n")
        f.write(json.dumps({"id": "clean-2", "text": article("Eastwick")}) + "\n")
    return root


def curated_docs(out):
    docs = []
    for part in sorted((out / "curated").glob("part-*.jsonl")):
        docs += [json.loads(line) for line in part.read_text().split("\n") if line.strip()]
    return docs


@pytest.fixture
def inputs(tmp_path):
    return write_inputs(tmp_path / "raw")


def test_curate_end_to_end(inputs, tmp_path):
    out = tmp_path / "out"
    s = curate([inputs], out, workers=1, show_progress=False)
    assert s.finished
    docs = curated_docs(out)
    ids = {d["id"] for d in docs}
    # kept: the two pages, the clean texts, the contact text; one of each duplicate cluster
    assert {"clean-1", "clean-2", "contact"} <= ids
    assert "german" not in ids and "nav" not in ids
    assert len(ids & {"clean-1", "near-coleford"}) == 1
    contact = next(d for d in docs if d["id"] == "contact")
    assert "jane.doe@example.com" not in contact["text"] and "8.8.4.4" not in contact["text"]
    assert all(d["meta"].get("language") == "en" for d in docs)
    # every step receives exactly what the step before it passed on
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    order = ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii", "dedup"]
    for a, b in zip(order, order[1:]):
        assert steps[a]["docs_out"] == steps[b]["docs_in"], (a, b)
    for name in order:
        c = steps[name]
        assert c["docs_in"] - c["docs_out"] == sum(c["reasons"].values()), name
    assert steps["language"]["reasons"]  # the German text
    assert steps["dedup"]["docs_in"] - steps["dedup"]["docs_out"] == 2
    assert summary["docs_out"] == len(docs)
    # every document removed across files is listed with the copy that was kept in its place
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().split("\n") if line]
    by_id = {r["id"]: r for r in removed}
    assert sorted(by_id) == ["dup-of-ashford", "near-coleford"]  # the files come in order: a.html is kept
    assert by_id["dup-of-ashford"]["kept"].endswith("a.html#0") and by_id["dup-of-ashford"]["jaccard"] == 1
    assert by_id["near-coleford"]["reason"] == "near_duplicate" and by_id["near-coleford"]["kept"].endswith("c.jsonl#3")
    assert 0.3 <= by_id["near-coleford"]["jaccard"] < 1
    report = (out / "report.md").read_text()
    for needed in ("## Step by step", "funnel.png", "## Duplicates", "## Examples of removed documents",
                   "Die Geschichte des Flusstals"):
        assert needed in report, needed
    assert (out / "funnel.png").stat().st_size > 1000


def test_output_is_what_data_prepare_reads(inputs, tmp_path):
    from lmforge.data.sources import iter_documents

    out = tmp_path / "out"
    curate([inputs], out, workers=1, show_progress=False, plots=False)
    texts = list(iter_documents(str(out / "curated")))
    assert sorted(texts) == sorted(d["text"] for d in curated_docs(out))


@pytest.mark.slow  # spawns two workers that import the extractors: ~10 s
def test_two_workers_give_the_same_output(inputs, tmp_path):
    curate([inputs], tmp_path / "one", workers=1, show_progress=False, plots=False)
    curate([inputs], tmp_path / "two", workers=2, show_progress=False, plots=False)
    assert curated_docs(tmp_path / "one") == curated_docs(tmp_path / "two")


def test_shards_then_finish_equals_one_run(inputs, tmp_path):
    curate([inputs], tmp_path / "whole", workers=1, show_progress=False, plots=False)
    out = tmp_path / "sharded"
    s0 = curate([inputs], out, workers=1, shard=(0, 2), show_progress=False, plots=False)
    assert not s0.finished and s0.tasks_done == 2 and not (out / "curated").exists()
    s1 = curate([inputs], out, workers=1, shard=(1, 2), show_progress=False, plots=False)
    assert not s1.finished and s1.tasks_done == 4
    s = curate([inputs], out, workers=1, show_progress=False)
    assert s.finished
    assert curated_docs(out) == curated_docs(tmp_path / "whole")


def test_interrupted_run_resumes_without_redoing_finished_files(inputs, tmp_path, monkeypatch):
    import lmforge.curate.pipeline as pipeline

    real = pipeline.run_task
    calls = []

    def crash_on_third(index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_task", crash_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        curate([inputs], out, workers=1, show_progress=False, plots=False)
    finished = sorted(p.parent.name for p in (out / "tasks").glob("*/stats.json"))
    assert len(finished) == 2
    calls.clear()
    monkeypatch.setattr(pipeline, "run_task", lambda index, *a, **k: calls.append(index) or real(index, *a, **k))
    assert curate([inputs], out, workers=1, show_progress=False, plots=False).finished
    assert sorted(calls) == [2, 3]  # only the two unfinished files ran again
    curate([inputs], tmp_path / "whole", workers=1, show_progress=False, plots=False)
    assert curated_docs(out) == curated_docs(tmp_path / "whole")


def test_other_inputs_or_settings_in_the_same_folder_are_refused(inputs, tmp_path):
    out = tmp_path / "out"
    curate([inputs / "c.jsonl"], out, workers=1, show_progress=False, plots=False)
    with pytest.raises(LmforgeError, match="other inputs"):
        curate([inputs], out, workers=1, show_progress=False, plots=False)
    cfg = CurateConfig()
    cfg.gopher_quality.enabled = False
    with pytest.raises(LmforgeError, match="other settings"):
        curate([inputs / "c.jsonl"], out, cfg, workers=1, show_progress=False, plots=False)


def test_steps_switch_off(inputs, tmp_path):
    cfg = CurateConfig()
    for name in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii", "dedup"):
        getattr(cfg, name).enabled = False
    out = tmp_path / "raw"
    curate([inputs], out, cfg, workers=1, show_progress=False, plots=False)
    ids = {d["id"] for d in curated_docs(out)}
    assert {"german", "nav", "dup-of-ashford", "near-coleford"} <= ids
    contact = next(d for d in curated_docs(out) if d["id"] == "contact")
    assert "jane.doe@example.com" in contact["text"]


def test_config_toml_round_trip_and_errors(tmp_path):
    cfg = CurateConfig()
    cfg.gopher_quality.enabled = False
    cfg.language.languages = ("en", "de")
    path = tmp_path / "c.toml"
    path.write_text(config_toml(cfg))
    assert load_config(path) == cfg
    for text, needle in [
        ("[gopher_qualty]\nenabled = false\n", "unknown step [gopher_qualty]"),
        ("[gopher_quality]\nmin_wrds = 3\n", "unknown key 'min_wrds'"),
        ("[dedup]\nenabled = 'no'\n", "wrong type"),
        ("[dedup\n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(LmforgeError, match=needle.replace("[", r"\[")):
            load_config(path)
    with pytest.raises(LmforgeError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_shard_spec():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "a/b", "1", "-1/2"):
        with pytest.raises(LmforgeError):
            parse_shard(bad)


def test_cli_one_line_errors_and_print_config(inputs, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "lmforge", "data", "curate", *args], capture_output=True,
                              text=True, env=env)

    r = run("--print-config")
    assert r.returncode == 0 and "[gopher_quality]" in r.stdout
    (tmp_path / "c.toml").write_text(r.stdout)
    assert load_config(tmp_path / "c.toml") == CurateConfig()
    (tmp_path / "bad.toml").write_text("[fineweb]\nline_punct = 0.5\n")
    for args in (["--config", str(tmp_path / "bad.toml"), str(inputs), "--out", str(tmp_path / "o")],
                 [str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                 [str(inputs), "--out", str(tmp_path / "o"), "--shard", "3/2"]):
        r = run(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
    r = run(str(inputs), "--out", str(tmp_path / "ok"), "--no-progress", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "curated:" in r.stdout and (tmp_path / "ok" / "report.md").is_file()


@pytest.mark.slow  # trains a tokenizer in a subprocess: ~15 s
def test_speedrun_curates_raw_web_data_first(inputs, tmp_path):
    from lmforge.curate.extract import is_raw_web

    assert is_raw_web(str(inputs)) and not is_raw_web(str(inputs / "c.jsonl")) and not is_raw_web(None)
    assert not is_raw_web("HuggingFaceFW/fineweb-edu:sample-10BT")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lmforge", "speedrun", "--data", str(inputs), "--out", str(out),
                        "--stop-after", "tokenizer", "--vocab-size", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "curate:" in r.stdout and (out / "curate" / "report.md").is_file()
    assert (out / "tokenizer.json").is_file()
    kept = {d["id"] for d in curated_docs(out / "curate")}
    assert "german" not in kept and "clean-1" in kept


def test_quality_model_is_cross_fitted_and_keeps_the_better_half(inputs, tmp_path):
    from lmforge.curate.pipeline import _fold
    from lmforge.curate.quality import QualityClassifier

    ref = tmp_path / "reference.txt"
    ref.write_text("\n\n\n".join(article(f"Reference {i}", n=3) for i in range(30)))
    cfg = CurateConfig()
    cfg.quality_model.enabled = True
    cfg.quality_model.reference = (str(ref),)
    out = tmp_path / "out"
    curate([inputs], out, cfg, workers=1, show_progress=False, plots=False)
    summary = json.loads((out / "summary.json").read_text())
    q = summary["steps"]["quality_model"]
    assert q["docs_in"] == summary["steps"]["dedup"]["docs_out"]
    assert q["docs_out"] == int(q["docs_in"] * 0.5 + 0.5)  # keep_fraction 0.5 by default
    docs = curated_docs(out)
    assert len(docs) == q["docs_out"]
    models = [QualityClassifier.load(out / "quality_model" / f"fold{f}") for f in (0, 1)]
    # every kept document was scored by the model that did not see it in training
    keys = {}
    for line in (out / "tasks").glob("*/docs.jsonl"):
        for rec in map(json.loads, line.read_text().split("\n")[:-1]):
            keys[rec["id"], rec["source"]] = rec["key"]
    for d in docs:
        other = models[1 - _fold(keys[d["id"], d["source"]])]
        assert d["meta"]["quality_score"] == pytest.approx(float(other.score([d["text"]])[0]), abs=1e-4)
    assert "## Quality model" in (out / "report.md").read_text()


def test_bad_files_are_counted_and_skipped_not_fatal(inputs, tmp_path):
    (inputs / "junk.html").write_bytes(bytes(range(256)) * 40)  # binary named .html
    line = json.dumps({"id": "bad-utf8", "text": "café " + article("Fenwick")}, ensure_ascii=False).encode()
    line = line.replace("é".encode(), b"\xe9")  # a Latin-1 byte inside UTF-8 text
    (inputs / "e.jsonl").write_bytes(line + b'\nnot json at all\n{"id": "empty", "text": ""}\n')
    whole = gzip.compress(json.dumps({"id": "cut", "text": article("Gorton")}).encode() * 50)
    (inputs / "f.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated gzip
    out = tmp_path / "out"
    s = curate([inputs], out, workers=1, show_progress=False, plots=False)
    assert s.finished
    ids = {d["id"] for d in curated_docs(out)}
    assert {"clean-1", "clean-2", "bad-utf8"} <= ids and "empty" not in ids
    extract = json.loads((out / "summary.json").read_text())["extract"]
    assert extract["skipped_binary"] + extract["file_errors"] >= 1 and extract["bad_records"] >= 1
    assert extract["file_errors"] >= 1  # the truncated gzip


def test_a_long_file_reports_progress_while_it_runs(tmp_path):
    from lmforge.curate.pipeline import PROGRESS_EVERY, run_task

    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"document number {i} of the progress test"}) + "\n"
                            for i in range(2 * PROGRESS_EVERY + 50)))
    seen = []
    run_task(0, str(path), CurateConfig().to_dict(), str(tmp_path / "out"), progress=seen.append)
    assert seen == [0, PROGRESS_EVERY, 2 * PROGRESS_EVERY]
