"""lmforge's own retrievers (lmforge/retrieval/biencoder.py, lmforge/stages/retriever.py): the
InfoNCE and listwise losses against their formulas, the cross-encoder as an encoder composed with a
head, training both from an encoder run on a collection the test writes, and using them in
`lmforge retrieval eval`."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import run_cli

from lmforge.retrieval.biencoder import CrossEncoder, Reranker, info_nce, listwise_loss, pad_rows, tops
from lmforge.retrieval.datasets import load_dataset, squad_split


def test_info_nce_is_the_cross_entropy_of_each_querys_own_positive():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)  # 4 positives, then 6 hard negatives
    loss, acc = info_nce(q, p, temperature=0.1)
    brute = 0.0
    for i in range(4):
        s = [float(q[i] @ p[j]) / 0.1 for j in range(10)]
        brute += -(s[i] - math.log(sum(math.exp(x) for x in s)))
    assert loss.item() == pytest.approx(brute / 4, rel=1e-5)
    right = sum(all(float(q[i] @ p[i]) > float(q[i] @ p[j]) for j in range(10) if j != i) for i in range(4))
    assert acc.item() == pytest.approx(right / 4)


def test_listwise_loss_and_ties_count_as_misses():
    scores = torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0, 1.0])  # two groups of three, positive first
    loss, acc = listwise_loss(scores, 3)
    brute = [-(2 - math.log(math.exp(2) + math.exp(1) + 1)), -(3 - math.log(math.exp(3) + 2 * math.e))]
    assert loss.item() == pytest.approx(sum(brute) / 2, rel=1e-6) and acc.item() == 1.0
    assert tops(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)).item() == 0.0  # all equal: nobody wins


def write_collection(root, n_docs: int = 120, seed: int = 0):
    """A BEIR-layout folder: each document names a made-up word; its train query and its test query
    ask about that word in different words (the test queries are never trained on)."""
    rng = random.Random(seed)
    (root / "qrels").mkdir(parents=True)
    words = "river stone light garden music winter paper bread horse cloud silver market ocean forest".split()
    docs, queries, qrels = [], [], {"train": [], "test": []}
    for i in range(n_docs):
        code = "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        a, b, c = rng.sample(words, 3)
        docs.append({"_id": f"d{i}", "title": "", "text": f"The {a} of {code} is near the {b} and the {c}."})
        for split, text in (("train", f"what is the {a} of {code}?"), ("test", f"where is the {b} of {code}?")):
            queries.append({"_id": f"{split}{i}", "text": text})
            qrels[split].append(f"{split}{i}\td{i}\t1")
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, lines in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def encoder_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "run"
    code, _, err = run_cli("pretrain", "--arch", "encoder", "--model", "tiny", "--data-dir", tiny_data, "--out", out,
                           "--seq-len", "64", "--batch-size", "16", "--max-steps", "30", "--eval-every", "0",
                           "--compile", "off", "--no-progress")
    assert code == 0, err
    return out


TRAIN = ("--passage-len", "64", "--query-len", "24", "--val-fraction", "0.2", "--eval-every", "0", "--no-progress")


def test_biencoder_learns_to_find_the_passage_a_question_is_about(encoder_run, tmp_path):
    """Training lifts the accuracy on held-out queries well above the untrained encoder's, and over the
    whole corpus the trained bi-encoder ranks far better than the encoder it started from."""
    beir = write_collection(tmp_path / "beir")
    out = tmp_path / "bi"
    code, stdout, err = run_cli("retrieval", "train-biencoder", "--checkpoint", encoder_run, "--dataset", beir,
                                "--out", out, "--max-steps", "120", "--batch-size", "16", *TRAIN,
                                "--query-len", "40")  # whole questions (bytes)
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    assert result["val_accuracy"] > result["start_val_accuracy"] + 0.3, result
    assert (out / "biencoder.json").is_file()

    from lmforge.retrieval.biencoder import BiEncoderEmbedder
    from lmforge.retrieval.dense import DenseRetriever
    from lmforge.retrieval.evaluate import evaluate_retriever

    train, test = load_dataset(str(beir), "train"), load_dataset(str(beir), "test")
    before = evaluate_retriever(DenseRetriever(BiEncoderEmbedder(encoder_run, require_trained=False),
                                               backend="numpy"), train, ["mrr@10"])
    code, stdout, err = run_cli("retrieval", "eval", "--dataset", beir, "--split", "train", "--retriever",
                                f"biencoder:{out}", "--backend", "numpy", "--no-progress", "--out", tmp_path / "r.json")
    assert code == 0, err
    after = json.loads((tmp_path / "r.json").read_text())["results"][0]["metrics"]
    assert after["mrr@10"] > before["metrics"]["mrr@10"] + 0.2, (after, before["metrics"])

    code, _, err = run_cli("retrieval", "eval", "--dataset", beir, "--retriever", f"biencoder:{encoder_run}")
    assert code == 2 and "not a biencoder" in err and err.count("\n") == 1, err

    # the run is a RAG index's encoder: `lmforge rag index --encoder RUN`, then search it
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(test.corpus[f"d{i}"].text)
    code, _, err = run_cli("rag", "index", docs, "--out", tmp_path / "index", "--encoder", out, "--no-progress")
    assert code == 0, err
    from lmforge.retrieval.index import RagIndex

    hits = RagIndex.load(tmp_path / "index").search(train.queries["train3"], k=6)
    assert len(hits) == 6 and {h.source for h in hits} == {str(docs / f"{i}.txt") for i in range(6)}


def test_reranker_is_an_encoder_with_a_head_and_reorders_only_the_top(encoder_run, tmp_path):
    beir = write_collection(tmp_path / "beir")
    out = tmp_path / "rr"
    code, stdout, err = run_cli("retrieval", "train-reranker", "--checkpoint", encoder_run, "--dataset", beir,
                                "--out", out, "--max-steps", "60", "--batch-size", "8", "--hard-negatives", "3",
                                "--lr", "1e-3", *TRAIN)
    assert code == 0, err
    result = json.loads(stdout[stdout.index("{"):])
    assert result["start_val_loss"] == pytest.approx(math.log(4), rel=1e-4)  # a zero head: uniform over 4

    rr = Reranker(out)
    assert isinstance(rr.model, CrossEncoder) and rr.model.model.family == "encoder"
    assert not isinstance(rr.model, type(rr.model.model))  # composed, not subclassed
    from lmforge.train import checkpoint as ckpt_io

    with pytest.raises(Exception, match="cross-encoder model, not a language model"):
        ckpt_io.load_model(out)
    # a pair scores the same alone and in a batch padded for a longer one
    long_text = "The river of zorvex is near the stone. " * 3
    alone = rr.scores("what is zorvex?", ["short passage"])
    together = rr.scores("what is zorvex?", ["short passage", long_text])
    assert abs(alone[0] - together[0]) < 1e-4

    code, stdout, err = run_cli("retrieval", "eval", "--dataset", beir, "--retriever", "bm25", "--rerank", out,
                                "--rerank-depth", "5", "--backend", "numpy", "--no-progress", "--out",
                                tmp_path / "r.json", "--save-run")
    assert code == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["retriever"] for r in rows] == ["BM25", "BM25 + re-rank"]
    for q, first in rows[0]["run"].items():  # the top 5 are permuted, nothing below them moves
        a, b = list(first), list(rows[1]["run"][q])
        assert set(a[:5]) == set(b[:5]) and a[5:] == b[5:]


def test_the_listwise_gradient_reaches_the_head_and_the_trunk():
    """A few AdamW steps on one batch of groups drive the listwise loss from ln 4 towards 0, and every
    trainable tensor of the encoder moves (its masked-token output layer is frozen and does not)."""
    from lmforge.models.encoder import Encoder
    from lmforge.models.registry import get_family

    torch.manual_seed(0)
    model = CrossEncoder(Encoder(get_family("encoder").config("tiny", vocab_size=300)))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 300, (int(torch.randint(10, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(32)]
    ids, mask = pad_rows(rows, 0, "cpu")
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(20):
        loss, _ = listwise_loss(model(ids, mask), 4)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(4), rel=1e-5) and loss.item() < 0.1
    moved = {n for n, p in model.model.named_parameters() if not torch.equal(p, before[n])}
    frozen = set(model.model.output_head_names())
    assert moved == set(before) - frozen and frozen


def test_bad_retriever_training_input_is_one_line(encoder_run, tiny_data, tmp_path):
    beir = write_collection(tmp_path / "beir")
    code, _, err = run_cli("retrieval", "train-biencoder", "--checkpoint", encoder_run, "--dataset", beir,
                           "--out", tmp_path / "x", "--passage-len", "999")
    assert code == 2 and "context window" in err and err.count("\n") == 1, err
    transformer = tmp_path / "gpt"
    code, _, err = run_cli("pretrain", "--model", "tiny", "--data-dir", tiny_data, "--out", transformer,
                           "--seq-len", "32", "--max-steps", "1", "--compile", "off", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("retrieval", "train-reranker", "--checkpoint", transformer, "--dataset", beir,
                           "--out", tmp_path / "y")
    assert code == 2 and "retrievers start from an encoder" in err and err.count("\n") == 1, err
    code, _, err = run_cli("retrieval", "eval", "--dataset", beir, "--retriever", "biencoder:")
    assert code == 2 and "unknown retriever" in err


def test_squad_splits_by_article(tmp_path):
    articles = [{"title": f"A{a}", "paragraphs": [{"context": f"text {a} {p}", "qas": [
        {"id": f"{a}-{p}-{k}", "question": f"q {a} {p} {k}", "answers": [{"text": "x", "answer_start": 0}]}
        for k in range(2)]} for p in range(3)]} for a in range(5)]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": articles, "version": "1.1"}))
    every = load_dataset(str(path), "test")
    train, held = load_dataset(str(path), "train"), load_dataset(str(path), "heldout")
    assert set(train.queries) | set(held.queries) == set(every.queries)
    assert not set(train.queries) & set(held.queries)
    assert {d.metadata["article"] for d in train.corpus.values()} == {0, 2, 4}
    assert held.corpus == every.corpus  # held-out questions are searched among every paragraph
    assert all(int(q.split("-")[0]) % 2 == 1 for q in held.queries)
    with pytest.raises(Exception, match="no split 'dev'"):
        squad_split(every, "dev")


def test_pad_rows_marks_real_tokens():
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
