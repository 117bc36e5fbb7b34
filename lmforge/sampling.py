"""Sampling from a trained model and scoring text with it.

This is the plain loop: every new token re-runs the model on the whole (cropped) context. It is
the reference that a KV-cached engine must reproduce exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int):
    if temperature < 0:
        raise LmforgeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise LmforgeError(f"top-k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise LmforgeError(f"top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise LmforgeError(f"max new tokens must be >= 0, got {max_new_tokens}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id for each row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: set[int] | frozenset = frozenset()) -> list[int]:
    """Continue prompt_ids; returns only the new ids (a stop id ends generation and is not returned).

    When the sequence outgrows the context window, the oldest tokens are dropped from the model's
    view (the prompt itself must fit)."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    block = model.config.block_size
    if len(prompt_ids) == 0:
        raise LmforgeError("the prompt is empty (give at least one token, e.g. the bos token)")
    if len(prompt_ids) > block:
        raise LmforgeError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's context "
                           f"window of {block} tokens")
    device = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(ids[:, -block:])[:, -1, :]
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        t = int(nxt.item())
        if t in stop_ids:
            break
        out.append(t)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    model.train(was_training)
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


@torch.no_grad()
def score_text(model, tokenizer, text: str) -> TextScore:
    """log p(text) under the model, token by token, conditioned on a document start (bos)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise LmforgeError("cannot score an empty text")
    seq = [tokenizer.bos_id] + ids
    if len(seq) - 1 > model.config.block_size:
        raise LmforgeError(f"the text is {len(ids)} tokens, longer than the model's context window "
                           f"of {model.config.block_size} tokens")
    device = next(model.parameters()).device
    x = torch.tensor([seq[:-1]], device=device)
    y = torch.tensor(seq[1:], device=device)
    model.eval()
    logp = F.log_softmax(model(x)[0].float(), dim=-1)
    tok_lp = logp[torch.arange(len(ids), device=device), y].tolist()
    pieces = [tokenizer.decode([t]) for t in ids]
    return TextScore(text, float(sum(tok_lp)), list(zip(pieces, tok_lp)), len(ids))


def rank_texts(model, tokenizer, texts: list[str]) -> list[TextScore]:
    """Candidates sorted from most to least probable (the language model as a prior that breaks
    ties between transcriptions, e.g. 'The stuffy nose ...' vs 'The stuff he knows ...')."""
    return sorted((score_text(model, tokenizer, t) for t in texts), key=lambda s: s.logprob, reverse=True)
