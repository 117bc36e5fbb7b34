"""Supervised fine-tuning on conversations, through the shared Trainer.

Each conversation is rendered with `chat.render_for_training` into token ids and a loss mask (1 on
the assistant's tokens). A training row is one conversation, cut to the sequence length and
right-padded: y[t] = ids[t+1] where the mask of token t+1 is 1, else -100 (ignored). Causal attention
means a real token never attends to the padding after it, so rows of one batch never leak into each
other and padding never enters the loss. (Packing several conversations into one row would waste
less compute but needs a block-diagonal attention mask; the model does not take one yet.) A masked
diffusion model is fine-tuned LLaDA-style instead: the prompt stays visible, only reply tokens are
masked, and every row is padded to the sequence length with end-of-turn tokens it learns to predict
(`collate`), which is what lets `lmforge chat` ask it for a fixed-length reply.

Several sources are mixed with weights: every row draws its source with probability proportional to
its weight, then that source's next conversation from a shuffled pass over it (reshuffled each pass).
The draw is a pure function of (seed, rows drawn so far), so a resumed run sees the same rows.
Held-out conversations (a fraction of each source, or --val-data) give the validation loss over
assistant tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.chat import render_for_training
from lmforge.common import LmforgeError
from lmforge.data.rows import MixtureSampler, ProcessShare, split_heldout
from lmforge.models.protocol import DEFAULT_SEQ_LEN, tokens_left
from lmforge.stages.options import SFTOptions
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.loop import TrainConfig
from lmforge.train.stage import add_lora, load_start, run_stage, stage_device


@dataclass
class Example:
    ids: list[int]
    mask: list[int]


def tokenize_conversations(tok, conversations, seq_len: int) -> tuple[list[Example], dict]:
    """Render and cut to seq_len + 1 tokens (inputs and shifted targets). Conversations left with no
    assistant token to learn are dropped, and counted."""
    out, stats = [], {"truncated": 0, "dropped_no_target": 0}
    for msgs in conversations:
        ids, mask = render_for_training(tok, msgs)
        if len(ids) > seq_len + 1:
            stats["truncated"] += 1
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not any(mask[1:]):
            stats["dropped_no_target"] += 1
            continue
        out.append(Example(ids, mask))
    return out, stats


def collate(examples: list[Example], pad_id: int, device, fill: tuple[int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (x, y) with y = -100 wherever there is nothing to learn.

    fill = (end-of-turn id, width), for a masked diffusion model (LLaDA's SFT): every row is padded to
    `width` with end-of-turn tokens that are *targets* like the reply's own, so the model learns to
    fill the unused tail of a fixed-length reply with them (chat then generates `width`-sized replies
    and cuts at the first one). An autoregressive model learns where a reply ends from its single
    end-of-turn token instead, and its padding is ignored."""
    width = max(len(e.ids) for e in examples) - 1 if fill is None else fill[1]
    x = torch.full((len(examples), width), pad_id if fill is None else fill[0], dtype=torch.long)
    y = torch.full((len(examples), width), -100 if fill is None else fill[0], dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.ids) - 1
        x[r, :n] = torch.tensor(e.ids[:-1])
        tgt = torch.tensor(e.ids[1:])
        y[r, :n] = torch.where(torch.tensor(e.mask[1:], dtype=torch.bool), tgt, -100)
    return x.to(device), y.to(device)


