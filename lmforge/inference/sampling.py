"""Sampling from a trained model and scoring text with it.

This is the plain loop: every new token re-runs the model on the whole (cropped) context. It is
the reference that a KV-cached engine must reproduce exactly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.protocol import require_text_probabilities, tokens_left


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int,
                        min_p: float | None = None, repetition_penalty: float | None = None):
    if not (math.isfinite(temperature) and temperature >= 0):
        raise LmforgeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise LmforgeError(f"top-k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise LmforgeError(f"top-p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise LmforgeError(f"min-p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise LmforgeError(f"repetition penalty must be > 0 (1 = none), got {repetition_penalty}")
    if max_new_tokens < 0:
        raise LmforgeError(f"max new tokens must be >= 0, got {max_new_tokens}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL / Hugging Face repetition penalty: the logit of every token already present
    (seen: bool, same shape as logits) is divided by `penalty` if positive and multiplied by it if
    negative, so penalty > 1 always makes a repeat less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None, *, min_p: float | None = None,
                repetition_penalty: float | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token id for each row of logits (B, V).

    Order (the Hugging Face one): repetition penalty on the raw logits (also when greedy; `seen`
    (B, V) bool marks each row's tokens so far), then temperature, top-k, top-p, and min-p, which
    drops tokens less likely than min_p times the most likely one."""
    logits = _penalized(logits, repetition_penalty, seen)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _filtered(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, *,
                   min_p: float | None = None, repetition_penalty: float | None = None,
                   seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, V) that `sample_next` draws from with the same arguments: the one
    speculative decoding's acceptance rule compares (lmforge/inference/speculative.py). Greedy
    (temperature 0) is the point mass on the argmax."""
    logits = _penalized(logits, repetition_penalty, seen)
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return _filtered(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)


def _penalized(logits: torch.Tensor, repetition_penalty: float | None, seen: torch.Tensor | None) -> torch.Tensor:
    if repetition_penalty is not None and repetition_penalty != 1.0 and seen is not None:
        return apply_repetition_penalty(logits, seen, repetition_penalty)
    return logits


def _filtered(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
              min_p: float | None) -> torch.Tensor:
    """Logits divided by the temperature (> 0), with the tokens top-k, top-p and min-p drop at -inf."""
    # Shift the maximum to 0 first: dividing raw logits by a tiny temperature would overflow.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        # The most likely token always stays: rounding can leave a tiny positive "mass before" it,
        # which a top_p near 0 would count as enough and so drop every token (NaN probabilities).
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        # p / p_max >= min_p  <=>  logit - max_logit >= log(min_p); the maximum is 0 after the shift
        # above and the filters never drop the most likely token.
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    return logits


@contextmanager
def eval_mode(model):
    """Switch dropout off for inference and restore the caller's mode afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: set[int] | frozenset = frozenset(), min_p: float | None = None,
             repetition_penalty: float | None = None) -> list[int]:
    """Continue prompt_ids; returns only the new ids (a stop id ends generation and is not returned).

    When the sequence outgrows the context window, the oldest tokens are dropped from the model's
    view (the prompt itself must fit). The repetition penalty counts every token of the prompt and
    of the output, including dropped ones."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens, min_p, repetition_penalty)
    block = tokens_left(model, 0)  # the window the model sees (unbounded without one)
    if len(prompt_ids) == 0:
        raise LmforgeError("the prompt is empty (give at least one token, e.g. the bos token)")
    if len(prompt_ids) > block:
        raise LmforgeError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's context "
                           f"window of {block} tokens")
    device = model.device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    seen = torch.zeros(1, model.vocab_size, dtype=torch.bool, device=device)
    seen[0, ids[0]] = True
    out: list[int] = []
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = model(ids[:, -block:])[:, -1, :]
            nxt = sample_next(logits, temperature, top_k, top_p, gen, min_p=min_p,
                              repetition_penalty=repetition_penalty, seen=seen)
            t = int(nxt.item())
            if t in stop_ids:
                break
            out.append(t)
            seen[0, t] = True
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


@dataclass
class TextScore:
    text: str
    logprob: float  # natural log-probability of the text's tokens given a leading bos
    token_logprobs: list[tuple[str, float]]
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / max(self.num_tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return -self.logprob / math.log(2) / max(len(self.text.encode()), 1)


DIFFUSION_SCORE_SAMPLES = 256


@torch.no_grad()
def score_text(model, tokenizer, text: str) -> TextScore:
    """log p(text) under the model, token by token, conditioned on a document start (bos); for a
    masked diffusion model a Monte-Carlo estimate of its lower bound (the negative diffusion loss)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise LmforgeError("cannot score an empty text")
    seq = [tokenizer.bos_id] + ids
    if tokens_left(model, len(seq) - 1) < 0:
        raise LmforgeError(f"the text is {len(ids)} tokens, longer than the model's context window "
                           f"of {model.context_limit} tokens")
    device = model.device
    x = torch.tensor([seq[:-1]], device=device)
    y = torch.tensor(seq[1:], device=device)
    require_text_probabilities(model, "scoring a text")
    with eval_mode(model):
        if getattr(model, "likelihood", "exact") == "bound":
            # No exact log p (masked diffusion): the evidence lower bound instead, each position's
            # share of it averaged over DIFFUSION_SCORE_SAMPLES draws of time and mask (one batch,
            # antithetic times).
            n = DIFFUSION_SCORE_SAMPLES
            terms = model(x.repeat(n, 1), y.repeat(n, 1), reduction="none").view(n, -1)
            tok_lp = (-terms.mean(0)).tolist()
        else:
            logp = F.log_softmax(model(x)[0].float(), dim=-1)
            tok_lp = logp[torch.arange(len(ids), device=device), y].tolist()
    pieces = [tokenizer.decode([t]) for t in ids]
    return TextScore(text, float(sum(tok_lp)), list(zip(pieces, tok_lp)), len(ids))


def rank_texts(model, tokenizer, texts: list[str]) -> list[TextScore]:
    """Candidates sorted from most to least probable (the language model as a prior that breaks
    ties between transcriptions, e.g. 'The stuffy nose ...' vs 'The stuff he knows ...')."""
    return sorted((score_text(model, tokenizer, t) for t in texts), key=lambda s: s.logprob, reverse=True)
