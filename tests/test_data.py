"""Tests for lmforge.data: document sources, shard preparation and the batch loaders."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.common import LmforgeError
from lmforge.data import (
    BatchLoader,
    SourceStats,
    TokenSplit,
    eval_batches,
    iter_documents,
    iter_hf_dataset,
    load_manifest,
    parse_hf_spec,
    prepare_shards,
    split_documents,
    stdlib_files,
)
from lmforge.data import prepare as prepare_mod
from lmforge.data import sources as sources_mod
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, tok) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def docs_of(spec, **kw) -> list[str]:
    return list(iter_documents(str(spec), **kw))


def write_jsonl(path: Path, records, gz=False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, texts, column="text", row_group_size=2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


def stream_of(data_dir: Path, split: str, dtype=np.uint16) -> np.ndarray:
    """The whole token stream of a split, read directly from the shard files."""
    m = load_manifest(data_dir)
    parts = [np.fromfile(data_dir / s["file"], dtype=dtype) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def docs_in_stream(stream: np.ndarray, tok: Tokenizer) -> list[str]:
    """Split a `[bos] + tokens` stream back into document texts (byte tokenizer: exact)."""
    assert len(stream) == 0 or stream[0] == tok.bos_id
    starts = np.flatnonzero(stream == tok.bos_id).tolist() + [len(stream)]
    return [tok.decode(stream[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


def blake(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


# ------------------------------------------------------------------------------------ sources


def test_txt_documents_split_at_two_blank_lines(tmp_path):
    p = tmp_path / "books.txt"
    p.write_text("book one\nline\n\none blank line inside\n\n\nbook two\n \t\n\n\n\nbook three\n")
    assert docs_of(p) == ["book one\nline\n\none blank line inside", "book two", "book three\n"]
    single = tmp_path / "single.txt"
    single.write_text("para 1\n\npara 2\n")
    assert docs_of(single) == ["para 1\n\npara 2\n"]  # no separator: the file unchanged


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", " ", "\t", "\n", "\n\n", "\n \n"]), max_size=40).map("".join))
def test_chunked_txt_reader_equals_regex_split(text):
    # Tiny chunks put chunk borders everywhere, including inside separators.
    import tempfile

    old = sources_mod._TXT_CHUNK_CHARS
    sources_mod._TXT_CHUNK_CHARS = 3
    try:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "x.txt"
            p.write_text(text, newline="")
            assert list(sources_mod.iter_file(p)) == re.split(r"\n\s*\n\s*\n", text)
    finally:
        sources_mod._TXT_CHUNK_CHARS = old


def test_jsonl_gz_json_parquet(tmp_path):
    recs = [{"text": "alpha"}, {"text": "béta ✓"}, {"text": ""}, {"text": "gamma"}]
    assert docs_of(write_jsonl(tmp_path / "a.jsonl", recs)) == ["alpha", "béta ✓", "gamma"]
    assert docs_of(write_jsonl(tmp_path / "a.jsonl.gz", recs, gz=True)) == ["alpha", "béta ✓", "gamma"]
    (tmp_path / "objs.json").write_text(json.dumps(recs))
    assert docs_of(tmp_path / "objs.json") == ["alpha", "béta ✓", "gamma"]
    (tmp_path / "strs.json").write_text(json.dumps(["x", "y"]))
    assert docs_of(tmp_path / "strs.json") == ["x", "y"]
    texts = [f"row {i}" for i in range(7)]  # 4 row groups of 2
    assert docs_of(write_parquet(tmp_path / "t.parquet", texts)) == texts
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "with bom"}\n')
    assert docs_of(tmp_path / "bom.jsonl") == ["with bom"]
    # a different text field
    write_jsonl(tmp_path / "c.jsonl", [{"content": "c1"}, {"content": "c2"}])
    assert docs_of(tmp_path / "c.jsonl", text_field="content") == ["c1", "c2"]
    write_parquet(tmp_path / "c.parquet", ["p1"], column="body")
    assert docs_of(tmp_path / "c.parquet", text_field="body") == ["p1"]


def test_folder_and_glob(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("A")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "C1"}, {"text": "C2"}])
    write_parquet(tmp_path / "b" / "deep" / "d.parquet", ["D"])
    (tmp_path / "b" / "notes.md").write_text("ignored")
    (tmp_path / ".hidden" / "e.txt").write_text("ignored")
    assert docs_of(tmp_path) == ["A", "C1", "C2", "D"]  # sorted by relative path
    assert docs_of(tmp_path / "b" / "*.jsonl") == ["C1", "C2"]
    assert docs_of(f"{tmp_path}/**/*.parquet") == ["D"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:3 is not valid JSON"):
        docs_of(p)
    p.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: no 'text' field"):
        docs_of(p)
    p.write_text('{"text": 5}\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:1: field .text. is a int"):
        docs_of(p)


def test_bad_sources_raise(tmp_path):
    with pytest.raises(LmforgeError, match="no such file"):
        iter_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(LmforgeError, match="matches no supported files"):
        iter_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "only.md").write_text("x")
    with pytest.raises(LmforgeError, match="no supported files"):
        iter_documents(str(tmp_path))
    with pytest.raises(LmforgeError, match="unsupported file type"):
        iter_documents(str(tmp_path / "only.md"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n\n\n \n")
    with pytest.raises(LmforgeError, match="no non-empty documents"):
        docs_of(empty)
    write_parquet(tmp_path / "p.parquet", ["x"])
    with pytest.raises(LmforgeError, match="no column 'content'"):
        docs_of(tmp_path / "p.parquet", text_field="content")


def test_limits_and_stats(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in ["aaaa", " ", "bbbb", "cccc"]])
    stats = SourceStats()
    assert list(iter_documents(str(p), max_docs=2, stats=stats)) == ["aaaa", "bbbb"]
    assert (stats.documents, stats.chars, stats.empty_skipped) == (2, 8, 1)
    assert docs_of(p, max_chars=6) == ["aaaa", "bb"]
    with pytest.raises(LmforgeError):
        iter_documents(str(p), max_docs=0)


def test_stdlib_default_corpus():
    files = stdlib_files()
    assert len(files) > 100
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for f in files for part in f.parts)
    assert files == sorted(files, key=lambda f: f.as_posix())
    docs = list(iter_documents(None))
    assert len(docs) > 100 and len(docs) <= len(files)
    assert sum("def " in d for d in docs) > 100
    assert docs[:3] == list(iter_documents("stdlib", max_docs=3))


def test_hf_builders_on_local_files(tmp_path):
    p = write_jsonl(tmp_path / "hf.jsonl", [{"text": "one"}, {"text": "two"}, {"body": "x", "text": "three"}])
    assert list(iter_hf_dataset("json", data_files=str(p))) == ["one", "two", "three"]
    q = write_parquet(tmp_path / "hf.parquet", ["p", "q"])
    assert list(iter_hf_dataset("parquet", data_files=str(q))) == ["p", "q"]
    with pytest.raises(LmforgeError, match="no column 'content'"):
        iter_hf_dataset("parquet", data_files=str(q), text_field="content")


def test_hf_dataset_names(monkeypatch):
    assert parse_hf_spec("roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert parse_hf_spec("wikitext:wikitext-2-raw-v1@validation") == ("wikitext", "wikitext-2-raw-v1", "validation")
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'owner/nope' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LmforgeError, match="not a local file and could not load Hugging Face dataset owner/nope"):
        iter_documents("owner/nope:cfg@test")
    assert calls[0][0][:2] == ("owner/nope", "cfg")
    assert calls[0][1]["split"] == "test" and calls[0][1]["streaming"] is True
    # Path-like strings are never sent to the hub.
    with pytest.raises(LmforgeError, match="no such file"):
        iter_documents("data/train/part.jsonl")
    assert len(calls) == 1


# ------------------------------------------------------------------------------------ prepare


def make_corpus(tmp_path: Path, n: int, seed: int = 0) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "über", "naïve", "日本", "sat", "on", "mat", "\n"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) + f" #{i}" for i in range(n)]
    return write_jsonl(tmp_path / f"corpus{n}.jsonl", [{"text": d} for d in docs]), docs


def test_prepare_manifest_and_shards(tmp_path, tok, tok_path):
    src, docs = make_corpus(tmp_path, 40)
    out = tmp_path / "out"
    m = prepare_shards(str(src), tok_path, out, val_fraction=0.1, workers=1, shard_tokens=500, show_progress=False)
    assert m == load_manifest(out)
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size and m["bos_id"] == tok.bos_id
    assert m["tokenizer_fingerprint"] == tok.fingerprint
    assert m["split_rule"] == "smallest-hash"
    val_docs = set(sorted(docs, key=blake)[:4])  # exactly round(40 * 0.1) smallest hashes
    expected = {"train": [d for d in docs if d not in val_docs], "val": [d for d in docs if d in val_docs]}
    for split, split_docs in expected.items():
        info = m["splits"][split]
        assert info["documents"] == len(split_docs)
        assert info["tokens"] == sum(len(tok.encode(d)) + 1 for d in split_docs)
        assert info["bytes"] == sum(len(d.encode()) for d in split_docs)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for s in info["shards"]:
            assert s["tokens"] <= 500
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
        assert docs_in_stream(stream_of(out, split), tok) == split_docs  # order kept
    assert len(m["splits"]["train"]["shards"]) > 2  # documents flow across shard borders
    assert [s["file"] for s in m["splits"]["train"]["shards"]][:2] == ["train_000.bin", "train_001.bin"]


def test_shard_dtype_choice():
    assert prepare_mod.shard_dtype(268) == np.dtype("<u2")
    assert prepare_mod.shard_dtype(65536) == np.dtype("<u2")
    assert prepare_mod.shard_dtype(65537) == np.dtype("<u4")


def test_prepare_deterministic_across_runs_and_workers(tmp_path, tok_path):
    src, _ = make_corpus(tmp_path, 1200)  # > 1000 docs: streaming hash rule, several batches
    outs = []
    for i, workers in enumerate([1, 2, 2]):
        out = tmp_path / f"out{i}"
        m = prepare_shards(str(src), tok_path, out, val_fraction=0.05, workers=workers, shard_tokens=20_000,
                           show_progress=False)
        outs.append(out)
    assert m["split_rule"] == "hash-threshold"
    files = sorted(p.name for p in outs[0].iterdir())
    assert len([f for f in files if f.startswith("train_")]) > 2
    for other in outs[1:]:
        assert sorted(p.name for p in other.iterdir()) == files
        for name in files:
            assert (other / name).read_bytes() == (outs[0] / name).read_bytes(), name


def test_streaming_hash_rule_picks_documents_by_hash(tmp_path, tok, tok_path):
    src, docs = make_corpus(tmp_path, 1100, seed=1)
    m = prepare_shards(str(src), tok_path, tmp_path / "o", val_fraction=0.1, workers=1, show_progress=False)
    want_val = [d for d in docs if blake(d) < 0.1]
    assert docs_in_stream(stream_of(tmp_path / "o", "val"), tok) == want_val
    assert m["splits"]["val"]["documents"] == len(want_val) and 60 < len(want_val) < 160


def test_single_document_char_split(tmp_path, tok, tok_path):
    text = "".join(f"line {i}: ünïcode ✓\n" for i in range(300))  # one document, no separators
    src = tmp_path / "one.txt"
    src.write_text(text)
    m = prepare_shards(str(src), tok_path, tmp_path / "o", val_fraction=0.1, workers=1, show_progress=False)
    assert m["split_rule"] == "chars"
    cut = int(len(text) * 0.9)
    assert docs_in_stream(stream_of(tmp_path / "o", "train"), tok) == [text[:cut]]
    assert docs_in_stream(stream_of(tmp_path / "o", "val"), tok) == [text[cut:]]


def test_three_documents_split_by_chars_at_the_last_tenth(tmp_path, tok, tok_path):
    """The layout of tinyshakespeare (three documents between "two blank lines" separators) in a file
    written here: too few documents to split whole ones at 10%, so the last tenth of the characters
    is val, as nanoGPT's first 90% / last 10%."""
    docs = ["\n".join(f"act {d} line {i}: ünïcode ✓" for i in range(n)) for d, n in enumerate([40, 300, 500])]
    text = "\n\n\n".join(docs) + "\n"
    src = tmp_path / "three.txt"
    src.write_text(text)
    m = prepare_shards(str(src), tok_path, tmp_path / "o", val_fraction=0.1, workers=2, show_progress=False)
    assert m["split_rule"] == "chars"
    (val_text,) = docs_in_stream(stream_of(tmp_path / "o", "val"), tok)
    assert text.endswith(val_text) and docs[2].endswith(val_text.rstrip("\n"))
    assert abs(len(val_text) - (len(text) - int(len(text) * 0.9))) <= 6  # minus the separators
    train = docs_in_stream(stream_of(tmp_path / "o", "train"), tok)
    assert train[:2] == docs[:2] and train[2] + val_text == docs[2] + "\n"