class SFTTask:
    """The Task for the Trainer: padded conversation batches, masked next-token loss."""

    def __init__(self, sources: list[list[Example]], weights: list[float], val: list[Example], *, pad_id: int,
                 batch_size: int, seed: int, device: str, max_val: int = 512, fill: tuple[int, int] | None = None):
        self.share = ProcessShare()
        self.sources, self.val = sources, val[:max_val]
        self.sampler = MixtureSampler([len(s) for s in sources], weights, seed)
        self.pad_id, self.batch_size, self.device, self.fill = pad_id, batch_size, device, fill

    def targets(self, e: Example) -> int:
        """The tokens a row teaches: the assistant's, plus its end-of-turn padding under `fill`."""
        return sum(e.mask[1:]) + (0 if self.fill is None else self.fill[1] - (len(e.ids) - 1))

    def next_batch(self):
        mine, rows = self.share.batch(self.sampler.next, self.batch_size)
        # The loss is the mean over the assistant tokens of the whole global batch, as on one
        # process. Rows differ in how many tokens they teach, so each rank divides its sum by
        # (global tokens / ranks): DDP's average of the ranks' gradients is then that mean's gradient.
        global_targets = sum(self.targets(self.sources[d][i]) for d, i in rows)
        x, y = collate([self.sources[d][i] for d, i in mine], self.pad_id, self.device, self.fill)
        return x, y, max(global_targets, 1) / self.share.world

    def loss(self, model: nn.Module, batch):
        x, y, denominator = batch
        return model(x, y, reduction="sum") / denominator, int((y != -100).sum().item())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        mine = self.share.items(self.val)
        nll, ntok = 0.0, 0
        for k in range(0, len(mine), self.batch_size):
            x, y = collate(mine[k:k + self.batch_size], self.pad_id, self.device, self.fill)
            nll += model(x, y, reduction="sum").item()
            ntok += int((y != -100).sum().item())
        nll, ntok = all_reduce_sum([nll, ntok], self.device)
        return {"loss": nll / ntok} if ntok else {}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)



def sft(opts: SFTOptions, train_cfg: TrainConfig, log=print) -> dict:
    """Fine-tune opts.checkpoint on the conversation mixture; returns the Trainer's final metrics."""
    from lmforge.posttrain.conversations import load_source, parse_mixture

    start = load_start(opts.checkpoint, diffusion=True)
    model, tok = start.model, start.tokenizer
    seq_len = opts.seq_len or model.context_limit or DEFAULT_SEQ_LEN
    if tokens_left(model, seq_len) < 0:
        raise LmforgeError(f"--seq-len {seq_len} is longer than the model's context window ({model.context_limit})")
    if opts.batch_size <= 0:
        raise LmforgeError(f"--batch-size must be positive, got {opts.batch_size}")
    mixture = parse_mixture(opts.data)
    sources, weights, val_convs, stats = [], [], [], {"truncated": 0, "dropped_no_target": 0}
    tool_conversations = 0  # recorded in the checkpoint: `lmforge chat` runs tools for such a model
    for k, (spec, weight) in enumerate(mixture):
        convs, report = load_source(spec, skip_invalid=opts.skip_invalid, seed=train_cfg.seed, tools=opts.tools)
        train, held = split_heldout(convs, 0.0 if opts.val_data else opts.val_fraction, train_cfg.seed + k)
        examples, st = tokenize_conversations(tok, train, seq_len)
        tool_conversations += sum(any(m.get("tool_calls") for m in msgs) for msgs in train)
        for key in stats:
            stats[key] += st[key]
        if not examples:
            raise LmforgeError(f"{spec}: no conversation has an assistant token within {seq_len} tokens")
        sources.append(examples)
        weights.append(weight)
        val_convs += held
        log(f"data: {report.summary()}; {len(examples)} train, {len(held)} held out, weight {weight:g}")
    for spec in opts.val_data:
        convs, report = load_source(spec, skip_invalid=opts.skip_invalid, seed=train_cfg.seed + 7919, tools=opts.tools)
        val_convs += convs
        log(f"val data: {report.summary()}")
    random.Random(train_cfg.seed).shuffle(val_convs)  # --max-val keeps a sample of every source, not the first ones
    val, st = tokenize_conversations(tok, val_convs, seq_len)
    if stats["truncated"] or stats["dropped_no_target"]:
        log(f"data: {stats['truncated']} conversations cut to {seq_len + 1} tokens, "
            f"{stats['dropped_no_target']} dropped (no assistant token left after cutting)")

    lora = add_lora(model, opts.lora, train_cfg)
    from lmforge.posttrain.lora import trainable_summary

    counts = trainable_summary(model)
    log(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['trainable'] / 1e6:.3f}M trainable "
        f"({100 * counts['fraction']:.2f}%)"
        + (f", LoRA r={opts.lora.rank} on {','.join(opts.lora.targets)}" if lora else ""))
    device = stage_device(train_cfg)
    # A masked diffusion model's rows are padded to seq_len with end-of-turn targets (see collate).
    fill = (tok.end_of_turn_id, seq_len) if getattr(model, "generation", None) == "diffusion" else None
    task = SFTTask(sources, weights, val, pad_id=tok.pad_id, batch_size=opts.batch_size, seed=train_cfg.seed,
                   device=device, max_val=opts.max_val, fill=fill)
    extra = {"data": [f"{s}*{w:g}" for s, w in mixture], "batch_size": opts.batch_size, "seq_len": seq_len,
             "reply_padding": "end_of_turn" if fill else None,
             "lora": lora, "tool_conversations": tool_conversations}
    result = run_stage("sft", model, task, train_cfg, start=start, extra=extra, resume=opts.resume, lora=lora)
    result.update({"trainable_params": counts["trainable"], "total_params": counts["total"]})
    result["model"], result["tokenizer"] = model, tok
    return result


