"""Deduplication quality and speed (issue 21, benchmark 1): a corpus with planted near-duplicates.

    LMFORGE_SHARED_DATA=../shared/data python bench/curate_dedup.py [--originals 300] [--unrelated 3000] [--seed 0]

Data: $LMFORGE_SHARED_DATA (default ../shared/data): gutenberg/classics-sample-000 and children-000
(books cut into documents of consecutive paragraphs, 250-700 words, at least 3 paragraphs) and the
English documents of web-raw/dolma-cc-text (Common Crawl text) with at least 200 words. The pool is
made distinct first, independently of lmforge's code: a document sharing more than 5% of its word
5-grams (Python sets of word tuples) with an earlier one is dropped, so the only duplicates in the
corpus are the planted ones.

Corpus: `--originals` documents, each with six copies: 5%, 10%, 20% and 30% of its words edited at
random places (each edit a substitution, an insertion or a deletion of a word, uniformly), its
paragraphs in another order, and a header and a footer of web boilerplate around it (43-63 words
together); plus `--unrelated` documents of the pool; all shuffled. Run with the default DedupConfig.

Recall of a class: the fraction of its copies put in the same cluster as their original (then one of
the two is removed). Precision: the fraction of removed documents whose kept document is of the same
planted family. Also printed: the true Jaccard of each class's copies with their original (mean and
5th percentile), a sweep of the verification threshold and of bands x rows (same signatures), and
docs/s of the signatures (phase 1) on the corpus and on the raw dolma-cc-text, beside datatrove's
MinhashDedupSignature on the same dolma text, and of find_duplicates (phase 2) with both LSH backends;
and, as a check on real web text, what the defaults remove from the raw dolma-cc-text (no ground
truth there beyond its byte-identical duplicates).
Writes bench/out/curate_dedup.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.curate.dedup import DedupConfig, dedup_signature, find_duplicates, jaccard  # noqa: E402

DATA = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
CLASSES = ("edit05", "edit10", "edit20", "edit30", "reorder", "boilerplate")
EDIT_FRACTION = {"edit05": 0.05, "edit10": 0.10, "edit20": 0.20, "edit30": 0.30}
BOOK_FILES = ("gutenberg/classics-sample-000.jsonl.gz", "gutenberg/children-000.jsonl.gz")

# Boilerplate as a crawler finds it around the main text (written for this benchmark).
HEADERS = [
    "Home | News | Sport | Business | Culture | Travel | About us | Contact | Subscribe to our newsletter and "
    "never miss a story. Sign in or register for free.",
    "Skip to main content. Menu: Shop, Deals, Gift cards, Help, Your account, Track your order. Free delivery "
    "on orders over 50 dollars.",
    "You are here: Home > Library > Articles. Share this page on Facebook, Twitter, LinkedIn or by e-mail. "
    "Print this page.",
]
FOOTERS = [
    "This website uses cookies to improve your experience. By continuing to browse the site you agree to our "
    "use of cookies. Copyright 2019. All rights reserved. Privacy policy. Terms of use.",
    "Related posts: Previous article, Next article. Leave a comment below. Your e-mail address will not be "
    "published. Required fields are marked. Powered by WordPress.",
    "Follow us on social media. Download our app. Careers, Press, Advertise with us, Accessibility, Sitemap. "
    "Questions? Contact our support team any time.",
]


# -- the pool of distinct documents ---------------------------------------------------------------

def book_documents(rng: random.Random, per_book: int) -> list[str]:
    docs = []
    for name in BOOK_FILES:
        path = DATA / name
        if not path.is_file():
            sys.exit(f"error: {path} not found (set LMFORGE_SHARED_DATA)")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                chunks = chunk_book(json.loads(line)["text"])
                docs += rng.sample(chunks, min(per_book, len(chunks)))
    return docs


def chunk_book(text: str) -> list[str]:
    """Consecutive paragraphs (hard line breaks joined) grouped into documents of 250-700 words."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if len(p.split()) >= 8]  # drop headings and stray lines
    chunks, current, words = [], [], 0
    for p in paragraphs:
        n = len(p.split())
        if words + n > 700:
            if words >= 250 and len(current) >= 3:
                chunks.append("\n\n".join(current))
            current, words = [], 0
            if n > 700:
                continue
        current.append(p)
        words += n
    return chunks