def test_tinyshakespeare_val_is_last_tenth(tmp_path, tok, tok_path):
    """nanoGPT's split of its classic corpus, on the real file (its exact layout matters here)."""
    path = shared_file("tinyshakespeare/input.txt")
    text = path.read_text()
    out = tmp_path / "shakespeare"
    m = prepare_shards(str(path), tok_path, out, val_fraction=0.1, workers=2, show_progress=False)
    # The file holds two "two blank lines" separators (3 documents): too few to split whole
    # documents at 10%, so the split is by characters, as nanoGPT's first 90% / last 10%.
    assert m["split_rule"] == "chars"
    (val_text,) = docs_in_stream(stream_of(out, "val"), tok)
    assert text.endswith(val_text)
    assert abs(len(val_text) - (len(text) - int(len(text) * 0.9))) <= 6  # minus the separators
    train = TokenSplit(out, "train", tokenizer=tok)
    val = TokenSplit(out, "val", tokenizer=tok)
    assert train.num_tokens + val.num_tokens == len(text.encode()) - 6 + 4  # 3 docs + val part, each with bos


def test_few_documents_split_by_chars_else_by_count():
    docs = ["a" * 100, "b" * 100, "c" * 100]
    rule, pairs = split_documents(iter(docs), 0.1)
    pairs = list(pairs)
    assert rule == "chars"
    assert pairs == [("train", "a" * 100), ("train", "b" * 100), ("train", "c" * 70), ("val", "c" * 30)]
    rule, pairs = split_documents(iter(docs), 0.0)
    assert rule == "none" and [s for s, _ in pairs] == ["train"] * 3
    many = [f"doc {i}" for i in range(25)]
    rule, pairs = split_documents(iter(many), 0.2)
    pairs = list(pairs)
    assert rule == "smallest-hash"
    assert [d for s, d in pairs if s == "val"] == [d for d in many if d in sorted(many, key=blake)[:5]]
    assert [d for _, d in pairs] == many


