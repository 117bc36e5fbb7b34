"""Direct Preference Optimization: the preference objective optimised on the policy directly.

RLHF maximises reward minus β·KL(π ‖ π_ref). Its optimum is π*(y|x) ∝ π_ref(y|x) exp(r(x, y)/β),
so a policy defines an *implicit reward* r(x, y) = β log π(y|x)/π_ref(y|x) (up to a term of x alone,
which cancels between two replies to the same prompt). Putting that reward into the Bradley-Terry
likelihood gives a loss on the policy alone — no reward model, no sampling:

    L = −log σ( β [ (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)) ] )

log π(y|x) is the summed log-probability of the reply's tokens (its <|assistant_end|> included).
π_ref is a frozen copy of the starting model; β sets how far the policy may move from it (small β:
far). Logged: the implicit rewards of chosen and rejected replies, their margin, and the accuracy
(fraction of pairs whose chosen reply has the larger implicit reward; 0 at the start, where every
margin is exactly 0), plus `logp_accuracy`, the fraction where the policy itself gives the chosen
reply the higher log-probability (meaningful from the first step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.models.protocol import DEFAULT_SEQ_LEN
from lmforge.posttrain.batches import pack, sequence_logprob
from lmforge.posttrain.preference import EncodedPair
from lmforge.stages.options import DPOOptions
from lmforge.stages.reward import PairTask, prepare_pairs
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.loop import TrainConfig
from lmforge.train.stage import add_lora, frozen_copy, load_start, run_stage, stage_device


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean DPO loss, implicit rewards of chosen, of rejected) from summed reply log-probabilities."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def pair_rows(pairs: list[EncodedPair], pad_id: int, device):
    """Chosen rows then rejected rows after the same prompts: (x, response mask)."""
    return pack([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


class DPOTask(PairTask):
    """The DPO loss against a frozen reference; held-out loss, accuracy, margins and implicit rewards."""

    batch_of = pair_rows

    def __init__(self, train: list[EncodedPair], val: list[EncodedPair], ref_model, *, beta: float, **kw):
        if not beta > 0:
            raise LmforgeError(f"--beta must be positive, got {beta}")
        super().__init__(train, val, **kw)
        self.ref, self.beta = ref_model, beta
        self._val_ref: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the reference never changes

    def _ref_logps(self, x, mask):
        with torch.no_grad():
            return sequence_logprob(self.ref, x, mask).chunk(2)

    def loss(self, model, batch):
        x, mask = batch
        pc, pr = sequence_logprob(model, x, mask).chunk(2)
        rc, rr = self._ref_logps(x, mask)
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, self.beta)
        self.metrics.add(reward_chosen=cr.mean().item(), reward_rejected=rj.mean().item(),
                         margin=(cr - rj).mean().item(), accuracy=(cr > rj).float().mean().item())
        return loss, int(mask.sum().item())

    def evaluate(self, model) -> dict[str, float]:
        mine, batches = self.val_batches()
        if self._val_ref is None:
            self._val_ref = [self._ref_logps(x, m) for x, m in batches]
        sums = [0.0] * 6
        for (x, mask), (rc, rr) in zip(batches, self._val_ref):
            pc, pr = sequence_logprob(model, x, mask).chunk(2)
            cr, rj = self.beta * (pc - rc), self.beta * (pr - rr)
            for i, v in enumerate((-F.logsigmoid(cr - rj), (cr > rj).float(), cr - rj, cr, rj, (pc > pr).float())):
                sums[i] += v.sum().item()
        *sums, n = all_reduce_sum(sums + [len(mine)], self.device)
        if not n:
            return {}
        names = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_accuracy")
        return {k: v / n for k, v in zip(names, sums)}



def dpo(opts: DPOOptions, train_cfg: TrainConfig, log=print) -> dict:
    """DPO from opts.checkpoint on preference pairs; returns the Trainer's final metrics plus the
    held-out metrics before training (start_val_*)."""
    start = load_start(opts.checkpoint)
    model, tok = start.model, start.tokenizer
    train, val, seq_len = prepare_pairs(opts, tok, model.context_limit or DEFAULT_SEQ_LEN, train_cfg.seed, log)
    device = stage_device(train_cfg)
    ref = frozen_copy(model, device)
    lora = add_lora(model, opts.lora, train_cfg)
    task = DPOTask(train, val, ref, beta=opts.beta, pad_id=tok.pad_id, batch_size=opts.batch_size,
                   seed=train_cfg.seed, device=device, max_val=opts.max_val)
    extra = {"data": list(opts.data), "beta": opts.beta, "batch_size": opts.batch_size, "seq_len": seq_len,
             "lora": lora}
    # Evaluated before the first step (logged at step 0): the SFT model's own preferences.
    return run_stage("dpo", model, task, train_cfg, start=start, extra=extra, resume=opts.resume, start_eval=True,
                     lora=lora)
