"""word2vec (lmforge/embed): reading text, vocabulary, subsampling, noise, windows, the hand-derived
updates against autograd, learning planted analogies (skip-gram and CBOW), the evaluations against a
brute-force definition and against gensim's own evaluate_* on the same vectors, saving, and the CLI."""
import gzip
import json
import random

import numpy as np
import pytest
import torch
from conftest import missing, run_cli, shared_file

from lmforge.common import LmforgeError
from lmforge.embed.config import CorpusOptions, Word2VecConfig
from lmforge.embed.evaluate import evaluate_analogies, evaluate_word_pairs, read_analogies, read_word_pairs
from lmforge.embed.vectors import WordVectors, as_word_vectors
from lmforge.embed.word2vec import (
    MAX_SENTENCE_WORDS,
    Word2Vec,
    _NoiseSampler,
    build_corpus,
    context_windows,
    keep_probabilities,
    noise_distribution,
    read_sentences,
    read_word2vec_text,
    sgns_step,
    subsample,
    tokenize,
    train,
    train_word2vec,
)


def gensim():
    try:
        import gensim
    except ImportError:
        missing("gensim (the reference implementation)", "pip install -e '.[test]'")
    return gensim


# ----------------------------------------------------------------------------- a corpus with planted analogies

ROWS, COLS = 6, 3


def planted_sentences(n: int = 3000, seed: int = 0) -> list[list[str]]:
    """Sentences about entities r{r}c{c}: each mentions one entity with three of its row's topic words,
    three of its column's and two fillers, shuffled. An entity's contexts are its row's plus its
    column's, so its vector should be row part + column part, and r1c1 : r1c2 :: r2c1 : r2c2."""
    rnd = random.Random(seed)
    rows = [[f"row{r}topic{j}" for j in range(4)] for r in range(ROWS)]
    cols = [[f"col{c}topic{j}" for j in range(4)] for c in range(COLS)]
    fillers = [f"filler{j}" for j in range(20)]
    out = []
    for _ in range(n):
        r, c = rnd.randrange(ROWS), rnd.randrange(COLS)
        s = [f"r{r}c{c}"] + rnd.sample(rows[r], 3) + rnd.sample(cols[c], 3) + rnd.sample(fillers, 2)
        rnd.shuffle(s)
        out.append(s)
    return out


PLANTED = [(f"r{r1}c{c1}", f"r{r1}c{c2}", f"r{r2}c{c1}", f"r{r2}c{c2}")
           for r1 in range(ROWS) for r2 in range(ROWS) for c1 in range(COLS) for c2 in range(COLS)
           if r1 != r2 and c1 != c2]  # 360 questions


def small_config(**kw) -> Word2VecConfig:
    return Word2VecConfig(**{"dim": 20, "epochs": 5, "min_count": 1, "sample": 0.0, "batch_size": 256,
                             "workers": 1, "progress": False, **kw})


@pytest.fixture(scope="module")
def planted_models():
    sentences = planted_sentences()
    return {m: train_word2vec(sentences, small_config(model=m))[0] for m in ("sg", "cbow")}


# ----------------------------------------------------------------------------- reading text


def test_tokenize_lowercases_and_splits_at_punctuation():
    assert tokenize("Don't STOP—the hill-side, 42 times_over! Café") == \
        ["don", "t", "stop", "the", "hill", "side", "42", "times", "over", "café"]


def test_read_sentences_paragraphs_lines_gzip_jsonl_and_limits(tmp_path):
    text = "Hello there,\nworld!\n\n\nNew para-graph.\nline two\n  \nthird\n"
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write(text)
    para = [["hello", "there", "world"], ["new", "para", "graph", "line", "two"], ["third"]]
    assert list(read_sentences([tmp_path / "a.txt"])) == para
    assert list(read_sentences([tmp_path / "a.txt.gz"])) == para
    assert list(read_sentences([tmp_path / "a.txt"], CorpusOptions(unit="line"))) == \
        [["hello", "there"], ["world"], ["new", "para", "graph"], ["line", "two"], ["third"]]
    assert list(read_sentences([tmp_path / "a.txt"], CorpusOptions(max_words=4))) == [["hello", "there", "world"],
                                                                                     ["new"]]
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "One two.\n\nThree"}) + "\n")
    assert list(read_sentences([tmp_path / "d.jsonl"], CorpusOptions(text_field="body"))) == [["one", "two"],
                                                                                              ["three"]]
    # several sources in order; an over-long sentence is cut like the C tool and gensim cut it
    (tmp_path / "long.txt").write_text("w " * (MAX_SENTENCE_WORDS + 5))
    got = list(read_sentences([tmp_path / "a.txt", tmp_path / "long.txt"]))
    assert got[:3] == para and [len(s) for s in got[3:]] == [MAX_SENTENCE_WORDS, 5]
    with pytest.raises(LmforgeError, match="no such file"):
        list(read_sentences([tmp_path / "missing.txt"]))
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(LmforgeError, match="UTF-8"):
        list(read_sentences([tmp_path / "bad.txt"]))


