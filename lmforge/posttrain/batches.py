"""Padded prompt + reply batches and the log-probabilities of their reply tokens: what the reward
model, DPO and RL stages compute their losses from."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
         device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded sequences prompt + response (B, T) and the mask (B, T - 1) of target positions
    that predict a response token (position t predicts token t + 1)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    x = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        x[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    return x.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x[t+1] | x[:t+1]) for t = 0..T-2, (B, T - 1), in float32."""
    logits = logits[:, :-1].float()
    return -F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")


def sequence_logprob(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's masked (response) tokens under the model, (B,)."""
    return (token_logprobs(model(x), x) * mask).sum(1)