def test_prepare_bad_inputs(tmp_path, tok_path):
    src, _ = make_corpus(tmp_path, 5)
    with pytest.raises(LmforgeError, match="tokenizer not found"):
        prepare_shards(str(src), tmp_path / "nope.json", tmp_path / "o", workers=1, show_progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LmforgeError, match="not a folder"):
        prepare_shards(str(src), tok_path, tmp_path / "afile", workers=1, show_progress=False)
    with pytest.raises(LmforgeError, match="val_fraction"):
        prepare_shards(str(src), tok_path, tmp_path / "o", val_fraction=1.0, show_progress=False)
    with pytest.raises(LmforgeError, match="run `lmforge data prepare` first"):
        load_manifest(tmp_path)
    bad_tok = tmp_path / "bad_tok.json"
    bad_tok.write_text("{}")
    with pytest.raises(LmforgeError):
        prepare_shards(str(src), bad_tok, tmp_path / "o", workers=1, show_progress=False)


def test_reprepare_removes_stale_shards(tmp_path, tok_path):
    src, _ = make_corpus(tmp_path, 30)
    out = tmp_path / "o"
    prepare_shards(str(src), tok_path, out, workers=1, shard_tokens=200, show_progress=False)
    many = len(list(out.glob("train_*.bin")))
    m = prepare_shards(str(src), tok_path, out, workers=1, show_progress=False)
    assert many > 1 and sorted(p.name for p in out.glob("*.bin")) == ["train_000.bin", "val_000.bin"]
    assert len(m["splits"]["train"]["shards"]) == 1


