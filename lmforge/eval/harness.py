"""Scoring any causal language model: one small adapter interface, one log-likelihood function.

The task code (multiple choice, generation, perplexity, the judge) talks only to an `EvalModel`:

    encode(text) -> ids          plain text to token ids, no special tokens
    prefix_ids                   the ids every text is conditioned on (lmforge: <|bos|>)
    logits(ids)                  (B, T) ids -> (B, T, V) float32 logits
    generate(prompts, ...)       greedy continuations of text prompts, cut at stop strings
    max_length                   the context window

Two adapters implement it: `LmforgeModel` (a checkpoint, generation through the KV-cached
`Engine`) and `HFModel` (a local Hugging Face folder loaded with transformers), so the same task
code scores both, and the tests can hold one to the other.

`loglikelihoods` follows lm-evaluation-harness's conventions, so numbers are comparable:
trailing spaces of the context move to the continuation, the pair is tokenized as one string
and split where the context's own tokens end, and a sequence longer than the window loses tokens
from the left. Requests are sorted by length and the rows of a batch run in one forward pass. For
lmforge models, the choices of a question with short answers run their shared context once
(`LmforgeModel.score_shared`: prefill into the KV cache, then cached decode steps).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.protocol import require_text_probabilities, scoring_window


class EvalModel(Protocol):
    name: str
    max_length: int
    prefix_ids: list[int]
    device: torch.device

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def generate(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (),
                 chat: bool = False) -> list[str]: ...

    def num_params(self) -> int: ...


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else text


class LmforgeModel:
    """An lmforge model of any family with its tokenizer. dtype "bf16" runs under autocast (faster on GPUs)."""

    def __init__(self, model, tokenizer, *, name: str = "lmforge", dtype: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = dtype
        # Texts are scored in windows of the context window (a fixed size for a model without one).
        self.max_length = scoring_window(model)
        self.prefix_ids = [tokenizer.bos_id]
        self.device = model.device
        self.config = model.config
        # The window length pretraining trained and validated on (its checkpoint's state), so that
        # `eval --data-dir` repeats pretraining's validation exactly; None when not known.
        self.train_seq_len: int | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "fp32") -> LmforgeModel:
        from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

        model, state = load_model(path, device=device)
        lm = cls(model, load_checkpoint_tokenizer(path), name=str(path), dtype=dtype)
        seq_len = state.get("seq_len")  # a fine-tuning stage's is its longest example, not a window
        if state.get("stage", "pretrain") == "pretrain" and isinstance(seq_len, int) and seq_len > 0:
            lm.train_seq_len = seq_len
        return lm

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        require_text_probabilities(self.model, "scoring continuations")
        if getattr(self.model, "generation", "") == "diffusion":
            # Its logits predict masked tokens, not the next one: scoring them as next-token
            # log-probabilities would be silently wrong.
            raise LmforgeError("a masked diffusion model has no next-token log-probabilities for "
                               "multiple-choice benchmarks; evaluate it with `lmforge eval --data-dir` "
                               "(its bound) or `lmforge score`")
        with self._autocast():
            return self.model(ids.to(self.device)).float()

    @torch.inference_mode()
    def score_shared(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[torch.Tensor, bool]]]:
        """Score several continuations of one context with the context run once: prefill every
        group's context into the model's decode state (one row per group), copy each row once per continuation,
        then feed the continuations token by token through cached decode steps. groups: (context
        ids, [continuation ids]); every context + continuation must fit the window. Returns per
        group and continuation (per-token log-probs, all tokens greedy)."""
        model = self.model
        ctx_lens = [len(c) for c, _ in groups]
        rows = [(g, cont) for g, (_, conts) in enumerate(groups) for cont in conts]
        max_len = max(ctx_lens[g] + len(cont) - 1 for g, cont in rows)
        dev = self.device
        with self._autocast():
            cache = model.new_cache(len(groups), max(max_len, max(ctx_lens)),
                                    torch.bfloat16 if self.dtype == "bf16" else None)
            width = max(ctx_lens)
            idx = torch.tensor([c + [0] * (width - len(c)) for c, _ in groups], dtype=torch.long, device=dev)
            first = model.prefill(idx, cache, torch.tensor([n - 1 for n in ctx_lens], device=dev))
            owner = torch.tensor([g for g, _ in rows], device=dev)
            cache.keep(owner)
            # Keep only each row's target log-prob and whether it was the top token, not vocab-sized rows.
            tok_lp: list[list[torch.Tensor]] = [[] for _ in rows]
            greedy = [True] * len(rows)

            def take(logits: torch.Tensor, live: list[int], t: int) -> None:
                logp = F.log_softmax(logits.float(), dim=-1)
                target = torch.tensor([rows[r][1][t] for r in live], device=logp.device)
                picked = logp.gather(1, target[:, None]).squeeze(1)
                top = (logp.argmax(-1) == target).tolist()
                for j, r in enumerate(live):
                    tok_lp[r].append(picked[j])
                    greedy[r] = greedy[r] and top[j]

            live = list(range(len(rows)))
            take(first[owner], live, 0)
            t = 1
            while True:
                keep = [j for j, r in enumerate(live) if len(rows[r][1]) > t]  # rows with tokens left
                if not keep:
                    break
                if len(keep) < len(live):
                    live = [live[j] for j in keep]
                    cache.keep(torch.tensor(keep, device=dev))
                tokens = torch.tensor([[rows[r][1][t - 1]] for r in live], device=dev)
                take(model.decode(tokens, cache, [ctx_lens[rows[r][0]] + t - 1 for r in live]), live, t)
                t += 1
        results: list[list[tuple[torch.Tensor, bool]]] = [[] for _ in groups]
        for r, (g, _) in enumerate(rows):
            results[g].append((torch.stack(tok_lp[r]), greedy[r]))
        return results

    def generate(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (),
                 chat: bool = False) -> list[str]:
        """Greedy, batched through the engine; each row stops at a stop string, end of text or end
        of turn. Prompts longer than the window keep their last tokens. chat=True sends each prompt
        as a user turn of the chat template."""
        from lmforge.chat import render_messages
        from lmforge.inference.engine import Engine

        room = self.max_length - max_new_tokens
        if room < 2:
            raise LmforgeError(f"max new tokens {max_new_tokens} leaves no room for a prompt in the "
                               f"{self.max_length}-token context window")
        if chat:
            ids = [render_messages(self.tokenizer, [{"role": "user", "content": p}])[-room:] for p in prompts]
        else:
            ids = [(self.prefix_ids + self.encode(p))[-room:] for p in prompts]
        # bf16: the weights are cast once (then scoring's autocast has nothing left to cast); fp32
        # leaves them as loaded, so an imported bf16 model is not doubled in memory.
        engine = Engine(self.model, self.tokenizer, dtype="bf16" if self.dtype == "bf16" else None)
        outs = engine.generate(ids, max_new_tokens, temperature=0.0, stop_strings=tuple(stop))
        return [c.text for c in outs]

    def num_params(self) -> int:
        return self.model.num_params()


class HFModel:
    """A local Hugging Face causal LM folder (config.json + weights + tokenizer), via transformers."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "fp32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise LmforgeError(f"{path} is not a Hugging Face model folder (no config.json)")
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        except (OSError, ValueError) as e:
            raise LmforgeError(f"cannot load {path} with transformers: {e}") from None
        self.name = str(path)
        self.device = torch.device(device)
        cfg = self.model.config
        self.max_length = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
        # Condition on a document start exactly when the tokenizer itself adds one (Llama, lmforge
        # exports); otherwise no prefix, and the end-of-text token stands in for an empty context.
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a")["input_ids"]
        bos = self.tokenizer.bos_token_id
        self.prefix_ids = [bos] if bos is not None and full[:1] == [bos] and plain[:1] != [bos] else []
        self.empty_context_ids = self.prefix_ids or [self.tokenizer.eos_token_id]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device)).logits.float()

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = (),
                 chat: bool = False) -> list[str]:
        """Greedy, one prompt at a time (a plain loop is enough for a reference path). chat=True
        applies the tokenizer's chat template, when it has one."""
        room = self.max_length - max_new_tokens
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        outs = []
        for p in prompts:
            if chat and getattr(self.tokenizer, "chat_template", None):
                ids = list(self.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                              add_generation_prompt=True, tokenize=True,
                                                              return_dict=False))[-room:]
            else:
                ids = (self.prefix_ids + self.encode(p))[-room:]
            x = torch.tensor([ids], device=self.device)
            y = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=pad)
            outs.append(_cut_at_stop(self.tokenizer.decode(y[0, len(ids):], skip_special_tokens=True), stop))
        return outs

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_eval_model(path: str | Path, device: str = "cpu", dtype: str = "fp32") -> EvalModel:
    """An lmforge checkpoint (run folder or checkpoint folder) or a Hugging Face model folder."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"model not found: {path} (give an lmforge run/checkpoint folder or a "
                           "Hugging Face model folder)")
    if (path / "config.json").is_file() and not (path / "state.json").is_file():
        return HFModel(path, device=device, dtype=dtype)
    return LmforgeModel.load(path, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- log-likelihoods


# Run a shared context once only if it is at least this many times longer than its longest continuation.
SHARED_CONTEXT_RATIO = 2


@dataclass
class LogLikelihood:
    logprob: float  # sum of the continuation tokens' natural log-probabilities
    is_greedy: bool  # every continuation token was the model's top choice
    num_tokens: int


def encode_pair(lm: EvalModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids including the prefix, continuation ids), split the lm-evaluation-harness way."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not continuation:
        raise LmforgeError("cannot score an empty continuation")
    if not context:
        return list(getattr(lm, "empty_context_ids", lm.prefix_ids)), lm.encode(continuation)
    ctx = lm.encode(context)
    whole = lm.encode(context + continuation)
    cont = whole[len(ctx):]
    if not cont:  # the continuation merged into the context's last token: score that token
        ctx, cont = whole[:-1], whole[-1:]
    return lm.prefix_ids + ctx, cont


def loglikelihoods(lm: EvalModel, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   progress: bool = False, desc: str = "scoring", shared_context: bool = True) -> list[LogLikelihood]:
    """log p(continuation | context) for each (context, continuation) pair, in order.

    Requests that share a context (the choices of a question) run the context once when the
    adapter can (`score_shared`, lmforge models: KV cache) and nothing needs truncating; the rest,
    and every request of other adapters, run as rows of batched forward passes."""
    from tqdm import tqdm

    encoded, pairs, fits = [], [], []
    for ctx, cont in requests:
        c, t = encode_pair(lm, ctx, cont)
        if not c:
            raise LmforgeError("this model has no token to condition an empty context on")
        # Too long for the window: drop tokens from the left (lm-eval's rule). A continuation
        # longer than the window itself is scored on its last max_length tokens.
        full = (c + t)[-(lm.max_length + 1):]
        encoded.append((full[:-1], full[-min(len(t), lm.max_length):]))
        pairs.append((c, t))
        fits.append(len(c) + len(t) <= lm.max_length + 1)
    out: list[LogLikelihood | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress, unit="req")
    pending = range(len(encoded))
    if shared_context and hasattr(lm, "score_shared"):
        pending = _score_shared_contexts(lm, pairs, fits, out, batch_size, bar)
    # Longest first: a batch's rows have similar lengths (little padding), and an out-of-memory
    # error shows on the first batch.
    order = sorted(pending, key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        # Right-padding: causal attention means real tokens never see it.
        x = torch.tensor([encoded[i][0] + [0] * (width - len(encoded[i][0])) for i in idx], dtype=torch.long)
        logits = lm.logits(x)
        for row, i in enumerate(idx):
            inp, tgt = encoded[i]
            n = len(tgt)
            pos = torch.arange(len(inp) - n, len(inp), device=logits.device)
            logp = F.log_softmax(logits[row, pos], dim=-1)
            target = torch.tensor(tgt, device=logits.device)
            tok_lp = logp.gather(1, target[:, None]).squeeze(1)
            greedy = bool((logp.argmax(-1) == target).all())
            out[i] = LogLikelihood(float(tok_lp.sum()), greedy, n)
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def _score_shared_contexts(lm, pairs, fits, out, batch_size: int, bar) -> list[int]:
    """Score with `lm.score_shared` the requests whose context ids two or more requests share and
    that fit the window untruncated; fill `out`; return the indices left for the row path."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        if fits[i]:
            by_context.setdefault(tuple(ctx), []).append(i)
    # Continuations are fed one token per step, so the cache pays off when they are short next to
    # the context (letters, words, short answers: MMLU, ARC); long ones (HellaSwag endings) run
    # faster as full rows of one forward pass (measured on the cpu preset, see docs/eval.md).
    groups = sorted(((list(c), idx) for c, idx in by_context.items()
                     if len(idx) > 1 and SHARED_CONTEXT_RATIO * max(len(pairs[i][1]) for i in idx) <= len(c)),
                    key=lambda g: -len(g[0]))
    done: set[int] = set()
    start = 0
    while start < len(groups):  # about batch_size continuations per batch, whole groups
        batch, rows = [], 0
        while start < len(groups) and (not batch or rows + len(groups[start][1]) <= batch_size):
            batch.append(groups[start])
            rows += len(groups[start][1])
            start += 1
        scores = lm.score_shared([(ctx, [pairs[i][1] for i in idx]) for ctx, idx in batch])
        for (_, idx), group_scores in zip(batch, scores):
            for i, (tok_lp, greedy) in zip(idx, group_scores):
                out[i] = LogLikelihood(float(tok_lp.sum()), greedy, len(tok_lp))
                done.add(i)
        bar.update(rows)
    return [i for i in range(len(pairs)) if i not in done]
