"""Time and memory of fitting counted n-gram models (lmforge/models/ngram.py).

    python bench/ngram_count.py                 # the stdlib corpus, a 4096-id BPE tokenizer, kn5 and kn7
    python bench/ngram_count.py --random        # uniform random ids instead (the worst case: nearly
                                                # every n-gram distinct)

Prints, per model: seconds to fit, distinct n-grams per order, bytes held, and (real text) the
validation bits per byte on the last 5% of the tokens."""
from __future__ import annotations

import argparse
import math
import resource
import time

import numpy as np
import torch

from lmforge.models.ngram import NgramConfig, NgramLM


def stdlib_tokens(n_tokens: int, vocab_size: int):
    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import Tokenizer

    docs, total = [], 0
    for doc in iter_documents("stdlib"):
        docs.append(doc)
        total += len(doc)
        if total > 4.5 * n_tokens:  # ~3-4 characters per token at this vocabulary
            break
    t0 = time.perf_counter()
    tok = Tokenizer.train(docs, vocab_size, show_progress=False)
    ids = []
    for enc in tok.encode_batch(docs, num_threads=1):
        ids.append(tok.bos_id)
        ids.extend(enc)
    print(f"tokenizer: {tok.vocab_size} ids, {len(ids):,} tokens of {total:,} characters "
          f"({time.perf_counter() - t0:.0f} s)")
    return np.array(ids[:n_tokens], dtype=np.int64), tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=3_300_000)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--orders", default="5,7")
    ap.add_argument("--random", action="store_true")
    args = ap.parse_args()
    if args.random:
        ids, tok = np.random.default_rng(0).integers(0, args.vocab, args.tokens), None
    else:
        ids, tok = stdlib_tokens(args.tokens, args.vocab)
    split = int(len(ids) * 0.95)
    train, val = ids[:split], ids[split:]
    for order in map(int, args.orders.split(",")):
        model = NgramLM(NgramConfig(vocab_size=tok.vocab_size if tok else args.vocab, order=order))
        stats = model.fit(train, progress=False)
        line = (f"kn{order}: fit {stats['seconds']:.1f} s on {len(train):,} tokens, "
                f"{stats['ngrams_total']:,} n-grams {stats['ngrams']}, {stats['memory_bytes'] / 2**20:.0f} MiB held, "
                f"fallback orders {stats['discount_fallback_orders']}")
        if tok is not None:
            T = 256
            rows = torch.from_numpy(val[: (len(val) - 1) // T * T + 1])
            x, y = rows[:-1].view(-1, T), rows[1:].view(-1, T)
            t0 = time.perf_counter()
            nll = model(x, y, reduction="sum").item()
            nbytes = int(tok.token_byte_lengths()[y.numpy()].sum())
            line += (f"; val {y.numel():,} tokens: {nll / y.numel():.3f} nats/token, "
                     f"{nll / math.log(2) / nbytes:.3f} bits/byte ({time.perf_counter() - t0:.1f} s)")
        print(line, flush=True)
        del model
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
