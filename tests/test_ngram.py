"""Counted n-gram models (lmforge/models/ngram.py): exact counting, normalisation, agreement with
textbook formulas computed with Python dicts, the model protocol, checkpoints and ARPA export."""
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import context_free_loss, missing

from lmforge.common import LmforgeError
from lmforge.models.ngram import (
    FALLBACK_DISCOUNTS,
    NgramConfig,
    NgramLM,
    arpa_token_text,
    write_arpa,
)
from lmforge.models.registry import build_model, get_family
from lmforge.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
V = TOK.vocab_size


def text_ids(text: str) -> np.ndarray:
    return np.array([TOK.bos_id] + TOK.encode(text), dtype=np.int64)


@pytest.fixture(scope="module")
def ids(corpus_text):
    return text_ids(corpus_text[:60_000])


@pytest.fixture(scope="module")
def held_out(corpus_text):
    return text_ids(corpus_text[150_000:152_000])


def fitted(tokens, **cfg) -> NgramLM:
    model = NgramLM(NgramConfig(vocab_size=V, **cfg))
    model.fit(tokens, progress=False)
    return model


def test_config_checks_and_round_trip():
    cfg = NgramConfig(vocab_size=300, order=4, smoothing="add-eps", eps=0.5)
    assert NgramConfig.from_dict(cfg.to_dict()) == cfg
    for bad, word in ((dict(order=0), "order"), (dict(smoothing="witten-bell"), "smoothing"),
                      (dict(eps=0.0), "eps"), (dict(vocab_size=0), "vocab_size")):
        with pytest.raises(LmforgeError, match=word):
            NgramConfig(**bad)
    with pytest.raises(LmforgeError, match="unknown"):
        NgramConfig.from_dict({"order": 3, "n_layer": 2})
    family = get_family("ngram")
    assert family.config("kn5", vocab_size=300) == NgramConfig(vocab_size=300, order=5)
    assert {"unigram", "bigram", "trigram", "addeps5", "kn3", "kn5", "kn7"} <= set(family.presets)
    assert isinstance(build_model("ngram", cfg.to_dict()), NgramLM)


def test_counts_are_exact_with_a_vocabulary_whose_7_grams_overflow_int64():
    # 4096**7 = 2**84: the keys must be rank-compressed, and a wrong or colliding key would change a count.
    rng = np.random.default_rng(0)
    tokens = rng.choice(np.array([0, 17, 2048, 4095]), size=3000, p=[0.4, 0.3, 0.2, 0.1])
    model = NgramLM(NgramConfig(vocab_size=4096, order=7, smoothing="add-eps"))
    stats = model.fit(tokens, progress=False)
    grams = [()]  # the n-gram spelled by each stored id, order by order
    for k in range(1, 8):
        keys = getattr(model, f"keys_{k}").numpy()
        grams = [grams[h] + (w,) for h, w in zip((keys // 4096).tolist(), (keys % 4096).tolist())]
        want = Counter(tuple(tokens[i:i + k].tolist()) for i in range(len(tokens) - k + 1))
        assert dict(zip(grams, getattr(model, f"counts_{k}").tolist())) == want
    assert stats["ngrams"] == [len({tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}) for k in range(1, 8)]
    assert stats["ngrams_total"] == model.num_params() == sum(stats["ngrams"])
    assert stats["memory_bytes"] > 0 and stats["seconds"] >= 0


# ----------------------------------------------------------------------------- textbook references


class ReferenceKN:
    """Interpolated modified Kneser-Ney straight from Chen & Goodman, with Python dicts."""

    def __init__(self, tokens, n, vocab):
        tokens = list(tokens)
        self.n, self.V = n, vocab
        raw = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, n + 1)}
        self.counts = {n: raw[n]}
        for k in range(1, n):  # continuation counts: distinct left neighbours
            self.counts[k] = Counter(g[1:] for g in raw[k + 1])
        self.by_context = {k: defaultdict(dict) for k in self.counts}
        for k, table in self.counts.items():
            for g, c in table.items():
                self.by_context[k][g[:-1]][g[-1]] = c
        self.D, self.fallback = {}, []
        for k, table in self.counts.items():
            nc = Counter(table.values())
            d = None
            if all(nc[c] for c in (1, 2, 3, 4)):
                y = nc[1] / (nc[1] + 2 * nc[2])
                d = (1 - 2 * y * nc[2] / nc[1], 2 - 3 * y * nc[3] / nc[2], 3 - 4 * y * nc[4] / nc[3])
            if d is None or not all(0 < d[c - 1] < c for c in (1, 2, 3)):
                d = FALLBACK_DISCOUNTS  # the documented fallback
                self.fallback.append(k)
            self.D[k] = (0.0, *d)

    def prob(self, w, history):
        history = tuple(history)[-(self.n - 1):] if self.n > 1 else ()
        k = len(history) + 1
        lower = 1 / self.V if k == 1 else self.prob(w, history[1:])
        seen = self.by_context[k].get(history, {})
        total = sum(seen.values())
        if total == 0:
            return lower
        D = self.D[k]
        gamma = sum(D[min(c, 3)] for c in seen.values()) / total
        return max(seen.get(w, 0) - D[min(seen.get(w, 0), 3)], 0) / total + gamma * lower


def reference_add_eps(tokens, n, vocab, eps):
    tokens = list(tokens)
    counts = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, n + 1)}
    totals = {k: Counter(g[:-1] for g in counts[k].elements()) for k in counts}

    def prob(w, history):
        history = tuple(history)[-(n - 1):] if n > 1 else ()
        k = len(history) + 1
        return (counts[k][history + (w,)] + eps) / (totals[k][history] + eps * vocab)

    return prob


