"""A reward model: a language model with a scalar head, trained on preference pairs (Bradley-Terry).

The Bradley-Terry model says a reply y1 is preferred to y2 with probability σ(r(x, y1) - r(x, y2)),
where r is a scalar score. Fitting r to human (or synthetic) choices by maximum likelihood gives the
loss −log σ(r_chosen − r_rejected): only differences of scores matter, so a reward model ranks
replies, it does not grade them on an absolute scale.

`RewardModel` wraps any language model (`self.model`, a family of lmforge.models with hidden
states): the final hidden state at the reply's last token (its <|assistant_end|>, which has attended
to the whole prompt and reply) goes through a linear `score_head` to one number. It starts from a
language-model checkpoint (usually the SFT model), so the trunk already reads text; the head starts
at zero, so every score starts at 0 and the loss at log 2. The wrapped model's output layer is never
used: it is frozen and left out of the checkpoint (a trainable parameter that gets no gradient would
make DDP fail on the second step, and its optimizer state would cost vocabulary × width for nothing).

`ModelWithHead` (lmforge.models.heads) is what the reward model and PPO's `ActorCritic`
(lmforge.stages.rl) share with the retrieval models: to the Trainer, the engine and checkpoints they
look like the model they wrap, and their checkpoint is that model's plus the head's tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.data.rows import MixtureSampler, ProcessShare
from lmforge.models.heads import ModelWithHead
from lmforge.models.protocol import tokens_left
from lmforge.posttrain.preference import EncodedPair, encode_pairs, encode_response, fit_window, load_pair_sources
from lmforge.stages.options import PairOptions
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.loop import RunningMetrics, TrainConfig
from lmforge.train.stage import load_start, run_stage, stage_device


class RewardModel(ModelWithHead):
    """A language model's hidden states + a linear score head read at one position per row."""

    head_kind = "reward"
    head_modules = ("score_head",)
    loads_as_language_model = False  # its output layer is left out: a checkpoint is no language model

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._freeze_output_layer(model)
        self.score_head = nn.Linear(model.hidden_size, 1, device=model.device)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Scores (B,) in float32: the head applied to the hidden state at position last[b] of row b."""
        h = self.model.hidden_states(idx)
        h = h[torch.arange(idx.size(0), device=idx.device), last]
        return self.score_head(h).squeeze(-1).float()


def load_reward_model(path, device: str = "cpu") -> tuple[RewardModel, dict]:
    """A trained reward model from a `lmforge reward train` run or checkpoint folder."""
    from lmforge.models.registry import build_model
    from lmforge.train.checkpoint import (
        checkpoint_family,
        checkpoint_model_config,
        load_model_weights,
        read_checkpoint_state,
        resolve_checkpoint,
    )

    ckpt = resolve_checkpoint(path)
    state = read_checkpoint_state(ckpt)
    if state.get("stage") != "reward":
        raise LmforgeError(f"{ckpt} is not a reward model (train one with `lmforge reward train`)")
    rm = RewardModel(build_model(checkpoint_family(state), checkpoint_model_config(ckpt, state)))
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


class PairTask:
    """What the reward and DPO tasks share: shuffled passes over the training pairs (each process
    its share of every global batch), the held-out pairs, and per-step metrics."""

    batch_of = None  # (pairs, pad_id, device) -> the model's batch

    def __init__(self, train: list[EncodedPair], val: list[EncodedPair], *, pad_id: int, batch_size: int,
                 seed: int, device: str, max_val: int = 512):
        self.share = ProcessShare()
        self.train, self.val = train, val[:max_val]
        self.sampler = MixtureSampler([len(train)], [1.0], seed)
        self.pad_id, self.batch_size, self.device = pad_id, batch_size, device
        self.metrics = RunningMetrics()

    def next_batch(self):
        mine, _ = self.share.batch(self.sampler.next, self.batch_size)
        return type(self).batch_of([self.train[i] for _, i in mine], self.pad_id, self.device)

    def val_batches(self):
        mine = self.share.items(self.val)
        return mine, [type(self).batch_of(mine[k:k + self.batch_size], self.pad_id, self.device)
                      for k in range(0, len(mine), self.batch_size)]

    def train_metrics(self) -> dict[str, float]:
        return self.metrics.pop()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class RewardTask(PairTask):
    """Bradley-Terry training on pairs; held-out pairwise accuracy, loss and mean margin."""

    batch_of = pair_batch

    def loss(self, model, batch):
        x, last = batch
        scores = model(x, last)
        rc, rr = scores.chunk(2)
        loss = bradley_terry_loss(rc, rr)
        with torch.no_grad():
            self.metrics.add(accuracy=(rc > rr).float().mean().item(), margin=(rc - rr).mean().item())
        return loss, int(last.sum().item()) + x.size(0)

    def evaluate(self, model) -> dict[str, float]:
        mine, batches = self.val_batches()
        correct = loss = margin = 0.0
        for x, last in batches:
            rc, rr = model(x, last).chunk(2)
            correct += (rc > rr).sum().item()
            loss += -F.logsigmoid(rc - rr).sum().item()
            margin += (rc - rr).sum().item()
        correct, loss, margin, n = all_reduce_sum([correct, loss, margin, len(mine)], self.device)
        return {"loss": loss / n, "accuracy": correct / n, "margin": margin / n} if n else {}



def prepare_pairs(opts: PairOptions, tok, block_size: int | None, seed: int, log=print):
    """Training and held-out pairs encoded to --seq-len tokens (default: block_size, the model's
    context window; DEFAULT_SEQ_LEN for a model without one, None)."""
    from lmforge.models.protocol import DEFAULT_SEQ_LEN

    seq_len = opts.seq_len or block_size or DEFAULT_SEQ_LEN
    if block_size is not None and seq_len > block_size:
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
    start = load_start(opts.checkpoint)
    tok = start.tokenizer
    train, val, seq_len = prepare_pairs(opts, tok, start.model.context_limit, train_cfg.seed, log)
    model = RewardModel(start.model)
    task = RewardTask(train, val, pad_id=tok.pad_id, batch_size=opts.batch_size, seed=train_cfg.seed,
                      device=stage_device(train_cfg), max_val=opts.max_val)
    extra = {"data": list(opts.data), "batch_size": opts.batch_size, "seq_len": seq_len, "head": model.head_record()}
    # The zero-initialised head scores every reply 0 at the start: loss log 2, no pair ranked right.
    return run_stage("reward", model, task, train_cfg, start=start, extra=extra, resume=opts.resume)


@torch.no_grad()
def score_replies(rm: RewardModel, tok, prompt_messages: list[dict], replies: list[str]) -> list[float]:
    """Reward-model scores of replies to one conversation."""
    from lmforge.chat import render_messages

    prompt = render_messages(tok, prompt_messages)
    rows = [fit_window(prompt, encode_response(tok, r), tokens_left(rm, 0))[:2] for r in replies]
    x, last = pack_for_scoring([p for p, _ in rows], [r for _, r in rows], tok.pad_id, rm.device)
    return rm(x, last).tolist()


def score_pairs(rm: RewardModel, tok, specs: list[str], batch_size: int = 16) -> dict:
    """Pairwise accuracy and mean margin of a reward model on preference sources."""
    from lmforge.posttrain.preference import load_preferences

    pairs = []
    for spec in specs:
        pairs += load_preferences(spec)[0]
    enc, _ = encode_pairs(tok, pairs, tokens_left(rm, 0))
    correct = margin = 0.0
    with torch.no_grad():
        for k in range(0, len(enc), batch_size):
            x, last = pair_batch(enc[k:k + batch_size], tok.pad_id, rm.device)
            rc, rr = rm(x, last).chunk(2)
            correct += (rc > rr).sum().item()
            margin += (rc - rr).sum().item()
    return {"pairs": len(enc), "accuracy": correct / len(enc), "margin": margin / len(enc)}


__all__ = ["ModelWithHead", "RewardModel", "load_reward_model", "bradley_terry_loss", "RewardTask",
           "PairOptions", "train_reward_model", "score_replies", "score_pairs"]
