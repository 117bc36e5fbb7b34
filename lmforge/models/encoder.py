"""Encoder-only model (BERT-style): the transformer trunk attending both ways, trained by masked
language modelling, read as contextual token vectors or one pooled vector per text.

Pretraining hides some tokens and asks for them back. Of the positions that are text (never
padding or an ignored prompt), each is chosen with probability `mask_prob` (BERT's 15%); a chosen
position's input becomes the mask id 80% of the time, a uniformly random token 10%, and stays the
same 10% (so the model cannot learn that only masked positions matter: every visible token might be
wrong). The loss is the cross-entropy of the original token at the chosen positions only. It is not
a likelihood of the text (the protocol's `likelihood = "masked"`): validation reports the masked
tokens' loss and accuracy, never bits per byte, and nothing that needs text probabilities (scoring,
multiple choice, generation) accepts the model.

The trunk is the decoder's own blocks (RoPE, RMSNorm, SwiGLU, QK-norm: a "modern BERT" rather than
the 2018 recipe) built with `causal=False`, plus a key padding mask so right-padded batches of texts
of different lengths encode each text as if it were alone. The mask id is one extra row of the
embedding table (id = vocab_size), as for masked diffusion: no text encodes to it.

`embed_texts` pools the last hidden states to one vector per text: the mean over real tokens, or the
first token's (BERT's [CLS] position; here the tokenizer's document start). Heads (a bi-encoder's
projection, a cross-encoder's scalar score) compose an Encoder rather than subclass it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.masked_trunk import MaskedTrunk
from lmforge.models.protocol import ModelFamily
from lmforge.models.transformer import GPTConfig

POOLING = ("mean", "first")


@dataclass(frozen=True)
class EncoderConfig(GPTConfig):
    causal: bool = False
    mask_prob: float = 0.15  # share of text positions chosen for prediction
    pooling: str = "mean"  # one vector per text: the mean of its tokens' states, or the first token's

    def __post_init__(self):
        super().__post_init__()
        if self.causal:
            raise LmforgeError("invalid model config: an encoder attends both ways (causal=False)")
        if not 0.0 < self.mask_prob < 1.0:
            raise LmforgeError(f"invalid model config: mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.pooling not in POOLING:
            raise LmforgeError(f"invalid model config: pooling must be one of {', '.join(POOLING)}, "
                               f"got {self.pooling!r}")
        if self.n_experts:
            raise LmforgeError("invalid model config: an encoder with a mixture of experts is not offered")

    def trunk(self) -> GPTConfig:
        """The transformer trunk's config: the same shape, one more input id (the mask)."""
        shape = {f.name: getattr(self, f.name) for f in fields(GPTConfig)}
        return GPTConfig(**{**shape, "vocab_size": self.vocab_size + 1})


class Encoder(MaskedTrunk):
    family = "encoder"
    likelihood = "masked"  # validation: masked-token loss and accuracy (lmforge/eval/lm.py split_loss)
    generation = "none"  # encodes; every decoder of text refuses it (require_decoding)

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    # ------------------------------------------------------------------ reading texts

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, n_embd) contextual vectors; attention_mask (B, T) bool, False for padding."""
        return self.model.hidden_states(idx, attention_mask=attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) -> (B, H) by the config's pooling, over real tokens only."""
        if self.config.pooling == "first":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def embed_texts(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) right-padded ids -> (B, n_embd): one vector per text."""
        return self.pool(self.hidden_states(idx, attention_mask), attention_mask)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-token logits over the vocabulary (no column for the mask id: never an answer)."""
        return self.model.logits_from_hidden(hidden)[..., : self.config.vocab_size]

    # ------------------------------------------------------------------ masked language modelling

    def corrupt(self, clean: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None):
        """(inputs, chosen): `text` positions chosen with probability mask_prob; of those 80% become the
        mask id, 10% a random token, 10% stay (BERT's recipe). Positions that are not text never are."""
        def draw(shape):
            return torch.rand(shape, device=clean.device, generator=generator)

        chosen = (draw(clean.shape) < self.config.mask_prob) & text
        how = draw(clean.shape)
        random_ids = torch.randint(0, self.config.vocab_size, clean.shape, device=clean.device, generator=generator)
        inputs = torch.where(chosen & (how < 0.8), torch.full_like(clean, self.mask_id), clean)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
        return inputs, chosen

    def masked_prediction(self, idx: torch.Tensor, targets: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed cross-entropy in nats, correct predictions, chosen positions) of one corruption of the
        text of (idx, targets) windows. The text is `targets` (the Trainer's next-token windows: the
        same tokens shifted by one); a -100 position is visible context, restored from idx."""
        text = targets != -100
        shifted = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)  # targets[:, i] is idx[:, i + 1]
        clean = torch.where(text, targets, shifted)
        inputs, chosen = self.corrupt(clean, text, generator)
        logits = self.logits_from_hidden(self.hidden_states(inputs)[chosen]).float()  # chosen positions only
        answers = clean[chosen]
        nll = F.cross_entropy(logits, answers, reduction="sum")
        return nll, (logits.argmax(-1) == answers).sum(), chosen.sum()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Without targets: masked-token logits (B, T, vocab) for idx (which may hold mask ids). With
        targets: the masked-language-model loss of one fresh corruption, the mean over the chosen
        positions ("sum": their sum)."""
        if targets is None:
            return self.logits_from_hidden(self.hidden_states(idx))
        nll, _, n = self.masked_prediction(idx, targets)
        if reduction == "sum":
            return nll
        if reduction != "mean":
            raise LmforgeError(f"an encoder's loss has no per-token reduction {reduction!r} (mean or sum)")
        return nll / n.clamp(min=1)



PRESETS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
    # The transformer `cpu` preset's shape, attending both ways.
    "cpu": EncoderConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                         qk_norm=True, attn_dropout=0.0),
}

FAMILY = ModelFamily("encoder", Encoder, EncoderConfig, PRESETS, default_preset="cpu",
                     description="encoder-only transformer (BERT-style masked language modelling, bidirectional)")
