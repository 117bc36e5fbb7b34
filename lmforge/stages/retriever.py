"""Training lmforge's retrievers from an encoder: the bi-encoder (InfoNCE with in-batch and hard
negatives) and the cross-encoder re-ranker (listwise over a positive and its hard negatives). The
models and their losses are in lmforge/retrieval/biencoder.py; this is their data and their stage
on the shared Trainer (checkpoints, resume, torchrun, logs).

Data: a retrieval collection's training judgements (`--dataset`, `--split`: SciFact's 809 training
claims, or SQuAD's even-numbered articles). A query's positives are its relevant documents; its
hard-negative pool is BM25's top 30 for it minus every relevant document (at most 20 kept), mined
once before training. Each time a query is drawn, one positive and `hard_negatives` negatives from
its pool are chosen at random (a query whose pool is short is topped up with random documents).
`val_fraction` of the queries (by a hash of their ids) are held out; evaluation reports the loss and
the accuracy of those queries' batches, built the same way with a fixed seed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.data.rows import MixtureSampler, ProcessShare
from lmforge.models.heads import ModelWithHead
from lmforge.retrieval.biencoder import info_nce, listwise_loss, pad_rows, pair_ids
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.loop import RunningMetrics
from lmforge.train.stage import Start, run_stage, stage_device

MINE_DEPTH = 30  # BM25 candidates read per training query
POOL = 20  # hard negatives kept per query


class BiEncoder(ModelWithHead):
    """The encoder itself, trained to embed: forward(ids, mask) -> normalised (B, H) vectors. No
    head, so its checkpoint is an encoder checkpoint (`load_model` reads it); the masked-token
    output layer is frozen (no gradient reaches it) but kept, so the checkpoint stays whole."""

    head_kind = "biencoder"
    head_modules = ()
    loads_as_language_model = True

    def __init__(self, encoder):
        super().__init__(encoder)
        if getattr(encoder, "family", None) != "encoder":
            raise LmforgeError(f"a bi-encoder is trained from an encoder (lmforge pretrain --arch encoder), not a "
                               f"{getattr(encoder, 'family', '?')} model")
        params = dict(encoder.named_parameters(remove_duplicate=False))
        for name in encoder.output_head_names():
            params[name].requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.embed_texts(ids, mask).float(), dim=-1)


def _held_out(qid: str, fraction: float) -> bool:
    return int(hashlib.sha1(qid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def mine_training_queries(dataset, tok, query_len: int, passage_len: int, log=print):
    """(queries, passages): queries = [(qid, query tokens, positive doc indices, negative pool)],
    passages = token lists (no <|bos|>) of every corpus document, cut to passage_len - 1."""
    from lmforge.retrieval.bm25 import BM25Retriever

    doc_ids = list(dataset.corpus)
    position = {d: i for i, d in enumerate(doc_ids)}
    texts = [dataset.corpus[d].full_text() for d in doc_ids]
    bm25 = BM25Retriever()
    bm25.index(doc_ids, texts)
    qids = [q for q in dataset.queries if any(r > 0 and d in position for d, r in dataset.qrels.get(q, {}).items())]
    if not qids:
        raise LmforgeError(f"{dataset.name}: no query has a relevant document in the corpus; nothing to train on")
    hits = bm25.search([dataset.queries[q] for q in qids], MINE_DEPTH)
    queries = []
    for q, found in zip(qids, hits):
        relevant = {d for d, r in dataset.qrels[q].items() if r > 0}
        positives = [position[d] for d in relevant if d in position]
        pool = [position[d] for d, _ in found if d not in relevant][:POOL]
        queries.append((q, tok.encode(dataset.queries[q])[:query_len], positives, pool))
    passages = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    passages = [p[: passage_len - 1] for p in passages]
    mean_pool = sum(len(x[3]) for x in queries) / len(queries)
    log(f"data: {dataset.name}: {len(queries)} training queries, {len(passages)} passages, "
        f"{mean_pool:.1f} BM25 hard negatives per query")
    return queries, passages


class RetrieverTask:
    """Shuffled passes over the training queries, each drawn with one positive and `n_neg` hard
    negatives; a batch is built by `rows` (bi-encoder: separate texts; cross-encoder: pairs)."""

    def __init__(self, queries, passages, tok, opts, *, seed: int, device: str, pair: bool):
        self.share = ProcessShare()
        val = [q for q in queries if _held_out(q[0], opts.val_fraction)]
        train = [q for q in queries if not _held_out(q[0], opts.val_fraction)]
        if not train:
            raise LmforgeError("every training query was held out: lower --val-fraction")
        self.train, self.val = train, val[: opts.max_val]
        self.passages, self.tok, self.opts = passages, tok, opts
        self.n_neg, self.pair, self.device, self.seed = opts.hard_negatives, pair, device, seed
        self.sampler = MixtureSampler([len(train)], [1.0], seed)
        self.draws = 0
        self.metrics = RunningMetrics()

    # ------------------------------------------------------------------ batches

    def _choose(self, query, rng) -> list[int]:
        """[positive, negatives...] document indices for one query."""
        _, _, positives, pool = query
        chosen = [positives[rng.integers(len(positives))]]
        take = list(rng.permutation(pool)[: self.n_neg]) if pool else []
        while len(take) < self.n_neg:  # a short pool: random documents that are not relevant
            d = int(rng.integers(len(self.passages)))
            if d not in positives and d not in take:
                take.append(d)
        return chosen + [int(d) for d in take]

    def _batch(self, queries, rng):
        docs = [self._choose(q, rng) for q in queries]
        bos = self.tok.bos_id
        if self.pair:  # groups of (query, positive), (query, negative 1), ...
            rows = [pair_ids(self.tok, q[1], self.passages[d], self.opts.passage_len) for q, ds in zip(queries, docs)
                    for d in ds]
        else:  # queries, then every positive, then every hard negative: one forward pass
            rows = [[bos] + q[1] for q in queries] + [[bos] + self.passages[ds[0]] for ds in docs] + \
                   [[bos] + self.passages[d] for ds in docs for d in ds[1:]]
        return (*pad_rows(rows, self.tok.pad_id, self.device), len(queries))

    def next_batch(self):
        mine, _ = self.share.batch(self.sampler.next, self.opts.batch_size)
        rng = np.random.default_rng((self.seed, self.draws, self.share.rank))
        self.draws += 1
        return self._batch([self.train[i] for _, i in mine], rng)

    # ------------------------------------------------------------------ loss and evaluation

    def _loss(self, model, batch):
        ids, mask, b = batch
        out = model(ids, mask)
        if self.pair:
            return listwise_loss(out, 1 + self.n_neg)
        return info_nce(out[:b], out[b:], self.opts.temperature)

    def loss(self, model, batch):
        loss, acc = self._loss(model, batch)
        self.metrics.add(accuracy=acc.item())
        return loss, int(batch[1].sum().item())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        mine = self.share.items(self.val)
        loss = correct = n = 0.0
        for k in range(0, len(mine), self.opts.batch_size):
            chunk = mine[k:k + self.opts.batch_size]
            batch = self._batch(chunk, np.random.default_rng((self.seed, k)))
            l_, a = self._loss(model, batch)
            loss += l_.item() * len(chunk)
            correct += a.item() * len(chunk)
            n += len(chunk)
        loss, correct, n = all_reduce_sum([loss, correct, n], self.device)
        return {"loss": loss / n, "accuracy": correct / n} if n else {}

    def train_metrics(self) -> dict[str, float]:
        return self.metrics.pop()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.draws = int(state["draws"])


def load_encoder_start(checkpoint) -> Start:
    """The encoder run a retriever starts from (an encoder cannot decode, so not load_start)."""
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint

    base = resolve_checkpoint(checkpoint)
    model, _ = load_model(base)
    if model.family != "encoder":
        raise LmforgeError(f"{base} holds a {model.family} model; retrievers start from an encoder "
                           "(lmforge pretrain --arch encoder)")
    return Start(model.float(), load_checkpoint_tokenizer(base), base)


def _check_lengths(opts, model, pair: bool):
    limit = model.context_limit
    if opts.passage_len > limit:
        raise LmforgeError(f"--passage-len {opts.passage_len} is longer than the encoder's context window ({limit})")
    if pair and opts.query_len + 2 >= opts.passage_len:
        raise LmforgeError(f"--query-len {opts.query_len} leaves no room for the passage in --passage-len "
                           f"{opts.passage_len}")
    if not pair and opts.query_len > limit:
        raise LmforgeError(f"--query-len {opts.query_len} is longer than the encoder's context window ({limit})")


def train_retriever(kind: str, opts, train_cfg, log=print) -> dict:
    """kind "biencoder" or "cross-encoder": train from opts.checkpoint (an encoder) on opts.dataset."""
    from lmforge.retrieval.biencoder import CrossEncoder
    from lmforge.retrieval.datasets import load_dataset

    pair = kind == "cross-encoder"
    start = load_encoder_start(opts.checkpoint)
    _check_lengths(opts, start.model, pair)
    if pair and opts.hard_negatives < 1:
        raise LmforgeError("the re-ranker learns from hard negatives: --hard-negatives must be at least 1")
    dataset = load_dataset(opts.dataset, opts.split)
    queries, passages = mine_training_queries(dataset, start.tokenizer, opts.query_len, opts.passage_len, log)
    device = stage_device(train_cfg)
    model = CrossEncoder(start.model) if pair else BiEncoder(start.model)
    task = RetrieverTask(queries, passages, start.tokenizer, opts, seed=train_cfg.seed, device=device, pair=pair)
    log(f"data: {len(task.train)} queries to train on, {len(task.val)} held out")
    settings = {k: v for k, v in asdict(opts).items() if k not in ("checkpoint", "resume")}
    extra = {**settings, "pair_len": opts.passage_len, "head": model.head_record()}
    result = run_stage(kind, model, task, train_cfg, start=start, extra=extra, resume=opts.resume, start_eval=True)
    if not pair:  # the folder a RAG index recognises as a bi-encoder
        Path(train_cfg.out_dir, "biencoder.json").write_text(json.dumps({"stage": kind, **settings}, indent=1) + "\n")
    return result
