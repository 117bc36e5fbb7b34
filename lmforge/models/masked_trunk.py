"""What the masked families share (masked diffusion, the encoder): the transformer's blocks attending
both ways, with one more input id than the tokenizer has, the mask (id = vocab_size), so no text
ever encodes to it. Shapes, parameter groups and accounting are the trunk's; neither family decodes
token by token, so the decode-state members refuse with the protocol's one line."""
from __future__ import annotations

from lmforge.models.protocol import LanguageModel, require_decoding
from lmforge.models.transformer import GPT


class MaskedTrunk(LanguageModel):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = GPT(cfg.trunk())  # cfg.trunk(): the same shape, vocab_size + 1 input ids

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    @property
    def context_limit(self) -> int:
        return self.config.block_size

    def param_groups(self):
        return self.model.param_groups()

    def shard_units(self):
        return self.model.shard_units()

    def output_head_names(self) -> list[str]:
        return ["model." + n for n in self.model.output_head_names()]

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        return self.model.num_params(non_embedding, active)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.model.flops_per_token(seq_len)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None):
        require_decoding(self, "a decode state")

    def prefill(self, idx, cache, last=None):
        require_decoding(self, "prefill")

    def decode(self, idx, cache, positions, step_fn=None):
        require_decoding(self, "decode")