def web_documents() -> list[str]:
    import langid

    files = sorted((DATA / "web-raw" / "dolma-cc-text").glob("*.jsonl.gz"))
    if not files:
        sys.exit(f"error: web-raw/dolma-cc-text not found under {DATA} (set LMFORGE_SHARED_DATA)")
    docs = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                paragraphs = [" ".join(p.split()) for p in text.split("\n") if p.strip()]
                if len(text.split()) >= 200 and len(paragraphs) >= 3 and langid.classify(text)[0] == "en":
                    docs.append("\n\n".join(paragraphs))
    return docs


def reference_shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"[^\W_]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def distinct(docs: list[str], max_shared: float = 0.05) -> tuple[list[str], int]:
    """Docs sharing at most `max_shared` of their 5-grams with every earlier kept doc (and the count dropped)."""
    seen: set = set()
    kept = []
    for text in docs:
        shingles = reference_shingles(text)
        if len(shingles & seen) <= max_shared * len(shingles):
            kept.append(text)
            seen |= shingles
    return kept, len(docs) - len(kept)


# -- planted copies -------------------------------------------------------------------------------

def edit_words(text: str, fraction: float, rng: random.Random, vocabulary: list[str]) -> str:
    """Edit round(fraction * words) distinct word positions: substitute, insert before, or delete."""
    paragraphs = [p.split() for p in text.split("\n\n")]
    positions = [(p, w) for p, words in enumerate(paragraphs) for w in range(len(words))]
    chosen = rng.sample(positions, round(fraction * len(positions)))
    # right to left inside a paragraph, so an edit does not shift the positions still to be edited
    for p, w in sorted(chosen, reverse=True):
        op = rng.choice(("substitute", "insert", "delete"))
        if op == "substitute":
            paragraphs[p][w] = rng.choice(vocabulary)
        elif op == "insert":
            paragraphs[p].insert(w, rng.choice(vocabulary))
        else:
            del paragraphs[p][w]
    return "\n\n".join(" ".join(words) for words in paragraphs if words)


def reorder(text: str, rng: random.Random) -> str:
    paragraphs = text.split("\n\n")
    order = list(range(len(paragraphs)))
    while order == sorted(order):
        rng.shuffle(order)
    return "\n\n".join(paragraphs[i] for i in order)


def add_boilerplate(text: str, rng: random.Random) -> str:
    return f"{rng.choice(HEADERS)}\n\n{text}\n\n{rng.choice(FOOTERS)}"


def build_corpus(args) -> tuple[list[str], list[str], dict[str, int | None], dict]:
    rng = random.Random(args.seed)
    pool = book_documents(rng, per_book=30) + web_documents()
    rng.shuffle(pool)
    pool, dropped = distinct(pool)
    need = args.originals + args.unrelated
    if len(pool) < need:
        sys.exit(f"error: only {len(pool)} distinct documents for {need}; ask for fewer")
    vocabulary = sorted({w for text in pool[:500] for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2})
    ids, texts, family = [], [], {}
    for o, text in enumerate(pool[:args.originals]):
        copies = {"original": text}
        for cls, fraction in EDIT_FRACTION.items():
            copies[cls] = edit_words(text, fraction, rng, vocabulary)
        copies["reorder"] = reorder(text, rng)
        copies["boilerplate"] = add_boilerplate(text, rng)
        for cls, copy in copies.items():
            ids.append(f"o{o}/{cls}")
            texts.append(copy)
            family[ids[-1]] = o
    for u, text in enumerate(pool[args.originals:need]):
        ids.append(f"u{u}")
        texts.append(text)
        family[ids[-1]] = None
    order = list(range(len(ids)))
    rng.shuffle(order)
    info = {"pool_distinct": len(pool), "pool_dropped_as_overlapping": dropped,
            "words_mean": round(float(np.mean([len(t.split()) for t in texts])), 1)}
    return [ids[i] for i in order], [texts[i] for i in order], family, info


# -- measurements ---------------------------------------------------------------------------------

