"""A reward model: the transformer with a scalar head, trained on preference pairs (Bradley-Terry).

The Bradley-Terry model says a reply y1 is preferred to y2 with probability σ(r(x, y1) - r(x, y2)),
where r is a scalar score. Fitting r to human (or synthetic) choices by maximum likelihood gives the
loss −log σ(r_chosen − r_rejected): only differences of scores matter, so a reward model ranks
replies, it does not grade them on an absolute scale.

`RewardModel` is a `GPT` whose final hidden state at the reply's last token (its <|assistant_end|>,
which has attended to the whole prompt and reply) goes through a linear `score_head` to one number.
It starts from a language-model checkpoint (usually the SFT model), so the trunk already reads
text; the head starts at zero, so every score starts at 0 and the loss at log 2. It has no
language-model head: a parameter that gets no gradient would make DDP fail on the second step (and
would cost vocabulary × width of memory for nothing); loading drops a checkpoint's `lm_head.weight`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError, dist_info
from lmforge.model import GPT, GPTConfig
from lmforge.posttrain.preference import (
    EncodedPair,
    MetricsTrainer,
    RunningMetrics,
    encode_pairs,
    encode_response,
    fit_window,
    load_pair_sources,
)
from lmforge.train.loop import TrainConfig, all_reduce_sum, setup_distributed


class RewardModel(GPT):
    """GPT trunk + linear score head read at one position per row."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.lm_head = nn.Identity()  # scores read hidden states only (see the module docstring)
        self.score_head = nn.Linear(cfg.n_embd, 1)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A language model's (or an older reward model's) head, or the copy of the tied embedding
        # that checkpoint loading adds, has no place here.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Scores (B,) in float32: the head applied to the hidden state at position last[b] of row b."""
        h = self.hidden_states(idx)
        h = h[torch.arange(idx.size(0), device=idx.device), last]
        return self.score_head(h).squeeze(-1).float()

    @classmethod
    def from_lm(cls, lm: GPT) -> RewardModel:
        rm = cls(lm.config)
        missing, unexpected = rm.load_state_dict(lm.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("score_head.") for k in missing)
        return rm.to(lm.embed_tokens.weight.device)