def check_against(model, reference, rows):
    """The model's distribution at every position of rows equals the reference's, for every id."""
    probs = model.probabilities(rows)
    n = model.config.order
    for b, row in enumerate(rows.tolist()):
        for t in range(len(row)):
            history = row[max(0, t - n + 2):t + 1]
            want = np.array([reference(w, history) for w in range(model.config.vocab_size)])
            np.testing.assert_allclose(probs[b, t], want, rtol=1e-12, atol=1e-15)


def toy_rows(tokens, vocab, seed=0):
    rng = np.random.default_rng(seed)
    seen = tokens[100:112].reshape(2, 6)  # contexts from the training text
    unseen = rng.integers(0, vocab, size=(2, 6))  # mostly unseen contexts
    return np.concatenate([seen, unseen])


def test_kneser_ney_equals_the_textbook_formula(corpus_text):
    tokens = text_ids(corpus_text[:4000])
    vocab = V
    for n in (1, 2, 3, 4):
        model = fitted(tokens, order=n, smoothing="kneser-ney")
        ref = ReferenceKN(tokens.tolist(), n, vocab)
        assert model._fallback_orders == ref.fallback
        assert n < 3 or ref.fallback == [1]  # orders >= 2 have estimated discounts
        for k in range(1, n + 1):
            np.testing.assert_allclose(model._discounts[k - 1], ref.D[k][1:], rtol=1e-12)
        check_against(model, ref.prob, toy_rows(tokens, vocab))


def test_add_eps_equals_the_textbook_formula(corpus_text):
    tokens = text_ids(corpus_text[:4000])
    for n, eps in ((1, 1.0), (3, 0.1), (4, 0.01)):
        model = fitted(tokens, order=n, smoothing="add-eps", eps=eps)
        check_against(model, reference_add_eps(tokens.tolist(), n, V, eps), toy_rows(tokens, V, seed=n))
    # an unseen full context is uniform
    model = fitted(tokens, order=3, smoothing="add-eps", eps=0.5)
    unseen = np.array([[V - 3, V - 2]])  # two special ids never follow each other in the text
    np.testing.assert_allclose(model.probabilities(unseen)[0, 1], np.full(V, 1 / V), rtol=1e-12)