def score(ids, family, result) -> dict:
    position = {i: k for k, i in enumerate(ids)}
    recall = {}
    for cls in CLASSES:
        copies = [i for i in ids if i.endswith("/" + cls)]
        found = [result.cluster.get(c) is not None
                 and result.cluster.get(c) == result.cluster.get(c.split("/")[0] + "/original") for c in copies]
        recall[cls] = sum(found) / len(found)
    removed = list(result.removed)
    correct = sum(family[r] is not None and family[r] == family[result.kept_id[r]] for r in removed)
    unrelated_removed = sum(family[r] is None for r in removed)
    assert all(not result.keep[position[r]] for r in removed)
    return {"recall": recall, "precision": correct / max(1, len(removed)), "removed": len(removed),
            "unrelated_removed": unrelated_removed, "stats": result.stats}


def true_jaccards(ids, sigs) -> dict:
    index = {i: k for k, i in enumerate(ids)}
    out = {}
    for cls in CLASSES:
        js = [jaccard(sigs[index[i]].shingles, sigs[index[i.split("/")[0] + "/original"]].shingles)
              for i in ids if i.endswith("/" + cls)]
        out[cls] = {"mean": float(np.mean(js)), "p5": float(np.percentile(js, 5)), "min": float(np.min(js))}
    return out


def signature_speed(texts: list[str], cfg: DedupConfig, repeat: int = 1) -> tuple[list, float, float]:
    dedup_signature("warm up the permutation cache", cfg)
    start = time.perf_counter()
    for _ in range(repeat):
        sigs = [dedup_signature(t, cfg) for t in texts]
    seconds = time.perf_counter() - start
    mb = repeat * sum(len(t.encode("utf-8")) for t in texts) / 1e6
    return sigs, repeat * len(texts) / seconds, mb / seconds


