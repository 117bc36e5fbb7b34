"""Samplers of a masked diffusion model: fill `length` masked positions after a fixed prompt in
`steps` forward passes (fewer than tokens if wanted), never touching a token once it is visible.

Methods:
  ancestral       the reverse process itself: going from time t to s < t, each masked position is
                  revealed with probability (t - s) / t (log-linear schedule), its token drawn from
                  the model; the last step reveals the rest (MDLM).
  low_confidence  LLaDA's remasking: every step predicts all masked positions, keeps the ones the
                  model is most sure of (a fixed number per step) and leaves the rest masked.
  random          the same count per step, positions chosen at random (LLaDA's baseline).

block_len: semi-autoregressive decoding, blocks of that many tokens left to right, diffusion inside
each block (the steps are shared evenly between blocks); None = one block of all `length` tokens.
Temperature, top-k and top-p filter each position's distribution as in token-by-token sampling
(temperature 0: the most likely token).
"""
from __future__ import annotations

import torch

from lmforge.common import LmforgeError
from lmforge.inference.sampling import eval_mode, sample_next

METHODS = ("low_confidence", "random", "ancestral")


def _split(total: int, parts: int) -> list[int]:
    """total as `parts` near-equal non-negative integers, the larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


@torch.no_grad()
def diffusion_generate(model, prompt: torch.Tensor | list[int], length: int, steps: int, *,
                       method: str = "low_confidence", block_len: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       num_samples: int = 1, seed: int | None = None) -> torch.Tensor:
    """(num_samples, len(prompt) + length) ids: the prompt, then `length` generated tokens."""
    if method not in METHODS:
        raise LmforgeError(f"unknown diffusion sampler {method!r}; choose from {', '.join(METHODS)}")
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=model.device).view(-1)
    block_len = length if block_len is None else block_len
    if length < 1 or block_len < 1:
        raise LmforgeError("a diffusion sample needs at least one token to generate and blocks of at least one")
    n_blocks = -(-length // block_len)
    if steps < n_blocks:
        raise LmforgeError(f"{steps} steps cannot fill {n_blocks} blocks: give at least one step per block")
    total = prompt.numel() + length
    if model.context_limit is not None and total > model.context_limit:
        raise LmforgeError(f"prompt ({prompt.numel()}) + {length} tokens is longer than the model's "
                           f"context window ({model.context_limit})")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device).manual_seed(seed)
    x = torch.full((num_samples, total), model.mask_id, dtype=torch.long, device=model.device)
    x[:, : prompt.numel()] = prompt
    block_sizes = [min(block_len, length - i) for i in range(0, length, block_len)]
    start = prompt.numel()
    with eval_mode(model):
        for size, block_steps in zip(block_sizes, _split(steps, n_blocks)):
            _fill_block(model, x, start, start + size, block_steps, method, temperature, top_k, top_p, gen)
            start += size
    return x


def _fill_block(model, x, lo, hi, steps, method, temperature, top_k, top_p, gen):
    B, V = x.size(0), model.vocab_size
    reveal_counts = _split(hi - lo, steps)  # low_confidence / random: tokens revealed per step
    for step in range(steps):
        masked = x[:, lo:hi] == model.mask_id  # (B, n)
        if not masked.any():
            break
        logits = model(x)[:, lo:hi].float()  # (B, n, V)
        n = hi - lo
        drawn = sample_next(logits.reshape(-1, V), temperature, top_k, top_p, gen).view(B, n)
        if method == "ancestral":
            t, s = 1.0 - step / steps, 1.0 - (step + 1) / steps
            u = torch.rand(B, n, device=x.device, generator=gen)
            reveal = masked & (u < (t - s) / t)
        else:
            if method == "low_confidence":
                score = logits.softmax(-1).gather(-1, drawn[..., None]).squeeze(-1)
            else:
                score = torch.rand(B, n, device=x.device, generator=gen)
            score = score.masked_fill(~masked, -1.0)  # a visible token is never chosen again
            k = min(reveal_counts[step], n)
            chosen = torch.zeros_like(masked)
            chosen.scatter_(1, score.topk(k, dim=1).indices, True)
            reveal = chosen & masked
        block = x[:, lo:hi]
        x[:, lo:hi] = torch.where(reveal, drawn, block)