@pytest.mark.parametrize("smoothing", ["kneser-ney", "add-eps"])
def test_every_distribution_sums_to_one(ids, held_out, smoothing):
    model = fitted(ids, order=5, smoothing=smoothing, eps=0.05)
    rng = np.random.default_rng(1)
    rows = np.concatenate([ids[1000:1000 + 3 * 40].reshape(3, 40), held_out[:120].reshape(3, 40),
                           rng.integers(0, V, size=(3, 40))])
    probs = model.probabilities(rows)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-9)
    assert (probs > 0).all()


def test_discount_fallback_on_a_tiny_corpus():
    tokens = np.array([5, 6, 5, 6, 5, 6, 7, 5, 6])  # no count-of-counts n3, n4 at most orders
    model = NgramLM(NgramConfig(vocab_size=10, order=3))
    stats = model.fit(tokens, progress=False)
    assert stats["discount_fallback_orders"] and all(
        tuple(stats["discounts"][k - 1]) == FALLBACK_DISCOUNTS for k in stats["discount_fallback_orders"])
    probs = model.probabilities(np.array([[5, 6, 9, 5]]))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
    assert (probs > 0).all()
    strict = NgramLM(NgramConfig(vocab_size=10, order=3, discount_fallback=False))
    with pytest.raises(LmforgeError, match="cannot estimate the Kneser-Ney discounts of order"):
        strict.fit(tokens, progress=False)
    assert strict.num_params() == 0  # left as it was: empty, uniform
    np.testing.assert_allclose(strict.probabilities([[5]]), 0.1)


def test_fit_refuses_bad_input():
    model = NgramLM(NgramConfig(vocab_size=10, order=3))
    for bad, word in ((np.array([1, 2]), "at least 3"), (np.array([1, 2, 10, 3]), "outside the vocabulary"),
                      (np.array([[1, 2, 3]]), "1-D"), (np.array([1.0, 2.0, 3.0]), "integer")):
        with pytest.raises(LmforgeError, match=word):
            model.fit(bad, progress=False)


# ----------------------------------------------------------------------------- the model protocol


@pytest.fixture(scope="module")
def kn4(ids):
    return fitted(ids, order=4)


def test_forward_logits_and_loss(kn4, held_out):
    x = torch.from_numpy(held_out[:4 * 33].reshape(4, 33))
    inp, tgt = x[:, :-1], x[:, 1:]
    logits = kn4(inp)
    assert logits.dtype == torch.float32 and logits.shape == (4, 32, V)
    torch.testing.assert_close(torch.log_softmax(logits, -1), logits, atol=2e-6, rtol=0)
    torch.testing.assert_close(logits.double(), torch.from_numpy(np.log(kn4.probabilities(inp))), atol=1e-6, rtol=0)
    tgt = tgt.clone()
    tgt[0, :5] = -100
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100, reduction=reduction)
        got = kn4(inp, tgt, reduction=reduction)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        kn4(torch.tensor([[1, V]]))


def test_a_position_sees_only_the_previous_n_minus_1_ids_of_its_row(kn4, ids):
    x = torch.from_numpy(ids[5000:5040][None])  # training text: its longer contexts are seen
    full = kn4(x)
    for start in (1, 7, 20):
        part = kn4(x[:, start:])
        # from the 3rd position of the shorter row on, both see the same 3 previous ids
        torch.testing.assert_close(part[:, 2:], full[:, start + 2:], atol=0, rtol=0)
        assert not torch.equal(part[:, 0], full[:, start])  # the row start sees less