# ----------------------------------------------------------------------------- vocabulary, subsampling, noise


def test_build_corpus_counts_orders_and_drops_rare_words():
    sentences = [["b", "a", "x", "a"], ["y"], ["c", "b", "a"], ["c", "b", "z"]]
    c = build_corpus(sentences, min_count=2)
    assert c.words == ["b", "a", "c"] and c.counts.tolist() == [3, 3, 2]  # ties: first seen first
    assert c.raw_words == 11
    # out-of-vocabulary words leave the sentences (windows close over them); empty sentences go
    assert [[c.words[i] for i in c.ids[lo:hi]] for lo, hi in zip(c.offsets[:-1], c.offsets[1:])] == \
        [["b", "a", "a"], ["c", "b", "a"], ["c", "b"]]
    assert build_corpus(sentences, min_count=1, max_vocab=2).words == ["b", "a"]
    with pytest.raises(LmforgeError, match="min_count=9"):
        build_corpus(sentences, min_count=9)


def test_vocabulary_equals_gensims():
    sentences = planted_sentences(500)
    ours = build_corpus(sentences, min_count=60)
    g = gensim().models.Word2Vec(vector_size=8, min_count=60, workers=1)
    g.build_vocab(sentences)
    assert {w: int(n) for w, n in zip(ours.words, ours.counts)} == \
        {w: int(g.wv.get_vecattr(w, "count")) for w in g.wv.index_to_key}
    assert ours.raw_words == g.corpus_total_words


def test_keep_probabilities_are_mikolovs_formula_as_gensim_applies_it():
    counts = np.array([5000, 1000, 100, 10, 1])
    t, total = 1e-3, counts.sum()
    by_hand = [min(1.0, (np.sqrt(n / (t * total)) + 1) * (t * total) / n) for n in counts]
    np.testing.assert_allclose(keep_probabilities(counts, t), by_hand)
    assert keep_probabilities(counts, t)[-1] == 1.0 and keep_probabilities(counts, 0.0).tolist() == [1.0] * 5
    # gensim stores the same probability as an integer out of 2**32
    sentences = planted_sentences(400)
    corpus = build_corpus(sentences, min_count=1)
    g = gensim().models.Word2Vec(vector_size=8, min_count=1, sample=1e-2, workers=1)
    g.build_vocab(sentences)
    theirs = np.array([g.wv.get_vecattr(w, "sample_int") / 2**32 for w in corpus.words])
    np.testing.assert_allclose(keep_probabilities(corpus.counts, 1e-2), theirs, atol=1e-8)
    # and subsampling keeps that share of each word
    ids = np.repeat(np.arange(5), 20000)
    keep = np.array([0.9, 0.5, 0.2, 0.05, 1.0])
    kept = ids[subsample(ids, keep, np.random.default_rng(0))]
    np.testing.assert_allclose(np.bincount(kept, minlength=5) / 20000, keep, atol=0.01)


def test_noise_distribution_is_unigram_to_the_three_quarters_and_sampled_exactly():
    counts = np.array([1000, 300, 20, 5, 1])
    p = noise_distribution(counts)
    np.testing.assert_allclose(p, counts**0.75 / (counts**0.75).sum())
    draws = _NoiseSampler(p)((400_000,), torch.Generator().manual_seed(0)).numpy()
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert np.abs(freq - p).max() < 3 * np.sqrt(p * (1 - p) / len(draws)).max()
    # gensim's cumulative table (out of 2**31 - 1) encodes the same distribution
    sentences = planted_sentences(300)
    corpus = build_corpus(sentences, min_count=1)
    g = gensim().models.Word2Vec(vector_size=8, min_count=1, workers=1)
    g.build_vocab(sentences)
    theirs = np.diff(np.concatenate([[0], g.cum_table.astype(np.float64)])) / (2**31 - 1)
    ours = dict(zip(corpus.words, noise_distribution(corpus.counts)))
    np.testing.assert_allclose([ours[w] for w in g.wv.index_to_key], theirs, atol=1e-8)