def datatrove_speed(texts: list[str]) -> dict | None:
    """datatrove's MinhashDedupSignature step (its defaults: 5-grams, 14 x 8 hashes) over the same texts."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.logging import logger
    except ImportError:
        return None
    logger.remove()  # its per-step log lines would bury the table
    docs = [Document(text=t, id=str(k)) for k, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as folder:
        step = MinhashDedupSignature(output_folder=folder, config=MinhashConfig())
        step.get_shingles("warm up the word tokenizer")
        start = time.perf_counter()
        out = step.run(iter(docs), rank=0, world_size=1)
        for _ in out or ():
            pass
        seconds = time.perf_counter() - start
    return {"docs_per_s": len(texts) / seconds, "mb_per_s": sum(len(t.encode()) for t in texts) / 1e6 / seconds,
            "num_perm": step.num_hashes}


def raw_web_texts() -> list[str]:
    texts = []
    for path in sorted((DATA / "web-raw" / "dolma-cc-text").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--originals", type=int, default=300)
    ap.add_argument("--unrelated", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-datatrove", action="store_true", help="skip datatrove's signature step")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "curate_dedup.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ids, texts, family, info = build_corpus(args)
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    cfg = DedupConfig()
    sigs, docs_s, mb_s = signature_speed(texts, cfg)
    report = {"config": cfg.__dict__, "corpus": {"documents": len(ids), "originals": args.originals,
                                                 "unrelated": args.unrelated, **info},
              "jaccard_of_copies": true_jaccards(ids, sigs)}
    results = {}
    for lsh in ("numpy", "datasketch"):
        start = time.perf_counter()
        results[lsh] = find_duplicates(ids, sigs, DedupConfig(lsh=lsh))
        report[f"phase2_{lsh}_docs_per_s"] = len(ids) / (time.perf_counter() - start)
    assert results["numpy"].removed == results["datasketch"].removed, "the two LSH backends disagree"
    report["default"] = score(ids, family, results["numpy"])

    sweep = []
    for bands, rows in ((64, 2), (32, 4), (16, 8)):
        for threshold in (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8):
            c = DedupConfig(bands=bands, rows=rows, threshold=threshold)
            s = score(ids, family, find_duplicates(ids, sigs, c))
            sweep.append({"bands": bands, "rows": rows, "threshold": threshold, **s})
    report["sweep"] = sweep

    web = raw_web_texts()
    web_sigs, web_docs_s, web_mb_s = signature_speed(web, cfg, repeat=3)
    raw = find_duplicates([str(k) for k in range(len(web))], web_sigs, cfg)
    report["raw_dolma_cc_text"] = {
        "documents": len(web), "byte_identical_duplicates": len(web) - len(set(web)),
        "exact_duplicates": raw.stats["exact_duplicates"], "near_duplicates": raw.stats["near_duplicates"],
        "near_similarity_to_kept": sorted(round(v, 3) for k, v in raw.similarity.items()
                                          if raw.removed[k] == "near_duplicate"),
    }
    report["signatures"] = {"planted_corpus": {"docs_per_s": docs_s, "mb_per_s": mb_s},
                            "dolma_cc_text": {"docs_per_s": web_docs_s, "mb_per_s": web_mb_s}}
    if not args.no_datatrove:
        report["signatures"]["datatrove_dolma_cc_text"] = datatrove_speed(web)

    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def print_report(r: dict) -> None:
    c, d = r["corpus"], r["default"]
    cfg = r["config"]
    print(f"corpus: {c['documents']} documents = {c['originals']} originals x (1 + {len(CLASSES)} copies) + "
          f"{c['unrelated']} unrelated; mean {c['words_mean']} words; pool {c['pool_distinct']} distinct "
          f"({c['pool_dropped_as_overlapping']} dropped as overlapping)")
    print(f"default config: ngram {cfg['ngram']}, {cfg['bands']} bands x {cfg['rows']} rows, "
          f"threshold {cfg['threshold']}\n")
    print("| copies | recall | true Jaccard mean | p5 | min | P(LSH candidate) at p5 |")
    print("|---|---|---|---|---|---|")
    dc = DedupConfig(**cfg)
    for cls in CLASSES:
        j = r["jaccard_of_copies"][cls]
        print(f"| {cls} | {d['recall'][cls]:.3f} | {j['mean']:.3f} | {j['p5']:.3f} | {j['min']:.3f} | "
              f"{dc.candidate_probability(j['p5']):.3f} |")
    print(f"\nprecision {d['precision']:.4f} ({d['removed']} removed, {d['unrelated_removed']} unrelated among them)")
    print("phase 2 stats:", ", ".join(f"{k} {v}" for k, v in d["stats"].items()))

    print("\nsweep (same signatures): recall edit05 / edit10 / edit20 / edit30 / reorder / boilerplate, precision")
    print("| bands x rows | threshold | " + " | ".join(CLASSES) + " | precision | candidates |")
    print("|---|---|" + "---|" * (len(CLASSES) + 2))
    for s in r["sweep"]:
        print(f"| {s['bands']} x {s['rows']} | {s['threshold']} | "
              + " | ".join(f"{s['recall'][k]:.3f}" for k in CLASSES)
              + f" | {s['precision']:.4f} | {s['stats']['candidate_pairs']} |")

    w = r["raw_dolma_cc_text"]
    print(f"\nraw dolma-cc-text ({w['documents']} web documents, {w['byte_identical_duplicates']} byte-identical "
          f"duplicates): {w['exact_duplicates']} removed as exact, {w['near_duplicates']} as near duplicates "
          f"(Jaccard with the kept document: {', '.join(map(str, w['near_similarity_to_kept']))})")

    sig = r["signatures"]
    print("\n| speed | docs/s | MB/s |")
    print("|---|---|---|")
    print(f"| signatures, planted corpus | {sig['planted_corpus']['docs_per_s']:.0f} | "
          f"{sig['planted_corpus']['mb_per_s']:.2f} |")
    print(f"| signatures, dolma-cc-text | {sig['dolma_cc_text']['docs_per_s']:.0f} | "
          f"{sig['dolma_cc_text']['mb_per_s']:.2f} |")
    dt = sig.get("datatrove_dolma_cc_text")
    if dt:
        print(f"| datatrove MinhashDedupSignature ({dt['num_perm']} hashes), dolma-cc-text | "
              f"{dt['docs_per_s']:.0f} | {dt['mb_per_s']:.2f} |")
    for lsh in ("numpy", "datasketch"):
        print(f"| find_duplicates, lsh = {lsh}, planted corpus | {r[f'phase2_{lsh}_docs_per_s']:.0f} | |")


if __name__ == "__main__":
    main()