# ------------------------------------------------------------------------------------ loader


def make_data_dir(path: Path, shard_sizes, val_sizes=(), vocab_size=60_000, fingerprint="f" * 64) -> Path:
    """A data folder whose token stream is 0, 1, 2, ... (mod vocab) so every position is identifiable."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = prepare_mod.shard_dtype(vocab_size)
    splits = {}
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        shards, pos = [], 0
        for i, n in enumerate(sizes):
            name = f"{split}_{i:03d}.bin"
            (np.arange(pos, pos + n) % vocab_size).astype(dtype).tofile(path / name)
            shards.append({"file": name, "tokens": n})
            pos += n
        splits[split] = {"shards": shards, "tokens": pos, "documents": 1, "bytes": pos}
    manifest = {"format": prepare_mod.FORMAT, "version": prepare_mod.FORMAT_VERSION,
                "tokenizer_path": "tok.json", "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size,
                "bos_id": 0, "dtype": dtype.name, "splits": splits}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_token_split_reads_across_shards(tmp_path):
    split = TokenSplit(make_data_dir(tmp_path / "d", [7, 13, 1, 50]))
    assert split.num_tokens == 71 and split.vocab_size == 60_000 and split.dtype == np.uint16
    assert split.read(5, 25).tolist() == list(range(5, 25))
    assert split.read(0, 71).tolist() == list(range(71))
    assert split.num_windows(10) == 7  # (71 - 1) // 10
    assert split.windows([6, 0], 10).tolist() == [list(range(60, 71)), list(range(0, 11))]
    big = TokenSplit(make_data_dir(tmp_path / "big", [70_000], vocab_size=100_000))
    assert big.dtype == np.uint32 and big.read(69_990, 70_000).tolist() == list(range(69_990, 70_000))


def test_batches_shift_and_cover_each_window_once_per_epoch(tmp_path):
    L, B = 8, 4
    split = TokenSplit(make_data_dir(tmp_path / "d", [100, 150, 91]))  # 341 tokens -> 42 windows
    loader = BatchLoader(split, B, L, seed=3, rank=0, world_size=1)
    assert loader.num_windows == 42 and loader.steps_per_epoch == 10 and loader.tokens_per_step == B * L
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(loader.steps_per_epoch):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, L) and x.dtype == y.dtype == torch.int64
            assert torch.equal(y, x + 1)  # the stream is 0, 1, 2, ...: targets are the next tokens
            assert torch.all(x[:, 0] % L == 0)  # windows start at multiples of seq_len
            seen += (x[:, 0] // L).tolist()
        assert len(seen) == len(set(seen)) == 40  # 2 leftover windows are skipped this epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert loader.state_dict()["epoch"] == 2


def test_state_dict_resume_is_exact_across_epochs(tmp_path):
    split = TokenSplit(make_data_dir(tmp_path / "d", [200, 141]))
    a = BatchLoader(split, 3, 8, seed=7, rank=0, world_size=1)  # 42 windows -> 14 steps/epoch
    for _ in range(12):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = BatchLoader(split, 3, 8, seed=999, rank=0, world_size=1)  # the saved seed wins
    b.load_state_dict(state)
    for _ in range(20):  # crosses into epoch 1
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict() and a.state_dict()["epoch"] == 2
    with pytest.raises(LmforgeError, match="cannot resume"):
        BatchLoader(split, 2, 8, rank=0, world_size=1).load_state_dict(state)


def test_ranks_get_disjoint_blocks_of_the_global_batch(tmp_path):
    split = TokenSplit(make_data_dir(tmp_path / "d", [500]))
    single = BatchLoader(split, 4, 8, seed=1, rank=0, world_size=1)
    ranks = [BatchLoader(split, 2, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].tokens_per_step == single.tokens_per_step
    for _ in range(2 * single.steps_per_epoch + 1):
        x, _ = single.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)
        assert not set(parts[0][:, 0].tolist()) & set(parts[1][:, 0].tolist())


def test_loader_errors(tmp_path):
    d = make_data_dir(tmp_path / "d", [50, 50], fingerprint="a" * 64)
    with pytest.raises(LmforgeError, match="different tokenizer"):
        TokenSplit(d, expected_fingerprint="b" * 64)
    with pytest.raises(LmforgeError, match="different tokenizer"):
        TokenSplit(d, tokenizer=Tokenizer.byte_level())
    with pytest.raises(LmforgeError, match="'val' split .* is empty"):
        TokenSplit(d, "val")
    with pytest.raises(LmforgeError, match="fewer than one global batch"):
        BatchLoader(TokenSplit(d), 4, 32, rank=0, world_size=1)  # 3 windows
    with pytest.raises(LmforgeError, match="no 'test' split"):
        TokenSplit(d, "test")
    shard = d / "train_001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(LmforgeError, match="incomplete or corrupt"):
        TokenSplit(d)
    shard.unlink()
    with pytest.raises(LmforgeError, match="missing"):
        TokenSplit(d)
    with pytest.raises(LmforgeError, match="run `lmforge data prepare` first"):
        TokenSplit(tmp_path / "nowhere")


def test_eval_batches_in_order_split_over_ranks(tmp_path):
    split = TokenSplit(make_data_dir(tmp_path / "d", [40], val_sizes=[30, 51]), "val")  # 81 tokens: 10 windows
    starts = lambda batches: [(x[:, 0] // 8).tolist() for x, _ in batches]  # noqa: E731
    assert starts(eval_batches(split, 4, 8)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert starts(eval_batches(split, 4, 8, max_batches=2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert starts(eval_batches(split, 2, 8, rank=1, world_size=3)) == [[1, 4], [7]]
    for x, y in eval_batches(split, 3, 8):
        assert torch.equal(y, x + 1)
    with pytest.raises(LmforgeError, match="fewer than one window"):
        eval_batches(split, 1, 100)


def test_prepared_shards_feed_the_loader(tmp_path, tok, tok_path):
    src, docs = make_corpus(tmp_path, 50)
    out = tmp_path / "o"
    prepare_shards(str(src), tok_path, out, val_fraction=0.1, workers=1, shard_tokens=300, show_progress=False)
    train = TokenSplit(out, "train", tokenizer=tok)
    stream = stream_of(out, "train")
    assert train.num_tokens == len(stream)
    x, y = BatchLoader(train, 2, 16, seed=0, rank=0, world_size=1).next_batch()
    idx = BatchLoader(train, 2, 16, seed=0, rank=0, world_size=1).next_indices()
    for row, w in enumerate(idx):
        assert x[row].tolist() == stream[w * 16 : w * 16 + 16].tolist()
        assert y[row].tolist() == stream[w * 16 + 1 : w * 16 + 17].tolist()
