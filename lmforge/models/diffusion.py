"""Masked diffusion language model (MDLM-style absorbing-state diffusion in continuous time).

The forward process replaces each token, independently, by a mask id with probability t (the
log-linear schedule: alpha_t = 1 - t is the chance a token is still clean at time t in [0, 1]). The
model is the transformer trunk with bidirectional attention (the same blocks as the decoder, built
with `causal=False`), reading a partly masked sequence and predicting the clean token at every
masked position. Trained on

    loss(x) = E_t [ (1 / t) * sum over masked positions i of -log p(x_i | x_t) ]

which is the continuous-time negative ELBO for this schedule (the weight is -alpha'_t / (1 - alpha_t)):
an upper bound on -log p(x) of the model's own reverse process, in nats. Following MDLM's
"substitution" parameterisation the model never predicts the mask id (its output column is dropped)
and unmasked tokens are copied through: they carry no loss and samplers never change them
(lmforge/inference/diffusion.py).

The mask id is one extra row of the embedding table (id = vocab_size), not a tokenizer special: the
tokenizer's ids stay as they are, and no text can ever encode to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.masked_trunk import MaskedTrunk
from lmforge.models.protocol import ModelFamily
from lmforge.models.transformer import GPTConfig


@dataclass(frozen=True)
class DiffusionConfig(GPTConfig):
    causal: bool = False
    time_eps: float = 1e-3  # t is drawn from [time_eps, 1]: the 1/t weight is unbounded at 0

    def __post_init__(self):
        super().__post_init__()
        if self.causal:
            raise LmforgeError("invalid model config: a masked diffusion model attends both ways (causal=False)")
        if not 0.0 < self.time_eps < 1.0:
            raise LmforgeError(f"invalid model config: time_eps must be in (0, 1), got {self.time_eps}")

    def trunk(self) -> GPTConfig:
        """The transformer trunk's config: the same shape, one more input id (the mask)."""
        shape = {f.name: getattr(self, f.name) for f in fields(GPTConfig)}
        return GPTConfig(**{**shape, "vocab_size": self.vocab_size + 1})


class MaskedDiffusionLM(MaskedTrunk):
    family = "diffusion"
    likelihood = "bound"  # validation reports "<= bpb +- stderr" (lmforge/eval/lm.py split_loss)
    generation = "diffusion"  # samplers in lmforge/inference/diffusion.py, not token-by-token decoding

    def denoise(self, xt: torch.Tensor) -> torch.Tensor:
        """xt (B, T) ids, some of them `mask_id` -> float32 logits (B, T, vocab) of the clean tokens
        (no column for the mask: it is never predicted)."""
        return self.model(xt)[..., : self.config.vocab_size]

    def sample_times(self, batch_size: int, device) -> torch.Tensor:
        """One diffusion time per row, antithetic (stratified): (u + i / B) mod 1 for a single uniform
        u, so every batch covers [0, 1) evenly and the loss estimate has less variance than with B
        independent draws; each row's t is still uniform, so the estimate stays unbiased."""
        u = torch.rand(1, device=device)
        t = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
        eps = self.config.time_eps
        return eps + (1.0 - eps) * t

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Without targets: the denoiser's logits for idx (which may hold mask ids).

        With targets (the Trainer's next-token windows, -100 = not part of the text to model): the
        sequence modelled is `targets` itself, so the bound covers exactly the tokens, and bytes, an
        autoregressive model is scored on. A position marked -100 (an SFT prompt, padding) is never
        masked: it is visible context, restored from idx. One random time per row, the tokens masked
        with probability t, and the weighted cross-entropy of the masked ones:
        reduction "sum" is a one-sample estimate of the bound of the whole batch in nats, "none" its
        per-position terms (B * T, zero where unmasked), "mean" the sum over the modelled tokens."""
        if targets is None:
            return self.denoise(idx)
        B, T = targets.shape
        modelled = targets != -100
        # targets[:, i] is the token after idx[:, i], i.e. idx[:, i + 1]: where it is ignored, the
        # visible token there is idx's (the last position, if ignored, is padding either way).
        shifted = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        clean = torch.where(modelled, targets, shifted)
        t = self.sample_times(B, targets.device)
        masked = (torch.rand(B, T, device=targets.device) < t[:, None]) & modelled
        xt = torch.where(masked, torch.full_like(clean, self.mask_id), clean)
        logits = self.denoise(xt)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), clean.reshape(-1), reduction="none").view(B, T)
        terms = ce * masked / t[:, None]
        if reduction == "none":
            return terms.reshape(-1)
        if reduction == "sum":
            return terms.sum()
        return terms.sum() / modelled.sum().clamp(min=1)



def exact_bound(model: MaskedDiffusionLM, x: torch.Tensor) -> float:
    """The bound of one short sequence x (L,) in nats, integrated exactly over t instead of sampled:
    for each mask pattern m with k masked tokens, integral of (1/t) t^k (1-t)^(L-k) dt = B(k, L-k+1).
    2^L patterns, so only for tests and toy models."""
    L = x.numel()
    total = 0.0
    for bits in range(1, 2 ** L):
        m = torch.tensor([(bits >> i) & 1 for i in range(L)], dtype=torch.bool, device=x.device)
        k = int(m.sum())
        xt = torch.where(m, torch.full_like(x, model.mask_id), x)
        logp = model.denoise(xt[None])[0].log_softmax(-1)
        nll = -logp[m].gather(1, x[m][:, None]).sum().item()
        total += math.exp(math.lgamma(k) + math.lgamma(L - k + 1) - math.lgamma(L + 1)) * nll
    return total


PRESETS: dict[str, DiffusionConfig] = {
    "tiny": DiffusionConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
    # The transformer `cpu` preset's shape, attending both ways: the same size as the model it is
    # compared with.
    "cpu": DiffusionConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                           qk_norm=True, attn_dropout=0.0),
}

FAMILY = ModelFamily("diffusion", MaskedDiffusionLM, DiffusionConfig, PRESETS, default_preset="cpu",
                     description="masked diffusion LM (MDLM objective, bidirectional transformer trunk)")
