"""Language-modelling metrics: perplexity and bits per byte of a text file or a shard split.

Perplexity, exp(mean negative log-likelihood per token), depends on the tokenizer: a tokenizer with
longer tokens has fewer, harder predictions. Bits per byte divides the total negative
log-likelihood (in bits) by the text's UTF-8 bytes instead, so models with different tokenizers
(an lmforge checkpoint and any Hugging Face model) compare directly.

A text longer than the context window is cut into windows. With stride = window (the default)
each token is predicted once, conditioned on the tokens before it in its window; a smaller stride
overlaps the windows, so tokens after the first window see at least window - stride tokens of
context (better estimates, more compute), and each token is still scored once.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.eval.harness import EvalModel


def text_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) over a sequence of n_tokens ids: the window's inputs are
    seq[start:end], its targets seq[start+1:end+1], and targets from index first_scored on are new."""
    if not 0 < stride <= window:
        raise LmforgeError(f"stride must be in 1..{window} (the context window), got {stride}")
    out, scored = [], 0  # targets seq[1..scored] are done
    start = 0
    while scored < n_tokens - 1:
        end = min(start + window, n_tokens - 1)
        out.append((start, end, scored + 1))
        scored = end
        start += stride
    return out


@torch.inference_mode()
def evaluate_text(lm: EvalModel, text: str, *, stride: int | None = None, batch_size: int = 8,
                  progress: bool = False) -> dict[str, float]:
    """Negative log-likelihood of `text` (conditioned on the model's document start) in nats per
    token, perplexity and bits per byte."""
    from tqdm import tqdm

    if not text:
        raise LmforgeError("the text is empty")
    seq = list(lm.prefix_ids or getattr(lm, "empty_context_ids", [])) + lm.encode(text)
    L = lm.max_length
    wins = text_windows(len(seq), L, stride or L)
    nll, ntok = 0.0, 0
    for b in tqdm(range(0, len(wins), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        chunk = wins[b:b + batch_size]
        width = max(e - s for s, e, _ in chunk)
        x = torch.tensor([seq[s:e] + [0] * (width - (e - s)) for s, e, _ in chunk], dtype=torch.long)
        logits = lm.logits(x)
        for row, (s, e, first) in enumerate(chunk):
            # target index t (in seq) is predicted at row position t - 1 - s
            pos = torch.arange(first - 1 - s, e - s, device=logits.device)
            tgt = torch.tensor(seq[first:e + 1], device=logits.device)
            nll -= float(F.log_softmax(logits[row, pos], dim=-1).gather(1, tgt[:, None]).sum())
            ntok += len(tgt)
    nbytes = len(text.encode("utf-8"))
    return {"tokens": ntok, "bytes": nbytes, "loss": nll / ntok, "perplexity": math.exp(nll / ntok),
            "bits_per_byte": nll / (math.log(2) * nbytes)}


def evaluate_text_file(lm: EvalModel, path: str | Path, **kw) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text: {e}") from None
    return evaluate_text(lm, text, **kw)


# Draws per window when a model's loss only estimates a bound (masked diffusion): at least 2, so the
# spread of the draws gives the estimate's standard error.
BOUND_DRAWS = 4


def windows_nll(model, batches, token_bytes: torch.Tensor, *, draws: int = BOUND_DRAWS) -> tuple:
    """(negative log-likelihood in nats summed over the target tokens of (x, y) windows, the variance
    of that sum's estimate, target tokens, their UTF-8 bytes); -100 targets are not counted.

    An exact model's loss is the sum itself (variance 0). A model whose loss is a one-sample estimate
    of a bound (`likelihood == "bound"`) is run `draws` times per window: the mean of the draws
    estimates the window's bound, their spread the variance (it shrinks as 1 / draws)."""
    bound = getattr(model, "likelihood", "exact") == "bound"
    if bound and draws < 2:
        raise LmforgeError(f"a bound's standard error needs at least 2 draws per window, got {draws}")
    nll = variance = 0.0
    ntok = nbytes = 0
    for x, y in batches:
        if bound:
            per_window = torch.stack([model(x, y, reduction="none").view(y.shape).sum(1).double()
                                      for _ in range(draws)])
            nll += per_window.mean(0).sum().item()
            variance += (per_window.var(0) / draws).sum().item()
        else:
            nll += model(x, y, reduction="sum").item()
        scored = y != -100
        ntok += int(scored.sum())
        nbytes += int(token_bytes[y.clamp(min=0)].masked_fill(~scored, 0).sum())
    return nll, variance, ntok, nbytes


def split_loss(model, split, token_bytes: torch.Tensor, *, batch_size: int, seq_len: int, max_batches: int,
               device: str, draws: int = BOUND_DRAWS, share=None) -> dict[str, float]:
    """Mean next-token loss and bits per byte (nats summed over target tokens / (ln 2 * their UTF-8
    bytes), independent of the tokenizer) of a model over a shard split's windows, this process's
    share of them, summed over the processes: pretraining's validation and `lmforge eval --data-dir`.
    A model whose likelihood is a bound reports "loss_bound", "bpb_bound" and "bpb_bound_stderr"
    instead (never as if it were a likelihood). `share`: this process's part of the windows (a
    tensor-parallel group's processes share theirs, so each window is counted once per group)."""
    from lmforge.common import dist_info
    from lmforge.data.loader import eval_batches
    from lmforge.data.rows import ProcessShare
    from lmforge.train.distributed import all_reduce_sum

    share = share or ProcessShare()
    batches = ((x.to(device), y.to(device)) for x, y in eval_batches(
        split, batch_size, seq_len, max_batches=max_batches, rank=share.rank, world_size=share.world))
    if getattr(model, "likelihood", "exact") == "masked":
        return masked_prediction_metrics(model, batches, device, share)
    nll, variance, ntok, nbytes = windows_nll(model, batches, token_bytes, draws=draws)
    copies = dist_info()[2] // share.world if torch.distributed.is_initialized() else 1
    nll, variance, ntok, nbytes = (v / copies for v in all_reduce_sum([nll, variance, ntok, nbytes], device))
    if ntok == 0:
        return {}
    per_byte = 1.0 / (math.log(2) * max(nbytes, 1))
    if getattr(model, "likelihood", "exact") == "bound":
        return {"loss_bound": nll / ntok, "bpb_bound": nll * per_byte,
                "bpb_bound_stderr": math.sqrt(variance) * per_byte}
    return {"loss": nll / ntok, "bpb": nll * per_byte}


def masked_prediction_metrics(model, batches, device: str, share) -> dict[str, float]:
    """An encoder's validation: the masked-token loss (nats) and accuracy over the windows, with the
    same corruption every time (a fixed seed per process), so numbers from different steps compare."""
    from lmforge.common import dist_info
    from lmforge.train.distributed import all_reduce_sum

    generator = torch.Generator(device=device).manual_seed(1234 + share.rank)
    nll = correct = n = 0.0
    for x, y in batches:
        a, b, c = model.masked_prediction(x, y, generator=generator)
        nll, correct, n = nll + a.item(), correct + b.item(), n + c.item()
    copies = dist_info()[2] // share.world if torch.distributed.is_initialized() else 1
    nll, correct, n = (v / copies for v in all_reduce_sum([nll, correct, n], device))
    return {"mlm_loss": nll / n, "mlm_accuracy": correct / n} if n else {}


@torch.inference_mode()
def evaluate_shards(model, tokenizer, data_dir: str | Path, split: str = "val", *, max_tokens: int | None = None,
                    batch_size: int = 8, seq_len: int | None = None, draws: int = BOUND_DRAWS) -> dict[str, float]:
    """Loss, perplexity and bits per byte of an lmforge model on a prepared shard split, computed
    exactly as pretraining's validation does (`split_loss`); upper bounds with their standard error
    for a model whose likelihood is a bound, from `draws` draws per window."""
    from lmforge.data.loader import TokenSplit
    from lmforge.data.rows import ProcessShare
    from lmforge.models.protocol import DEFAULT_SEQ_LEN

    seq_len = seq_len or model.context_limit or DEFAULT_SEQ_LEN  # pretraining's validation windows
    data = TokenSplit(data_dir, split, tokenizer=tokenizer)
    budget = max_tokens if max_tokens is not None else data.num_tokens
    device = str(model.device)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long, device=device)
    max_batches = max(1, budget // (batch_size * seq_len * ProcessShare().world))
    was_training = model.training
    model.eval()
    try:
        m = split_loss(model, data, token_bytes, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches,
                       device=device, draws=draws)
    finally:
        model.train(was_training)
    if "mlm_loss" in m:  # an encoder: masked-token prediction, not the text's probability
        return m
    if "bpb_bound" in m:
        return {"loss_bound": m["loss_bound"], "perplexity_bound": math.exp(m["loss_bound"]),
                "bits_per_byte_bound": m["bpb_bound"], "bits_per_byte_bound_stderr": m["bpb_bound_stderr"]}
    return {"loss": m["loss"], "perplexity": math.exp(m["loss"]), "bits_per_byte": m["bpb"]}
