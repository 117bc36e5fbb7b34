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

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError, dist_info
from lmforge.models.protocol import DEFAULT_SEQ_LEN
from lmforge.posttrain.preference import EncodedPair, MetricsTrainer, RunningMetrics, pack, sequence_logprob
from lmforge.posttrain.reward import PairOptions, load_start, prepare_pairs
from lmforge.train.loop import TrainConfig, all_reduce_sum, setup_distributed


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


class DPOTask:
    def __init__(self, train: list[EncodedPair], val: list[EncodedPair], ref_model, *, beta: float, pad_id: int,
                 batch_size: int, seed: int, device: str, max_val: int = 512):
        from lmforge.posttrain.sft import MixtureSampler

        if not beta > 0:
            raise LmforgeError(f"--beta must be positive, got {beta}")
        self.rank, _, self.world = dist_info()
        self.train, self.val = train, val[:max_val]
        self.ref = ref_model
        self.beta, self.pad_id, self.batch_size, self.device = beta, pad_id, batch_size, device
        self.sampler = MixtureSampler([len(train)], [1.0], seed)
        self.metrics = RunningMetrics()
        self._val_ref: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the reference never changes

    def next_batch(self):
        rows = [self.sampler.next()[1] for _ in range(self.batch_size * self.world)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return pair_rows([self.train[i] for i in mine], self.pad_id, self.device)

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
        mine = self.val[self.rank::self.world]
        batches = [pair_rows(mine[k:k + self.batch_size], self.pad_id, self.device)
                   for k in range(0, len(mine), self.batch_size)]
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

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class DPOOptions(PairOptions):
    beta: float = 0.1
    lora: object | None = None  # a LoRAConfig


def dpo(opts: DPOOptions, train_cfg: TrainConfig, log=print) -> dict:
    """DPO from opts.checkpoint on preference pairs; returns the Trainer's final metrics plus the
    held-out metrics before training (start_val_*)."""
    model, tok, base = load_start(opts.checkpoint)
    train, val, seq_len = prepare_pairs(opts, tok, model.context_limit or DEFAULT_SEQ_LEN, train_cfg.seed, log)
    _, _, _, device = setup_distributed(train_cfg.device)
    train_cfg.device = device
    ref = copy.deepcopy(model).to(device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    lora_info = None
    if opts.lora is not None:
        if train_cfg.optimizer != "adamw":
            raise LmforgeError("LoRA fine-tuning uses AdamW: pass --optimizer adamw")
        from lmforge.posttrain.lora import apply_lora

        torch.manual_seed(train_cfg.seed)
        apply_lora(model, opts.lora)
        lora_info = {**asdict(opts.lora), "targets": list(opts.lora.targets)}
    task = DPOTask(train, val, ref, beta=opts.beta, pad_id=tok.pad_id, batch_size=opts.batch_size,
                   seed=train_cfg.seed, device=device, max_val=opts.max_val)
    extra = {"stage": "dpo", "tokenizer_fingerprint": tok.fingerprint, "base_checkpoint": str(base.resolve()),
             "data": list(opts.data), "beta": opts.beta, "batch_size": opts.batch_size, "seq_len": seq_len,
             "lora": lora_info}
    trainer = MetricsTrainer(model, task, train_cfg, extra_state=extra, resume=opts.resume,
                             extra_files={"tokenizer.json": (base / "tokenizer.json").read_bytes()})
    start = None
    if not opts.resume:
        start = trainer.evaluate()  # logged at step 0: the SFT model's own preferences
    result = trainer.fit()
    result["checkpoint"] = str(trainer.ckpt_root)
    if start:
        result.update({f"start_val_{k}": v for k, v in start.items()})
    if lora_info and trainer.is_main:
        from lmforge.posttrain.lora import save_adapter

        path = save_adapter(model, Path(train_cfg.out_dir) / "adapter",
                            extra={"base_checkpoint": str(base.resolve()), "tokenizer_fingerprint": tok.fingerprint})
        result["adapter"] = str(path)
    return result