def test_prefill_decode_keep_extend_match_forward(kn4, held_out):
    rows = torch.from_numpy(held_out[:3 * 30].reshape(3, 30))
    want = kn4(rows)  # (3, 30, V)
    lengths = torch.tensor([5, 1, 9])
    prompts = torch.zeros(3, 9, dtype=torch.long)
    for b in range(3):
        prompts[b, :lengths[b]] = rows[b, :lengths[b]]
    state = kn4.new_cache(3)
    out = kn4.prefill(prompts, state, last=lengths - 1)
    for b in range(3):
        torch.testing.assert_close(out[b], want[b, lengths[b] - 1])
    pos = lengths.clone()
    for _ in range(6):
        out = kn4.decode(rows[torch.arange(3), pos][:, None], state, pos.tolist())
        for b in range(3):
            torch.testing.assert_close(out[b], want[b, pos[b]])
        pos += 1
    # keep rows (a repeat included), then extend with a fresh single-row state
    state.keep(torch.tensor([2, 0, 2]))
    other = kn4.new_cache(1)
    kn4.prefill(rows[1:2, :4], other)
    state.extend(other)
    assert state.batch_size == 4
    order = [2, 0, 2, 1]
    pos = torch.tensor([pos[2].item(), pos[0].item(), pos[2].item(), 4])
    out = kn4.decode(rows[order, pos][:, None], state, pos.tolist())
    for i, b in enumerate(order):
        torch.testing.assert_close(out[i], want[b, pos[i]])


@pytest.mark.parametrize("smoothing", ["kneser-ney", "add-eps"])
def test_an_unfitted_model_is_uniform(smoothing):
    for order in (1, 2, 3):
        model = NgramLM(NgramConfig(vocab_size=7, order=order, smoothing=smoothing))
        x = torch.tensor([[1, 2, 3, 4], [0, 6, 6, 5]])
        torch.testing.assert_close(model(x), torch.full((2, 4, 7), -math.log(7)))
        assert model(x, x).item() == pytest.approx(math.log(7), rel=1e-6)
        state = model.new_cache(2)
        model.prefill(x, state)
        torch.testing.assert_close(model.decode(x[:, :1], state, [4, 4]), torch.full((2, 7), -math.log(7)))


def test_accounting(kn4):
    assert not kn4.trainable and kn4.family == "ngram" and kn4.context_limit is None
    assert kn4.param_groups() == {} and list(kn4.parameters()) == []
    assert kn4.flops_per_token() == 0
    assert kn4.num_params() == sum(getattr(kn4, f"keys_{k}").numel() for k in range(1, 5)) > 0
    with pytest.raises(LmforgeError):
        kn4.hidden_states(torch.zeros(1, 2, dtype=torch.long))


def test_checkpoint_round_trip(kn4, held_out, tmp_path):
    from lmforge.train.checkpoint import load_model, save_checkpoint

    save_checkpoint(tmp_path / "checkpoints", 0, kn4, None, {})
    loaded, state = load_model(tmp_path)
    assert state["model_family"] == "ngram" and loaded.config == kn4.config
    x = torch.from_numpy(held_out[:2 * 50].reshape(2, 50))
    assert torch.equal(loaded(x), kn4(x))
    assert loaded.num_params() == kn4.num_params()

    sd = kn4.state_dict()
    empty = NgramLM(kn4.config)
    missing_keys, unexpected = empty.load_state_dict({**{k: v for k, v in sd.items() if k != "counts_2"},
                                                      "extra": torch.zeros(1)}, strict=False)
    assert missing_keys == ["counts_2"] and unexpected == ["extra"] and empty.num_params() == 0
    damaged = dict(sd, keys_3=sd["keys_3"].flip(0))
    with pytest.raises(LmforgeError, match="damaged: keys_3 is not strictly increasing"):
        empty.load_state_dict(damaged, strict=False)


def test_pretrain_fits_evaluates_and_checkpoints(tiny_data, tmp_path):
    from lmforge.stages.pretrain import PretrainOptions, pretrain
    from lmforge.train.checkpoint import load_model
    from lmforge.train.loop import TrainConfig

    result = pretrain(PretrainOptions(str(tiny_data), model="ngram", preset="kn3"),
                      TrainConfig(out_dir=str(tmp_path / "run"), device="cpu", progress=False))
    # a trigram model knows much more than the targets' own frequencies
    assert result["val_loss"] < context_free_loss(tiny_data, 8, 256, 65536) - 0.8
    model, state = load_model(tmp_path / "run")
    assert state["fit"]["ngrams_total"] == model.num_params() > 0
    assert state["model_config"]["order"] == 3


# ----------------------------------------------------------------------------- ARPA


