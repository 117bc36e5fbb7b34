"""Curation step 5 (lmforge/curate/dedup.py): exact and near-duplicate removal. The texts are written
by the tests; the references are Python sets of word 5-gram tuples (true Jaccard, all pairs by brute
force), datasketch's own MinHash and its MinHashLSH."""
from __future__ import annotations

import random
import re
from itertools import combinations

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.curate.dedup import (
    EXACT,
    NEAR,
    DedupConfig,
    Signature,
    SignatureBatch,
    dedup_signature,
    find_duplicates,
    jaccard,
    load_signatures,
    normalize,
    save_signatures,
)

CFG = DedupConfig()


def words_text(n: int, rng: random.Random, vocab: list[str]) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def make_vocab(rng: random.Random, size: int = 3000) -> list[str]:
    return sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                   for _ in range(size)})


def edit(words: list[str], count: int, rng: random.Random, vocab: list[str]) -> list[str]:
    """Substitute `count` distinct positions with other words."""
    out = list(words)
    for i in rng.sample(range(len(out)), count):
        out[i] = rng.choice([w for w in vocab[:50] if w != out[i]])
    return out


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    """The reference: Jaccard of the sets of word n-gram tuples, words as normalize() sees them."""
    def shingles(text):
        words = re.findall(r"[^\W_]+", text.lower())
        return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def run(texts: list[str], cfg: DedupConfig = CFG):
    ids = [f"d{i}" for i in range(len(texts))]
    return find_duplicates(ids, [dedup_signature(t, cfg) for t in texts], cfg)


@pytest.fixture(scope="module")
def prose():
    rng = random.Random(7)
    vocab = make_vocab(rng)
    return rng, vocab, [words_text(200, rng, vocab) for _ in range(6)]


def test_exact_duplicates_differ_in_case_whitespace_punctuation_and_digits():
    a = "The river rose quickly. On 3 May 2019 it flooded the lower town; page 1 of 12."
    b = "the   RIVER rose quickly\n\non 7 may 2020, it flooded -- the lower town! Page 2 of 15"
    c = "The river rose slowly. On 3 May 2019 it flooded the lower town; page 1 of 12."
    assert normalize(a) == normalize(b) == (
        b"the river rose quickly on 0 may 0000 it flooded the lower town page 0 of 00")
    r = run([a, "something else entirely here", b, c], DedupConfig(near=False))  # c: one word differs
    assert r.removed == {"d2": EXACT}
    assert r.kept_id == {"d2": "d0"} and r.similarity["d2"] == 1.0
    assert list(r.keep) == [True, True, False, True]
    assert r.stats["exact_duplicates"] == 1 and r.cluster_sizes == [2]


def test_near_duplicate_with_edited_words_found_unrelated_not(prose):
    rng, vocab, (base, other, *_) = prose
    near = edit(base, 4, rng, vocab)  # 2% of the words: J ~ 0.8
    texts = [" ".join(base), " ".join(other), " ".join(near)]
    assert true_jaccard(texts[0], texts[2]) > 0.7 and true_jaccard(texts[0], texts[1]) < 0.01
    r = run(texts)
    assert r.removed == {"d2": NEAR} and r.kept_id["d2"] == "d0"
    assert r.similarity["d2"] == pytest.approx(true_jaccard(texts[0], texts[2]), abs=0.01)
    assert "d1" not in r.cluster


def test_lsh_candidate_below_the_threshold_is_not_removed(prose):
    rng, vocab, (base, *_) = prose
    far = edit(base, 30, rng, vocab)  # 15% of the words: J ~ 0.25
    texts = [" ".join(base), " ".join(far)]
    j = true_jaccard(*texts)
    assert 0.15 < j < 0.35
    # 128 bands of 1 row: the pair is a candidate with probability 1 - (1 - J)^128 ~ 1
    strict = DedupConfig(bands=128, rows=1, threshold=0.5)
    r = run(texts, strict)
    assert r.stats["candidate_pairs"] == 1 and r.stats["rejected_pairs"] == 1
    assert r.removed == {} and all(r.keep)
    loose = DedupConfig(bands=128, rows=1, threshold=0.1)
    assert run(texts, loose).removed == {"d1": NEAR}