def load_reward_model(path, device: str = "cpu") -> tuple[RewardModel, dict]:
    """A trained reward model from a `lmforge reward train` run or checkpoint folder."""
    from lmforge.train.checkpoint import (
        checkpoint_model_config,
        load_model_weights,
        read_checkpoint_state,
        resolve_checkpoint,
    )

    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_state(ckpt)
    if state.get("stage") != "reward":
        raise LmforgeError(f"{ckpt} is not a reward model (train one with `lmforge reward train`)")
    rm = RewardModel(checkpoint_model_config(ckpt, state))
    load_model_weights(rm, ckpt)
    return rm.to(device).eval(), state


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r_chosen − r_rejected) (logsigmoid: no overflow for large margins)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pack_for_scoring(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Right-padded prompt + response rows and the index of each row's last token."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    x = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    last = torch.zeros(len(prompts), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        x[i, :len(p) + len(r)] = torch.tensor(p + r)
        last[i] = len(p) + len(r) - 1
    return x.to(device), last.to(device)


def pair_batch(pairs: list[EncodedPair], pad_id: int, device):
    """Chosen rows then rejected rows of the same prompts, in one batch."""
    return pack_for_scoring([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                            pad_id, device)


class RewardTask:
    """Bradley-Terry training on pairs; held-out pairwise accuracy, loss and mean margin."""

    def __init__(self, train: list[EncodedPair], val: list[EncodedPair], *, pad_id: int, batch_size: int,
                 seed: int, device: str, max_val: int = 512):
        from lmforge.posttrain.sft import MixtureSampler

        self.rank, _, self.world = dist_info()
        self.train, self.val = train, val[:max_val]
        self.sampler = MixtureSampler([len(train)], [1.0], seed)
        self.pad_id, self.batch_size, self.device = pad_id, batch_size, device
        self.metrics = RunningMetrics()

    def next_batch(self):
        rows = [self.sampler.next()[1] for _ in range(self.batch_size * self.world)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return pair_batch([self.train[i] for i in mine], self.pad_id, self.device)

    def loss(self, model, batch):
        x, last = batch
        scores = model(x, last)
        rc, rr = scores.chunk(2)
        loss = bradley_terry_loss(rc, rr)
        with torch.no_grad():
            self.metrics.add(accuracy=(rc > rr).float().mean().item(), margin=(rc - rr).mean().item())
        return loss, int(last.sum().item()) + x.size(0)

    def evaluate(self, model) -> dict[str, float]:
        mine = self.val[self.rank::self.world]
        correct = loss = margin = 0.0
        for k in range(0, len(mine), self.batch_size):
            x, last = pair_batch(mine[k:k + self.batch_size], self.pad_id, self.device)
            rc, rr = model(x, last).chunk(2)
            correct += (rc > rr).sum().item()
            loss += -F.logsigmoid(rc - rr).sum().item()
            margin += (rc - rr).sum().item()
        correct, loss, margin, n = all_reduce_sum([correct, loss, margin, len(mine)], self.device)
        return {"loss": loss / n, "accuracy": correct / n, "margin": margin / n} if n else {}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class PairOptions:
    """Options shared by `reward train` and `dpo`."""
    checkpoint: str
    data: list[str]
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    max_val: int = 512
    batch_size: int = 8  # pairs per micro-batch
    seq_len: int | None = None
    skip_invalid: bool = False
    resume: bool = False


def load_start(checkpoint: str):
    """(model, tokenizer, resolved checkpoint path) of the run a stage starts from."""
    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model, resolve_checkpoint

    base = resolve_checkpoint(checkpoint)
    model, _ = load_model(base)
    return model, load_checkpoint_tokenizer(base), base


def prepare_pairs(opts: PairOptions, tok, block_size: int, seed: int, log=print):
    seq_len = opts.seq_len or block_size
    if seq_len > block_size:
        raise LmforgeError(f"--seq-len {seq_len} is longer than the model's context window ({block_size})")
    if opts.batch_size <= 0:
        raise LmforgeError(f"--batch-size must be positive, got {opts.batch_size}")
    train, val = load_pair_sources(opts.data, opts.val_data, opts.val_fraction, seed=seed,
                                   skip_invalid=opts.skip_invalid, log=log)
    train, cut_t = encode_pairs(tok, train, seq_len)
    val, cut_v = encode_pairs(tok, val, seq_len)
    if cut_t or cut_v:
        log(f"data: {cut_t + cut_v} pairs cut to {seq_len} tokens (prompt kept from its end)")
    return train, val, seq_len


def train_reward_model(opts: PairOptions, train_cfg: TrainConfig, log=print) -> dict:
    lm, tok, base = load_start(opts.checkpoint)
    train, val, seq_len = prepare_pairs(opts, tok, lm.config.block_size, train_cfg.seed, log)
    model = RewardModel.from_lm(lm)
    del lm
    _, _, _, device = setup_distributed(train_cfg.device)
    train_cfg.device = device
    task = RewardTask(train, val, pad_id=tok.pad_id, batch_size=opts.batch_size, seed=train_cfg.seed,
                      device=device, max_val=opts.max_val)
    extra = {"stage": "reward", "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": str(base.resolve()),
             "data": list(opts.data), "batch_size": opts.batch_size, "seq_len": seq_len}
    trainer = MetricsTrainer(model, task, train_cfg, extra_state=extra, resume=opts.resume,
                             extra_files={"tokenizer.json": (base / "tokenizer.json").read_bytes()})
    # The zero-initialised head scores every reply 0 at the start: loss log 2, no pair ranked right.
    result = trainer.fit()
    result["checkpoint"] = str(trainer.ckpt_root)
    return result


@torch.no_grad()
def score_replies(rm: RewardModel, tok, prompt_messages: list[dict], replies: list[str]) -> list[float]:
    """Reward-model scores of replies to one conversation."""
    from lmforge.chat import render_messages

    prompt = render_messages(tok, prompt_messages)
    rows = [fit_window(prompt, encode_response(tok, r), rm.config.block_size)[:2] for r in replies]
    x, last = pack_for_scoring([p for p, _ in rows], [r for _, r in rows], tok.pad_id, rm.embed_tokens.weight.device)
    return rm(x, last).tolist()


def score_pairs(rm: RewardModel, tok, specs: list[str], batch_size: int = 16) -> dict:
    """Pairwise accuracy and mean margin of a reward model on preference sources."""
    from lmforge.posttrain.preference import load_preferences

    pairs = []
    for spec in specs:
        pairs += load_preferences(spec)[0]
    enc, _ = encode_pairs(tok, pairs, rm.config.block_size)
    correct = margin = 0.0
    with torch.no_grad():
        for k in range(0, len(enc), batch_size):
            x, last = pair_batch(enc[k:k + batch_size], tok.pad_id, rm.embed_tokens.weight.device)
            rc, rr = rm(x, last).chunk(2)
            correct += (rc > rr).sum().item()
            margin += (rc - rr).sum().item()
    return {"pairs": len(enc), "accuracy": correct / len(enc), "margin": margin / len(enc)}


__all__ = ["RewardModel", "load_reward_model", "bradley_terry_loss", "RewardTask",
           "PairOptions", "train_reward_model", "score_replies", "score_pairs"]