def read_arpa(path):
    """n-gram tuple -> (log10 prob, log10 backoff) from an ARPA file."""
    table, in_section, declared = {}, False, {}
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("ngram "):
            k, c = line[6:].split("=")
            declared[int(k)] = int(c)
        elif line.endswith("-grams:"):
            in_section = True
        elif line and line != "\\end\\" and in_section:
            parts = line.split("\t")
            table[tuple(parts[1].split(" "))] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    assert sum(declared.values()) == len(table)
    return table


def arpa_log10(table, history, word):
    """The ARPA backoff rule: the longest listed n-gram, times the backoff weights of the contexts left."""
    history, backoff = tuple(history), 0.0
    while history + (word,) not in table:
        backoff += table.get(history, (0.0, 0.0))[1]
        history = history[1:]
    return backoff + table[history + (word,)][0]


def model_log10(model, row):
    return np.log10(model.target_probabilities(row[None, :-1], row[None, 1:])[0])


@pytest.mark.parametrize("order", [1, 3, 5])
def test_arpa_backoff_reproduces_the_model(ids, held_out, tmp_path, order):
    model = fitted(ids, order=order)
    words = arpa_token_text(TOK)
    write_arpa(model, tmp_path / "lm.arpa", words)
    table = read_arpa(tmp_path / "lm.arpa")
    assert table[("</s>",)][0] == table[("<unk>",)][0] == -99 and ("<s>",) in table
    row = held_out[:300]
    got = [arpa_log10(table, [words[i] for i in row[max(0, t - order + 2):t + 1]], words[row[t + 1]])
           for t in range(len(row) - 1)]
    np.testing.assert_allclose(got, model_log10(model, row), atol=1e-8, rtol=0)


def test_arpa_refuses_add_eps_and_bad_words(ids, tmp_path):
    with pytest.raises(LmforgeError, match="backoff model"):
        write_arpa(fitted(ids[:5000], order=3, smoothing="add-eps"), tmp_path / "x.arpa", arpa_token_text(TOK))
    model = fitted(ids[:5000], order=2)
    words = arpa_token_text(TOK)
    with pytest.raises(LmforgeError, match="without whitespace"):
        write_arpa(model, tmp_path / "x.arpa", words[:3] + ["a b"] + words[4:])
    with pytest.raises(LmforgeError, match="unique"):
        write_arpa(model, tmp_path / "x.arpa", [words[0]] + words[:-1])
    # order-1 add-eps is a plain unigram list: exportable
    unigram = fitted(ids[:5000], order=1, smoothing="add-eps")
    write_arpa(unigram, tmp_path / "u.arpa", words)
    table = read_arpa(tmp_path / "u.arpa")
    np.testing.assert_allclose([table[(w,)][0] for w in words], np.log10(unigram.probabilities([[0]])[0, 0]),
                               atol=1e-9)


def test_arpa_words_are_unique_and_whitespace_free():
    tok = Tokenizer([(60, 115), (256, 62)])  # a merge spelling "<s>" must not collide with bos
    words = arpa_token_text(tok)
    assert len(set(words)) == tok.vocab_size and words[tok.bos_id] == "<s>"
    assert not any(ch.isspace() for w in words for ch in w)
    assert words[257] != "<s>"


def test_kenlm_reads_the_export_with_the_same_probabilities(ids, held_out, tmp_path):
    try:
        import kenlm
    except ImportError:
        missing("the kenlm Python module", "pip install kenlm (builds from source, needs cmake/boost-free g++)")
    model = fitted(ids, order=4)
    words = arpa_token_text(TOK)
    write_arpa(model, tmp_path / "lm.arpa", words)
    lm = kenlm.Model(str(tmp_path / "lm.arpa"))
    assert lm.order == 4
    row = held_out[:400]  # starts with bos, which is <s>: kenlm's bos=True context
    scores = [s[0] for s in lm.full_scores(" ".join(words[i] for i in row[1:]), bos=True, eos=False)]
    np.testing.assert_allclose(scores, model_log10(model, row), atol=1e-4, rtol=0)