def test_transitive_cluster_keeps_exactly_one(prose):
    rng, vocab, _ = prose
    stream = words_text(500, rng, vocab)
    a, b, c = (" ".join(stream[s:s + 300]) for s in (0, 100, 200))  # windows overlapping by 200 words
    assert true_jaccard(a, b) > 0.45 and true_jaccard(b, c) > 0.45 and true_jaccard(a, c) < 0.25
    cfg = DedupConfig(threshold=0.4)
    r = run([a, "an unrelated short note", b, c], cfg)
    assert list(r.keep) == [True, True, False, False]
    assert r.removed == {"d2": NEAR, "d3": NEAR}
    assert r.kept_id == {"d2": "d0", "d3": "d0"}
    assert r.cluster["d0"] == r.cluster["d2"] == r.cluster["d3"] and r.cluster_sizes == [3]
    assert r.similarity["d3"] == pytest.approx(true_jaccard(a, c), abs=0.01)  # below the threshold: transitive


def test_matches_brute_force_all_pairs_jaccard():
    """Clusters equal those of the exact all-pairs Jaccard, on a corpus whose pairs are all well above
    (>= 0.45) or well below (<= 0.15) the threshold 0.3."""
    rng = random.Random(11)
    vocab = make_vocab(rng)
    texts = []
    for _ in range(40):
        base = words_text(rng.randint(60, 160), rng, vocab)
        texts.append(" ".join(base))
        for _ in range(rng.randint(0, 3)):
            light = rng.random() < 0.6  # light edits stay duplicates, heavy ones become distinct
            count = round(len(base) * (rng.uniform(0.0, 0.05) if light else rng.uniform(0.3, 0.5)))
            texts.append(" ".join(edit(base, count, rng, vocab)))
    order = list(range(len(texts)))
    rng.shuffle(order)
    texts = [texts[i] for i in order]
    n = len(texts)
    truth = {(i, j): true_jaccard(texts[i], texts[j]) for i, j in combinations(range(n), 2)}
    assert not [j for j in truth.values() if 0.15 < j < 0.45], "the corpus must leave a gap around 0.3"
    assert sum(j >= 0.45 for j in truth.values()) >= 20  # enough duplicate pairs to mean something

    sigs = [dedup_signature(t, CFG) for t in texts]
    for (i, j), ref in truth.items():  # the shingle hashes give the true Jaccard (32-bit: no collisions here)
        assert jaccard(sigs[i].shingles, sigs[j].shingles) == pytest.approx(ref, abs=1e-9)
    errors = [np.mean(sigs[i].minhash == sigs[j].minhash) - ref for (i, j), ref in truth.items()]
    assert np.mean(np.abs(errors)) < 0.03  # MinHash estimates the Jaccard (128 permutations)

    parent = list(range(n))  # reference clusters: union-find over the true pairs >= 0.3, first kept
    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for (i, j), ref in truth.items():
        if ref >= 0.3:
            ri, rj = root(i), root(j)
            parent[max(ri, rj)] = min(ri, rj)
    expected = [root(i) for i in range(n)]

    ids = [f"d{i}" for i in range(n)]
    r = find_duplicates(ids, sigs, CFG)
    assert list(r.keep) == [expected[i] == i for i in range(n)]
    assert r.kept_id == {ids[i]: ids[expected[i]] for i in range(n) if expected[i] != i}
    assert sorted(r.cluster_sizes) == sorted(c for c in np.bincount(expected) if c >= 2)