def test_context_windows_are_reduced_windows_inside_sentences():
    window, rng = 4, np.random.default_rng(0)
    sentence = np.repeat([0, 1, 2], [7, 1, 12])
    seen = np.zeros(window + 1)
    for _ in range(2000):
        ctx, ok = context_windows(sentence, window, rng)
        for i in range(len(sentence)):
            got = sorted(ctx[i][ok[i]].tolist())
            assert i not in got and all(sentence[j] == sentence[i] for j in got)
            reach = max((abs(j - i) for j in got), default=0)
            # symmetric: every same-sentence position up to the reduced window is in, none beyond
            assert got == [j for j in range(i - reach, i + reach + 1) if j != i and 0 <= j < len(sentence)
                           and sentence[j] == sentence[i]]
        far = ctx[7 + 1 + 6][ok[7 + 1 + 6]]  # a word with room on both sides: its window is visible
        seen[max(abs(far - 14))] += 1
    # the reduced window is uniform on 1..window
    np.testing.assert_allclose(seen[1:] / seen.sum(), [1 / window] * window, atol=0.03)


# ----------------------------------------------------------------------------- the updates


def _autograd_loss(w_in, w_out, h, targets, noise):
    """Negative sampling's loss, written directly (a noise word equal to its target left out)."""
    u_pos = w_out[targets]
    loss = -torch.nn.functional.logsigmoid((u_pos * h).sum(-1)).sum()
    s_neg = (w_out[noise] * h[:, None, :]).sum(-1)
    return loss - (torch.nn.functional.logsigmoid(-s_neg) * (noise != targets[:, None])).sum()


def test_skipgram_step_is_sgd_on_the_negative_sampling_loss():
    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    inputs = torch.tensor([0, 3, 3, 6])  # a repeated input word: its gradients add up
    targets = torch.tensor([1, 2, 4, 2])
    noise = torch.tensor([[2, 5], [2, 0], [1, 1], [6, 2]])  # row 2 draws its own target: ignored
    a_in, a_out = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    loss = _autograd_loss(a_in, a_out, a_in[inputs], targets, noise)
    loss.backward()
    ours = sgns_step(w_in, w_out, inputs, targets, noise, lr=0.1)
    assert ours == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(w_in, a_in.detach() - 0.1 * a_in.grad)
    torch.testing.assert_close(w_out, a_out.detach() - 0.1 * a_out.grad)


def test_cbow_step_gives_each_context_word_the_whole_gradient_of_the_mean():
    g = torch.Generator().manual_seed(1)
    w_in, w_out = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    rows, ids = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 2, 3, 0, 4])  # windows of 3 and 2 words
    targets, noise = torch.tensor([5, 2]), torch.tensor([[0, 1], [3, 3]])
    a_in, a_out = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    size = torch.tensor([3.0, 2.0])
    hidden = torch.zeros(2, 4).index_add(0, rows, a_in[ids]) / size[:, None]
    loss = _autograd_loss(a_in, a_out, hidden, targets, noise)
    loss.backward()
    ours = sgns_step(w_in, w_out, None, targets, noise, lr=0.1, hidden=hidden.detach(), scatter=(rows, ids))
    assert ours == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(w_out, a_out.detach() - 0.1 * a_out.grad)
    # d loss / d context vector = (d loss / d mean) / size; the original adds d loss / d mean itself
    scale = torch.ones(6)
    scale[[1, 2, 3]], scale[[0, 4]] = 3.0, 2.0
    torch.testing.assert_close(w_in, a_in.detach() - 0.1 * a_in.grad * scale[:, None])


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("model", ["sg", "cbow"])
def test_planted_analogies_and_neighbours_are_learned(planted_models, model):
    m = planted_models[model]
    assert m.stats["epoch_loss"][-1] < 0.9 * m.stats["epoch_loss"][0]
    assert evaluate_analogies(m, [("planted", PLANTED)])["accuracy"] >= 0.9
    assert m.wv.analogy("r0c0", "r0c1", "r3c0", k=1)[0][0] == "r3c1"
    # a topic word's nearest words are the other topic words of its row
    assert {w for w, _ in m.wv.neighbors("row2topic0", 3)} == {"row2topic1", "row2topic2", "row2topic3"}
    # untrained vectors know nothing: the accuracy comes from training
    untrained = train_word2vec(planted_sentences(), small_config(model=model, lr=1e-9, min_lr=0.0))[0]
    assert evaluate_analogies(untrained, [("planted", PLANTED)])["accuracy"] < 0.2