# ----------------------------------------------------------------------------- task evaluation


def evaluate_tasks(model, tok, tasks: list[str], n: int, *, seed: int = 0, tools: bool = True, tool_names=None,
                   max_new_tokens: int = 96, examples: int = 0, batch_size: int = 64) -> dict:
    """Greedy replies to n held-out problems per synthetic task, batch_size at a time (the tool loop
    runs the tools the model calls). Reports exact-match accuracy per task and the fraction of
    replies that ended their turn with <|assistant_end|> ("well-formed") instead of running out of
    tokens."""
    from lmforge.chat import render_messages
    from lmforge.inference.engine import Engine
    from lmforge.inference.tools import generate_with_tools_batch, select_tools
    from lmforge.posttrain.synthetic import get_task, heldout_problems

    engine = Engine(model, tok)
    out, correct_all, formed_all, total = {"tasks": {}}, 0, 0, 0
    for name in tasks:
        task = get_task(name, split="test")
        problems = heldout_problems(task, name, n, seed)
        correct = formed = calls = 0
        shown = []
        for k in range(0, n, batch_size):
            chunk = problems[k:k + batch_size]
            prompts = [render_messages(tok, [{"role": "user", "content": q}]) for q, _ in chunk]
            replies = generate_with_tools_batch(engine, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                                tools=select_tools(tool_names) if tools else {})
            for (prompt, answer), r in zip(chunk, replies):
                ok = r.finish_reason == "stop" and task.check(r.text, answer)
                correct += ok
                formed += r.finish_reason == "stop"
                calls += r.tool_calls
                if len(shown) < examples:
                    shown.append({"prompt": prompt, "expected": answer, "reply": tok.decode(r.tokens),
                                  "correct": bool(ok)})
        out["tasks"][name] = {"accuracy": correct / n, "well_formed": formed / n, "tool_calls_per_reply": calls / n,
                              **({"examples": shown} if shown else {})}
        correct_all, formed_all, total = correct_all + correct, formed_all + formed, total + n
    out["accuracy"] = correct_all / max(total, 1)
    out["well_formed"] = formed_all / max(total, 1)
    return out


def safety_eval(model, tok, max_new_tokens: int = 64) -> dict:
    """Refusal rate on the held-out harmful prompts and over-refusal on their benign look-alikes."""
    from lmforge.chat import render_messages
    from lmforge.inference.engine import Engine
    from lmforge.posttrain.safety import refusal_eval

    engine = Engine(model, tok)

    def reply(prompt: str) -> str:
        ids = render_messages(tok, [{"role": "user", "content": prompt}])
        return engine.generate([ids], max_new_tokens, temperature=0.0)[0].text

    return refusal_eval(reply)