def test_minhash_equals_datasketch():
    from datasketch import MinHash

    text = "Shingles of this sentence are hashed, then permuted the way datasketch does it. " * 3 + "end"
    for num_perm, seed in ((128, 1), (64, 12345)):
        cfg = DedupConfig(num_perm=num_perm, bands=num_perm // 2, rows=2, seed=seed)
        sig = dedup_signature(text, cfg)
        ref = MinHash(num_perm=num_perm, seed=seed, scheme="affine32", hashfunc=lambda x: x)
        ref.update_batch(sig.shingles.tolist())
        assert sig.minhash.dtype == np.uint32
        np.testing.assert_array_equal(sig.minhash, ref.hashvalues)


def test_numpy_and_datasketch_lsh_agree():
    rng = random.Random(3)
    vocab = make_vocab(rng)
    texts = []
    for _ in range(30):
        base = words_text(rng.randint(40, 120), rng, vocab)
        texts += [" ".join(base)] + [" ".join(edit(base, rng.randint(1, 25), rng, vocab))
                                     for _ in range(rng.randint(0, 2))]
    for bands, rows in ((64, 2), (32, 4)):
        a = run(texts, DedupConfig(bands=bands, rows=rows, lsh="numpy"))
        b = run(texts, DedupConfig(bands=bands, rows=rows, lsh="datasketch"))
        assert a.stats == b.stats and a.removed == b.removed and a.kept_id == b.kept_id
        assert a.stats["candidate_pairs"] > a.stats["verified_pairs"] > 0


def test_short_and_empty_documents():
    short = "The quick brown"
    assert len(dedup_signature(short, CFG).shingles) == 1  # fewer words than ngram: one shingle, all of them
    assert len(dedup_signature("The quick brown fox jumps over", CFG).shingles) == 2
    empty = dedup_signature("  ... !!! ", CFG)
    assert len(empty.shingles) == 0 and empty.minhash.shape == (CFG.num_perm,)
    texts = ["The quick brown", "the QUICK, brown!", "the quick red", "The quick brown fox jumps over",
             "", "?!", "quick brown"]
    r = run(texts)
    # equal after normalisation: exact; otherwise a short text matches nothing (its one shingle differs)
    assert r.removed == {"d1": EXACT, "d5": EXACT}
    assert r.kept_id == {"d1": "d0", "d5": "d4"}


def test_long_documents_are_hashed_in_segments_with_the_same_result(monkeypatch, prose):
    from lmforge.curate import dedup

    _, _, docs = prose
    text = " ".join(docs[0] + ["x" * 100] + docs[1])  # one word longer than a segment
    whole = dedup_signature(text, CFG)
    monkeypatch.setattr(dedup, "_SEGMENT", 64)  # ~10 words per segment instead of 1 MB
    segmented = dedup_signature(text, CFG)
    np.testing.assert_array_equal(whole.shingles, segmented.shingles)
    np.testing.assert_array_equal(whole.minhash, segmented.minhash)
    assert len(whole.shingles) == len(docs[0]) + len(docs[1]) + 1 - 4


def test_exact_only_and_near_only():
    text = " ".join(f"word{i % 37}x{i}" for i in range(120))
    texts = [text, text.upper(), text + " and a tail of words"]
    exact_only = DedupConfig(near=False)
    sig = dedup_signature(text, exact_only)
    assert len(sig.minhash) == 0 and len(sig.shingles) == 0  # nothing computed that will not be used
    r = run(texts, exact_only)
    assert r.removed == {"d1": EXACT}
    near_only = DedupConfig(exact=False)
    r = run(texts, near_only)
    assert r.removed == {"d1": NEAR, "d2": NEAR} and r.similarity["d1"] == 1.0
    with pytest.raises(LmforgeError, match="num_perm"):
        find_duplicates(["a"], [dedup_signature(text, exact_only)], CFG)
    off = run(texts, DedupConfig(enabled=False))
    assert off.removed == {} and all(off.keep)


def test_big_bucket_still_one_cluster():
    """More members than _ALL_PAIRS_MAX_BUCKET in one bucket: pairs to the first and to the
    predecessor only, not all 100 * 99 / 2 of them, and still one cluster."""
    rng = random.Random(5)
    vocab = make_vocab(rng)
    base = words_text(300, rng, vocab)
    texts = [" ".join(base)] + [" ".join(edit(base, 1, rng, vocab)) for _ in range(99)]
    r = run(texts)
    assert r.cluster_sizes == [100] and r.stats["near_duplicates"] + r.stats["exact_duplicates"] == 99
    assert set(r.kept_id.values()) == {"d0"}
    assert r.stats["candidate_pairs"] < 100 * 99 // 2


def test_save_load_round_trip(tmp_path):
    texts = ["Première phrase, avec des accents : été, çà.", "second document " * 20, "", "x"]
    ids = ["doc/é", "2", "3:empty", "four"]
    sigs = [dedup_signature(t, CFG) for t in texts]
    path = tmp_path / "shard" / "signatures.npz"
    save_signatures(path, ids, sigs)
    got_ids, batch = load_signatures(path)
    assert got_ids == ids and isinstance(batch, SignatureBatch) and len(batch) == 4
    for mine, loaded in zip(sigs, batch):
        assert isinstance(loaded, Signature) and mine.exact == loaded.exact
        np.testing.assert_array_equal(mine.minhash, loaded.minhash)
        np.testing.assert_array_equal(mine.shingles, loaded.shingles)
    assert not list(tmp_path.glob("shard/.*"))  # the temporary file was renamed away
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert all(z[k].dtype != object for k in z.files)

    # shards concatenated, or extended into one list, give the same result as the signatures in memory
    more = ["second document " * 20 + "more", "Première phrase, avec des accents : été, çà."]
    save_signatures(tmp_path / "b.npz", ["5", "6"], [dedup_signature(t, CFG) for t in more])
    ids2, batch2 = load_signatures(tmp_path / "b.npz")
    direct = find_duplicates(ids + ids2, sigs + [dedup_signature(t, CFG) for t in more], CFG)
    assert direct.removed == {"6": EXACT, "5": NEAR}
    assert find_duplicates(ids + ids2, SignatureBatch.concat([batch, batch2]), CFG).removed == direct.removed
    assert find_duplicates(ids + ids2, list(batch) + list(batch2), CFG).removed == direct.removed

    save_signatures(tmp_path / "empty.npz", [], [])  # a shard whose documents were all filtered out
    e_ids, e_batch = load_signatures(tmp_path / "empty.npz")
    assert e_ids == [] and len(e_batch) == 0
    assert find_duplicates(ids, SignatureBatch.concat([e_batch, batch]), CFG).removed == {}


def test_bad_files_and_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        load_signatures(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(LmforgeError, match="junk.npz"):
        load_signatures(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(LmforgeError, match="not an lmforge dedup signature file"):
        load_signatures(tmp_path / "other.npz")
    sig = dedup_signature("some words here", CFG)
    with pytest.raises(LmforgeError, match="not unique"):
        find_duplicates(["a", "a"], [sig, sig], CFG)
    with pytest.raises(LmforgeError, match="2 ids for 1"):
        find_duplicates(["a", "b"], [sig], CFG)


@pytest.mark.parametrize("kwargs, message", [
    ({"bands": 16, "rows": 8, "num_perm": 100}, r"bands \* rows must equal num_perm: 16 \* 8 = 128, num_perm = 100"),
    ({"threshold": 0.0}, "threshold"),
    ({"ngram": 0}, "ngram"),
    ({"lsh": "faiss"}, "lsh must be one of numpy, datasketch"),
    ({"seed": -1}, "seed"),
])
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(LmforgeError, match=message) as e:
        DedupConfig(**kwargs)
    assert "\n" not in str(e.value) and str(e.value).startswith("dedup.")


def test_lsh_probability_matches_s_curve():
    cfg = DedupConfig()
    assert cfg.candidate_probability(0.3) > 0.99  # the default threshold is a near-certain candidate
    assert cfg.candidate_probability(0.05) < 0.2
    assert cfg.candidate_probability((1 / cfg.bands) ** (1 / cfg.rows)) == pytest.approx(1 - (1 - 1 / 64) ** 64)