def test_hogwild_workers_learn_too():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = train_word2vec(planted_sentences(), small_config(workers=2))[0]
        assert torch.get_num_threads() == 2  # training runs ops on one thread, then gives the setting back
    finally:
        torch.set_num_threads(before)
    assert m.stats["workers"] == 2 and evaluate_analogies(m, [("planted", PLANTED)])["accuracy"] >= 0.9


def test_training_is_reproducible_and_subsampling_changes_it():
    sentences = planted_sentences(300)
    corpus = build_corpus(sentences, min_count=1)
    a, b = train(corpus, small_config(epochs=1)), train(corpus, small_config(epochs=1))
    assert torch.equal(a.input_vectors, b.input_vectors)
    c = train(corpus, small_config(epochs=1, sample=1e-3))
    assert c.stats["examples"] < 0.8 * a.stats["examples"]  # frequent words are dropped before windowing
    with pytest.raises(LmforgeError, match="min-lr"):
        train(corpus, small_config(lr=0.01, min_lr=0.02))


def test_learning_rate_falls_linearly_to_its_minimum(monkeypatch):
    from lmforge.embed import word2vec

    seen = []
    real = word2vec.sgns_step
    monkeypatch.setattr(word2vec, "sgns_step", lambda *a, **kw: seen.append(a[5]) or real(*a, **kw))
    corpus = build_corpus(planted_sentences(400), min_count=1)
    train(corpus, small_config(epochs=2, lr=0.05, min_lr=0.001, batch_size=64))
    lrs = np.array(seen)
    assert lrs[0] == pytest.approx(0.05, rel=1e-3) and lrs[-1] == pytest.approx(0.001, abs=1e-3)
    assert (np.diff(lrs) <= 0).all()
    # linear in the words done: halfway through the batches (about halfway through the words), halfway down
    assert lrs[len(lrs) // 2] == pytest.approx((0.05 + 0.001) / 2, rel=0.05)


def test_divergence_is_one_clear_error():
    with pytest.raises(LmforgeError, match="diverged.*lower --batch-size"):
        train_word2vec(planted_sentences(), small_config(lr=5.0, batch_size=4096))


# ----------------------------------------------------------------------------- queries and evaluation


def test_neighbours_and_analogies_by_hand():
    wv = WordVectors(["man", "woman", "king", "queen", "apple"],
                     [[1, 0, 0], [1, 1, 0], [3, 0, 1], [3, 3, 1.1], [0, 0, -1]])
    assert wv.analogy("man", "woman", "king", k=1)[0][0] == "queen"
    u = wv.unit
    expected = sorted(((w, float(u[i] @ u[2])) for i, w in enumerate(wv.words) if w != "king"), key=lambda x: -x[1])
    assert [w for w, _ in wv.neighbors("king", 4)] == [w for w, _ in expected]
    assert wv.neighbors("King", 1)[0][1] == pytest.approx(expected[0][1], rel=1e-6)  # lowercase fallback
    with pytest.raises(LmforgeError, match="'pear' is not in the vocabulary"):
        wv.analogy("man", "pear", "king")
    assert as_word_vectors({"a": [1.0, 0.0], "b": [0.0, 1.0]}).words == ["a", "b"]
    # random vectors against the definitions, one candidate at a time
    words = [f"w{i}" for i in range(25)]
    vectors = np.random.default_rng(0).normal(size=(25, 3))
    wv, unit = WordVectors(words, vectors), vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for a, b, c in [(0, 1, 2), (3, 4, 5), (6, 7, 8), (2, 9, 4), (5, 0, 11), (12, 13, 1), (7, 3, 3)]:
        query = unit[b] - unit[a] + unit[c]
        best = sorted((i for i in range(25) if i not in (a, b, c)), key=lambda i: -unit[i] @ query)
        assert [w for w, _ in wv.analogy(words[a], words[b], words[c], k=4)] == [words[i] for i in best[:4]]
        near = sorted((i for i in range(25) if i != a), key=lambda i: -unit[i] @ unit[a])
        assert [w for w, _ in wv.neighbors(words[a], k=4)] == [words[i] for i in near[:4]]


def _brute_force_analogies(words, vectors, questions, restrict):
    """The evaluation's definition, one question and one candidate at a time."""
    top = {w: i for i, w in reversed(list(enumerate(words[:restrict])))}
    unit = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in vectors[:restrict]]
    correct = counted = 0
    for q in questions:
        if not all(w in top for w in q):
            continue
        counted += 1
        a, b, c, d = (top[w] for w in q)
        query = unit[b] - unit[a] + unit[c]
        best = max((i for i in range(len(unit)) if i not in (a, b, c)), key=lambda i: unit[i] @ query)
        correct += best == d
    return correct, counted


def test_analogy_evaluation_equals_its_definition():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    # vectors with some structure so that a fair share of questions is answered right
    base, offset = rng.normal(size=(30, 6)), rng.normal(size=6)
    vectors = np.concatenate([base, base + offset + 0.3 * rng.normal(size=(30, 6))]).astype(np.float32)
    pairs = [(f"w{i}", f"w{i + 30}") for i in range(30)]
    questions = [(a, b, c, d) for a, b in pairs[:12] for c, d in pairs[:12] if a != c][:100]
    questions += [("w1", "w31", "nope", "w32"), ("w0", "w30", "w2", "w59")]
    for restrict in (60, 40):
        r = evaluate_analogies(WordVectors(words, vectors), [("s1", questions[:50]), ("s2", questions[50:])],
                               restrict_vocab=restrict)
        correct, counted = _brute_force_analogies(words, vectors, questions, restrict)
        assert (r["correct"], r["counted"], r["questions"]) == (correct, counted, len(questions))
        assert r["coverage"] == counted / len(questions) and 0 < correct < counted
        assert sum(s["correct"] for s in r["sections"]) == correct


def _write_eval_files(tmp_path, questions, pairs):
    qpath, ppath = tmp_path / "questions.txt", tmp_path / "pairs.tsv"
    lines = [": first"] + [" ".join(q) for q in questions[:60]] + [": second"] + [" ".join(q) for q in questions[60:]]
    qpath.write_text("\n".join(lines) + "\n")
    ppath.write_text("# a comment\n# word1\tword2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    return qpath, ppath


def test_evaluations_agree_with_gensims_evaluate_functions(tmp_path, planted_models):
    """The same vectors through our evaluation and gensim's evaluate_word_analogies /
    evaluate_word_pairs: same accuracy, coverage and Spearman, with and without a restricted
    vocabulary, and with case variants in the vocabulary."""
    KeyedVectors = gensim().models.KeyedVectors
    wv = planted_models["sg"].wv
    words = wv.words + ["R0C0", "Row1Topic0"]  # case variants, rarer than their lowercase forms
    vectors = np.concatenate([wv.vectors, np.random.default_rng(0).normal(size=(2, wv.dim)).astype(np.float32)])
    kv = KeyedVectors(wv.dim)
    kv.add_vectors(words, vectors)
    rng = random.Random(0)
    questions = rng.sample(PLANTED, 80) + [("R0C1", "r0c2", "r1c1", "r1c2"), ("r0c0", "r0c1", "unknown", "r3c1")]
    topic = [f"row{r}topic{j}" for r in range(ROWS) for j in range(4)] + [f"r{r}c{c}" for r in range(ROWS)
                                                                          for c in range(COLS)]
    pairs = [(rng.choice(topic), rng.choice(topic), round(rng.uniform(0, 10), 2)) for _ in range(60)]
    pairs += [("r0c0", "missing", 3.0), ("ROW1TOPIC0", "row1topic1", 9.0)]
    qpath, ppath = _write_eval_files(tmp_path, questions, pairs)
    ours = WordVectors(words, vectors)
    counted = {}
    for restrict in (300_000, 66):  # 66: some entities (the rarest words) are left out
        score, sections = kv.evaluate_word_analogies(str(qpath), restrict_vocab=restrict)
        r = evaluate_analogies(ours, qpath, restrict_vocab=restrict)
        assert r["accuracy"] == pytest.approx(score, abs=1e-12)
        assert r["correct"] == len(sections[-1]["correct"]) and r["counted"] == r["correct"] + \
            len(sections[-1]["incorrect"])
        assert [s["correct"] for s in r["sections"]] == [len(s["correct"]) for s in sections[:-1]]
        _, (rho, _), oov_percent = kv.evaluate_word_pairs(str(ppath), restrict_vocab=restrict)
        s = evaluate_word_pairs(ours, ppath, restrict_vocab=restrict)
        assert s["spearman"] == pytest.approx(rho, abs=1e-6)
        assert 100 * (1 - s["coverage"]) == pytest.approx(oov_percent)
        counted[restrict] = r["counted"]
        if restrict == 300_000:
            assert r["accuracy"] > 0.5  # the planted structure is there to be found
    assert 0 < counted[66] < counted[300_000] == 81
    assert evaluate_analogies(kv, qpath)["accuracy"] == evaluate_analogies(ours, qpath)["accuracy"]  # gensim's own


def test_word_pair_evaluation_by_hand(tmp_path):
    wv = WordVectors(["a", "b", "c", "d"], [[1, 0], [1, 1], [0, 1], [-1, 0.2]])
    _, path = _write_eval_files(tmp_path, [], [("a", "b", 8), ("a", "c", 5), ("b", "c", 9), ("a", "d", 1),
                                               ("a", "zz", 4)])
    assert read_word_pairs(path)[0] == ("a", "b", 8.0)
    r = evaluate_word_pairs(wv, path)
    # cosines: a-b 0.707, a-c 0, b-c 0.707, a-d -0.98 -> ranks 3.5, 2, 3.5, 1 against 3, 2, 4, 1
    from scipy.stats import spearmanr

    assert r["spearman"] == pytest.approx(spearmanr([8, 5, 9, 1], [3.5, 2, 3.5, 1]).statistic)
    assert (r["counted"], r["pairs"], r["coverage"]) == (4, 5, 0.8)
    (tmp_path / "bad.tsv").write_text("a\tb\n")
    with pytest.raises(LmforgeError, match="bad.tsv:1"):
        read_word_pairs(tmp_path / "bad.tsv")
    (tmp_path / "bad.txt").write_text("a b c d\n")
    with pytest.raises(LmforgeError, match="before the first"):
        read_analogies(tmp_path / "bad.txt")


def test_shared_evaluation_sets_read_and_agree_with_gensim():
    questions = shared_file("word-eval/questions-words.txt")
    pairs = shared_file("word-eval/wordsim353.tsv")
    sections = read_analogies(questions)
    assert len(sections) == 14 and sum(len(q) for _, q in sections) == 19544
    assert len(read_word_pairs(pairs)) == 353
    # random vectors for a sample of the sets' words (so that some questions are out of vocabulary)
    words = sorted({w.lower() for _, qs in sections for q in qs for w in q})[::2]
    words += sorted({w.lower() for a, b, _ in read_word_pairs(pairs) for w in (a, b)})[::2]
    words = list(dict.fromkeys(words))
    vectors = np.random.default_rng(0).normal(size=(len(words), 16)).astype(np.float32)
    kv = gensim().models.KeyedVectors(16)
    kv.add_vectors(words, vectors)
    r = evaluate_analogies(WordVectors(words, vectors), questions)
    score, gs_sections = kv.evaluate_word_analogies(str(questions))
    assert r["correct"] == len(gs_sections[-1]["correct"]) and r["accuracy"] == pytest.approx(score)
    assert 0 < r["coverage"] < 1
    s = evaluate_word_pairs(WordVectors(words, vectors), pairs)
    assert s["spearman"] == pytest.approx(kv.evaluate_word_pairs(str(pairs))[1][0], abs=1e-6)


# ----------------------------------------------------------------------------- saving and the command line


def test_save_load_round_trip_and_text_export(tmp_path, planted_models):
    m = planted_models["cbow"]
    m.save(tmp_path / "w2v")
    back = Word2Vec.load(tmp_path / "w2v")
    assert back.words == m.words and back.counts.tolist() == m.counts.tolist() and back.config == m.config
    assert torch.equal(back.input_vectors, m.input_vectors) and torch.equal(back.output_vectors, m.output_vectors)
    assert back.stats["epoch_loss"] == m.stats["epoch_loss"]
    m.export_text(tmp_path / "vectors.txt")
    text = read_word2vec_text(tmp_path / "vectors.txt")
    assert text.words == m.words
    np.testing.assert_allclose(text.vectors, m.wv.vectors, rtol=1e-5, atol=1e-7)
    (tmp_path / "c_tool.txt").write_text("2 3\nfoo 1 2 3 \nbar 0.5 -1 2e-3 \n")  # the C tool's trailing spaces
    np.testing.assert_allclose(read_word2vec_text(tmp_path / "c_tool.txt").vectors, [[1, 2, 3], [0.5, -1, 2e-3]])
    kv = gensim().models.KeyedVectors.load_word2vec_format(str(tmp_path / "vectors.txt"), binary=False)
    assert kv.index_to_key == m.words
    np.testing.assert_allclose(kv.vectors, m.wv.vectors, rtol=1e-5, atol=1e-7)
    (tmp_path / "w2v" / "vectors.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LmforgeError, match="cannot read"):
        Word2Vec.load(tmp_path / "w2v")
    with pytest.raises(LmforgeError, match="not found"):
        Word2Vec.load(tmp_path / "nowhere")


def test_cli_train_query_evaluate_export(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(s) for s in planted_sentences()) + "\n")
    out = tmp_path / "w2v"
    code, stdout, err = run_cli("embed", "word2vec", "--data", corpus, "--out", out, "--cbow", "--dim", 20,
                                "--epochs", 5, "--min-count", 1, "--sample", 0, "--batch-size", 256, "--no-progress")
    assert code == 0, err
    assert "cbow:" in stdout and Word2Vec.load(out).config.model == "cbow"
    code, stdout, err = run_cli("embed", "neighbors", out, "row2topic0", "-k", 3)
    assert code == 0 and {line.split()[0] for line in stdout.splitlines()} == {"row2topic1", "row2topic2",
                                                                               "row2topic3"}
    code, stdout, _ = run_cli("embed", "analogy", out, "r0c0", "r0c1", "r3c0", "-k", 2)
    assert code == 0 and stdout.split()[0] == "r3c1"
    questions, pairs = _write_eval_files(tmp_path, PLANTED[:100], [("r0c0", "r0c1", 5), ("r0c0", "r1c0", 6),
                                                                    ("row0topic0", "row0topic1", 9)])
    code, stdout, err = run_cli("embed", "eval", out, "--analogies", questions, "--similarity", pairs, "--sections",
                                "--out", tmp_path / "results.json")
    assert code == 0, err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["analogies"]["questions"] == 100 and saved["analogies"]["accuracy"] >= 0.9
    assert "accuracy" in stdout and "Spearman" in stdout and "first" in stdout
    code, stdout, _ = run_cli("embed", "export", out, tmp_path / "v.txt")
    assert code == 0 and read_word2vec_text(tmp_path / "v.txt").words == Word2Vec.load(out).words
    code, stdout, _ = run_cli("embed", "neighbors", tmp_path / "v.txt", "r0c0", "-k", 1)  # a text file works too
    assert code == 0 and stdout.strip()
    # input errors: one line each
    for argv, match in [(("embed", "neighbors", out, "zebra"), "'zebra' is not in the vocabulary"),
                        (("embed", "analogy", out, "r0c0", "nope", "r1c0"), "'nope' is not in the vocabulary"),
                        (("embed", "neighbors", tmp_path / "nothing", "r0c0"), "not found"),
                        (("embed", "word2vec", "--data", tmp_path / "none.txt", "--out", tmp_path / "o"), "no such"),
                        (("embed", "word2vec", "--data", corpus, "--out", tmp_path / "o", "--min-count", 10**6),
                         "min_count")]:
        code, stdout, err = run_cli(*argv)
        assert code == 2 and err.startswith("error:") and match in err and err.count("\n") == 1, (argv, err)
    monkeypatch.setenv("LMFORGE_SHARED_DATA", str(tmp_path / "empty"))
    code, _, err = run_cli("embed", "eval", out)
    assert code == 2 and err.startswith("error: no questions-words.txt") and err.count("\n") == 1
    code, _, err = run_cli("embed", "word2vec", "--data", corpus, "--out", out, "--dim", 0)
    assert code == 2 and "positive integer" in err
