"""Speculative decoding: several tokens per forward pass of the model, with the model's own distribution.

On a CPU, one decode step of a small model at batch 1 is bound by reading its weights, and reading
them once for k + 1 tokens costs little more than for one. So a cheap *draft* proposes k tokens, the
*target* (the model whose output we want) scores all of them in one pass (`decode_many`, see
lmforge/models/protocol.py), and a rejection rule keeps a prefix of them such that every token is
still distributed exactly as the target alone would sample it (Leviathan et al. 2023; Chen et al.
2023):

    draft token x, proposed with probability q(x), is accepted with probability min(1, p(x) / q(x));
    at the first rejection the token is resampled from normalize(max(0, p - q)) and the round ends;
    when all k are accepted, one bonus token is sampled from the target's p after the last of them.

p and q are the distributions *after* the sampling settings (repetition penalty, temperature,
top-k, top-p, min-p: `sampling.sampling_probs`, the same code `sample_next` draws from), so the
output follows the same distribution as `Engine.generate` with those settings. Temperature 0 makes
p and q point masses: a draft token is kept iff it is the target's argmax, and the output is the
greedy output token for token (up to float rounding of logits computed in a different grouping).

Two drafts:
  * a draft model: a smaller lmforge model with the same vocabulary, sampling k tokens one at a
    time through its own cache with the same settings;
  * prompt lookup: no model. The last n tokens of the context (prompt + output so far), n from
    max_ngram down to 1, are looked up at their most recent earlier occurrence, and the tokens that
    followed it are proposed (copied on past the end of the context, as LZ77 does, so a periodic
    text yields k tokens). Its q is a point mass: x is accepted with probability p(x), and a
    rejection samples from p with x removed.

Rounds: the target's cache holds every context token but the last; a round feeds that token plus
the k drafts at their positions and gets k + 1 distributions. Rolling back is free: a rejected
draft's keys and values sit in slots the next round overwrites before anything attends to them.
The draft model's cache likewise catches up on the tokens it has not seen (the last accepted draft
and the correction or bonus token).

Adaptive k: k is the most drafts per round. A session drafts 2 more after a round that accepted all
of them and 1 fewer after one that did not; when even a single draft is rejected it stops drafting
for 1, 2, 4, ... (up to MAX_PAUSE) rounds. A draft that predicts the target badly thus costs a few
percent instead of k wasted draft steps per token, and a good one keeps proposing k.

Batch 1 only: rows that accept different numbers of tokens drift apart, and a batch of rows already
fills the memory-bound step that speculation tries to fill. The server runs each request as its own
session of rounds (lmforge/inference/scheduler.py).

Usage:
    spec = Speculator(model, tok, draft=small_model, k=4)      # or prompt_lookup=True
    completion, stats = spec.generate(prompt_ids, 100, temperature=0)
    for piece in spec.stream(prompt_ids, 100, stats=stats): ...
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.common import LmforgeError
from lmforge.inference.engine import Completion, RowOutput, checked_stops, compiled_decode_step
from lmforge.inference.precision import prepare_for_inference
from lmforge.inference.sampling import check_sampling_args, sampling_probs
from lmforge.models.protocol import require_decoding, tokens_left

DEFAULT_K = 4
DEFAULT_MAX_NGRAM = 3
MAX_PAUSE = 32  # most rounds without drafting after a rejected one-token draft


@dataclass
class SpecStats:
    """What speculation did. proposed: draft tokens proposed; accepted: of them, kept by the target;
    target_passes: the target's forward passes after the prompt's prefill (one per round); tokens:
    tokens generated (a stop id counted: the model produced it); seconds: wall time of generation."""
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per target pass: 1 without speculation, at most k + 1."""
        return self.tokens / self.target_passes if self.target_passes else 0.0

    def add(self, other: SpecStats) -> None:
        for name in ("proposed", "accepted", "target_passes", "tokens", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        rate = f", {self.tokens / self.seconds:.1f} tokens/s" if self.seconds > 0 else ""
        return (f"speculation: {self.accepted}/{self.proposed} draft tokens accepted ({self.acceptance_rate:.0%}), "
                f"{self.tokens} tokens in {self.target_passes} target passes "
                f"({self.tokens_per_pass:.2f} per pass){rate}")


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, seen=seen)


def require_multi_token_step(model, role: str) -> None:
    """One clear error for a model that cannot verify (or draft) several tokens per step."""
    require_decoding(model, f"speculative decoding ({role})")
    if not callable(getattr(model, "decode_many", None)):
        raise LmforgeError(f"speculative decoding needs a model with a multi-token cached step (decode_many); "
                           f"the {model.family} family ({role}) has none: its decode state cannot be rolled back")
    if model.context_limit is None:  # decode_many is positional: slots up to a window
        raise LmforgeError(f"speculative decoding needs a model with a context window; the {model.family} "
                           f"model ({role}) has none")


def lookup_draft(context: Sequence[int], k: int, max_ngram: int = DEFAULT_MAX_NGRAM) -> list[int]:
    """Prompt-lookup proposal: up to k tokens that followed the most recent earlier occurrence of the
    context's last n tokens (n = max_ngram down to 1); [] when none of them occurred before.
    The copy runs on into the tokens it has just proposed (a match one period back in a periodic
    text still yields k tokens)."""
    L = len(context)
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = list(context[L - n:])
        for i in range(L - n - 1, -1, -1):  # i + n <= L - 1: something follows the occurrence
            if context[i] == tail[0] and list(context[i:i + n]) == tail:
                out: list[int] = []
                src = i + n
                while len(out) < k:
                    out.append(context[src] if src < L else out[src - L])
                    src += 1
                return out
    return []


class Speculator:
    """Speculative generation at batch 1 from `model` (the target), drafting with `draft` (a smaller
    model of the same vocabulary) or with prompt lookup. k: draft tokens per round. The tokenizer
    plays the same part as in Engine (stop strings, text, streaming, default stop ids); dtype and
    compile as in Engine, applied to the target and the draft."""

    def __init__(self, model, tokenizer=None, *, draft=None, prompt_lookup: bool = False, k: int = DEFAULT_K,
                 max_ngram: int = DEFAULT_MAX_NGRAM, dtype: str | None = None, compile: bool = False):
        if (draft is None) == (not prompt_lookup):
            raise LmforgeError("speculative decoding needs exactly one draft: a draft model or prompt lookup")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LmforgeError(f"speculative decoding proposes k >= 1 draft tokens per step, got {k!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
            raise LmforgeError(f"prompt lookup matches n-grams of n >= 1 tokens, got max_ngram={max_ngram!r}")
        require_multi_token_step(model, "the target")
        if draft is not None:
            require_multi_token_step(draft, "the draft")
            if draft.vocab_size != model.vocab_size:
                raise LmforgeError(f"the draft model's vocabulary ({draft.vocab_size} ids) differs from the "
                                   f"target's ({model.vocab_size}): both must use the same tokenizer")
            if draft is model:
                raise LmforgeError("the draft model is the target itself: give a smaller model")
        prepare_for_inference(model, dtype, compile=compile)  # as the Engine does; the draft alike
        if draft is not None:
            prepare_for_inference(draft, dtype, compile=compile)
        self.model, self.draft, self.tokenizer = model, draft, tokenizer
        self.k, self.max_ngram = k, max_ngram
        # the draft proposes one token at a time: the compiled single-token step pays there
        self.draft_step = compiled_decode_step(draft) if compile and draft is not None else None
        self.sample_vocab = model.vocab_size if tokenizer is None else min(model.vocab_size, tokenizer.vocab_size)
        self.default_stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()

    @property
    def method(self) -> str:
        return "prompt lookup" if self.draft is None else "draft model"

    def session(self, prompt: Sequence[int], budget: int, settings: SamplingSettings,
                generator: torch.Generator | None = None, banned: Iterable[int] = ()) -> SpecSession:
        """The state of one generation, advanced a round at a time (`SpecSession.round`); the caller
        consumes the tokens and stops when its row is done (the server's scheduler does)."""
        return SpecSession(self, list(prompt), budget, settings, generator, banned)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop_ids: Iterable[int] | None = None,
                 stop_strings: Iterable[str] = ()) -> tuple[Completion, SpecStats]:
        """Continue one prompt, as `Engine.generate([prompt_ids], ...)` does (the same stop ids, stop
        strings, budget and context window rules); returns its Completion and what speculation did."""
        stats = SpecStats()
        row, run = self._prepare(prompt_ids, max_new_tokens, temperature, top_k, top_p, min_p,
                                 repetition_penalty, seed, stop_ids, stop_strings, stats)
        for _ in run:
            pass
        return row.completion(), stats

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop_ids: Iterable[int] | None = None, stop_strings: Iterable[str] = (),
               stats: SpecStats | None = None) -> Iterator[str]:
        """As `Engine.stream`: text pieces as soon as they are complete; `stats` (if given) is
        updated as generation goes. Arguments are checked here, before the first piece."""
        if self.tokenizer is None:
            raise LmforgeError("streaming text needs a tokenizer")
        _, run = self._prepare(prompt_ids, max_new_tokens, temperature, top_k, top_p, min_p,
                               repetition_penalty, seed, stop_ids, stop_strings, stats or SpecStats())
        return (piece for piece in run if piece)

    # ------------------------------------------------------------------ internals

    def _prepare(self, prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                 stop_ids, stop_strings, stats):
        check_sampling_args(temperature, top_k, top_p, max_new_tokens, min_p, repetition_penalty)
        model = self.model
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise LmforgeError("give the prompt as a list of token ids")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LmforgeError("the prompt is empty (give at least one token, e.g. the bos token)")
        if tokens_left(model, len(prompt)) < 0:
            raise LmforgeError(f"the prompt is {len(prompt)} tokens, longer than the model's context "
                               f"window of {model.context_limit} tokens")
        if not all(0 <= t < model.vocab_size for t in prompt):
            raise LmforgeError(f"the prompt has token ids outside the model's vocabulary (0..{model.vocab_size - 1})")
        stop_ids, stop_strings = checked_stops(stop_ids, stop_strings, self.default_stop_ids, self.tokenizer)
        row = RowOutput(min(max_new_tokens, tokens_left(model, len(prompt))), stop_ids, stop_strings, self.tokenizer)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(seed)
        settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
        return row, self._run(prompt, row, settings, generator, stats)

    def _run(self, prompt, row: RowOutput, settings, generator, stats: SpecStats) -> Iterator[str]:
        if row.done:
            return
        models = [m for m in (self.model, self.draft) if m is not None]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        start, session = time.perf_counter(), None
        try:
            session = self.session(prompt, row.budget, settings, generator)
            while True:
                for t in session.round():
                    stats.tokens += 1
                    yield row.add(t)
                    if row.done:
                        return
                stats.add(session.take_stats())
        finally:
            if session is not None:
                stats.add(session.take_stats())
            stats.seconds += time.perf_counter() - start
            for m, mode in zip(models, modes):
                m.train(mode)


class SpecSession:
    """One sequence under speculation: the context so far, the target's and the draft's caches,
    and how many context tokens each cache holds. `round()` returns the next tokens (1 to k + 1)."""

    def __init__(self, spec: Speculator, prompt: list[int], budget: int, settings: SamplingSettings,
                 generator: torch.Generator | None, banned: Iterable[int]):
        if budget < 1:
            raise LmforgeError("a speculative session needs room for at least one token")
        self.spec, self.settings, self.generator = spec, settings, generator
        self.context = prompt
        self.budget, self.produced = budget, 0
        self.stats = SpecStats()
        # How many tokens to draft next round (at most spec.k), and rounds left without drafting: a
        # draft that keeps failing costs little (module docstring, "adaptive k").
        self.k, self.pause, self.backoff = spec.k, 0, 1
        model, draft = spec.model, spec.draft
        device = model.device
        self.device = device
        self.max_len = len(prompt) + budget - 1  # the last token is never fed back
        # Ids never sampled: beyond the tokenizer's vocabulary, and the caller's bans (tool tokens).
        self.ban = torch.zeros(model.vocab_size, dtype=torch.bool, device=device)
        self.ban[spec.sample_vocab:] = True
        banned = [t for t in banned if 0 <= t < model.vocab_size]
        if banned:
            self.ban[banned] = True
        self.seen = None  # the repetition penalty's tokens so far (prompt and output)
        if settings.penalized:
            self.seen = torch.zeros(model.vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt] = True
        with torch.inference_mode():
            self.cache = model.new_cache(1, self.max_len)
            self.cached = self._prefill(model, self.cache, prompt)
            self.draft_cache, self.draft_cached, self.draft_len = None, 0, 0
            if draft is not None:
                # The draft may have a shorter window: it drafts while the context fits in it.
                self.draft_len = min(draft.context_limit, self.max_len)
                if len(prompt) <= self.draft_len:
                    self.draft_cache = draft.new_cache(1, self.draft_len)
                    self.draft_cached = self._prefill(draft, self.draft_cache, prompt)

    def _prefill(self, model, cache, prompt: list[int]) -> int:
        """All but the last prompt token (that one is fed with the first round's drafts)."""
        if len(prompt) > 1:
            model.prefill(torch.tensor([prompt[:-1]], device=self.device), cache)
        return len(prompt) - 1

    def take_stats(self) -> SpecStats:
        stats, self.stats = self.stats, SpecStats()
        return stats

    def round(self) -> list[int]:
        """One target pass: propose, verify, and return the accepted drafts plus the correction (or
        bonus) token. Never more tokens than the budget has left."""
        with torch.inference_mode():
            C = len(self.context)
            # Drafting more than fits is useless: all accepted plus the bonus exactly fill the budget.
            k = 0 if self.pause else min(self.k, self.budget - self.produced - 1)
            self.pause = max(0, self.pause - 1)
            if self.spec.draft is None:
                drafts, q = lookup_draft(self.context, k, self.spec.max_ngram) if k > 0 else [], None
            else:
                if self.draft_cache is not None:
                    k = min(k, self.draft_len - C + 1)  # the draft feeds positions up to C + k - 2
                drafts, q = self._propose(k) if k > 0 and self.draft_cache is not None else ([], None)
            feed = torch.tensor([self.context[self.cached:] + drafts], device=self.device)
            if feed.size(1) == 1:  # nothing drafted (paused, or no match): the engine's one-token step
                logits = self.spec.model.decode(feed, self.cache, [self.cached])[:, None]
            else:
                logits = self.spec.model.decode_many(feed, self.cache, self.cached)
            p = self._probs(logits[0, -(len(drafts) + 1):], drafts, self.seen)
            accepted, nxt = self._verify(p, q, drafts)
            self._adapt(len(drafts), accepted)
            new = drafts[:accepted] + [nxt]
            self.cached = C + accepted
            self.draft_cached = min(self.draft_cached, C + accepted)
            self.context += new
            self.produced += len(new)
            if self.seen is not None:
                self.seen[new] = True
            self.stats.target_passes += 1
            self.stats.proposed += len(drafts)
            self.stats.accepted += accepted
            return new

    def _adapt(self, proposed: int, accepted: int) -> None:
        """Draft more after a round that accepted everything (+2, up to spec.k), less after one that
        did not (-1); after a one-token draft is rejected, stop drafting for 1, 2, 4, ... up to 32
        rounds. k only depends on rounds already decided, so the output distribution stays the target's."""
        if proposed == 0:
            return
        if accepted == proposed:
            self.k, self.backoff = min(self.spec.k, self.k + 2), 1
        elif accepted == 0 and self.k == 1:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, MAX_PAUSE)
        else:
            self.k = max(1, self.k - 1)

    def _probs(self, logits: torch.Tensor, drafts: list[int], seen: torch.Tensor | None) -> torch.Tensor:
        """The sampling distributions of rows of logits, row j after the context and drafts[:j]
        (the repetition penalty counts those drafts as seen)."""
        logits = logits.float().masked_fill(self.ban, float("-inf"))
        rows = None
        if seen is not None:
            rows = seen.expand(logits.size(0), -1).clone()
            for j, t in enumerate(drafts[:logits.size(0) - 1]):
                rows[j + 1:, t] = True
        return self.settings.probs(logits, rows)

    def _propose(self, k: int) -> tuple[list[int], torch.Tensor]:
        """k tokens sampled from the draft model, one at a time, and their distributions q (k, V)."""
        draft, C = self.spec.draft, len(self.context)
        catch_up = self.context[self.draft_cached:]  # 1 token, or 2 after a round that accepted all
        if len(catch_up) == 1:
            logits = draft.decode(torch.tensor([catch_up], device=self.device), self.draft_cache,
                                  [self.draft_cached], step_fn=self.spec.draft_step)
        else:
            logits = draft.decode_many(torch.tensor([catch_up], device=self.device), self.draft_cache,
                                       self.draft_cached)[:, -1]
        seen = None if self.seen is None else self.seen.clone()
        drafts, qs = [], []
        for i in range(k):
            q = self._probs(logits, [], None if seen is None else seen[None])[0]
            x = self._draw(q)
            drafts.append(x)
            qs.append(q)
            if seen is not None:
                seen[x] = True
            if i < k - 1:
                logits = draft.decode(torch.tensor([[x]], device=self.device), self.draft_cache, [C + i],
                                      step_fn=self.spec.draft_step)
        self.draft_cached = C + k - 1  # the last draft is never fed to the draft model
        return drafts, torch.stack(qs)

    def _verify(self, p: torch.Tensor, q: torch.Tensor | None, drafts: list[int]) -> tuple[int, int]:
        """(how many drafts are accepted, the token after them) by the rejection rule; q None: point
        masses (prompt lookup)."""
        for i, x in enumerate(drafts):
            px = float(p[i, x])
            qx = 1.0 if q is None else float(q[i, x])
            # accept with probability min(1, p/q): u < p/q for u uniform in [0, 1)
            if float(torch.rand((), generator=self.generator, device=p.device)) < px / qx:
                continue
            if q is None:
                residual = p[i].clone()
                residual[x] = 0.0
            else:
                residual = (p[i] - q[i]).clamp_(min=0.0)
            if not float(residual.sum()) > 0.0:  # p == q up to rounding (then rejection is near impossible)
                residual = p[i]
            return i, self._draw(residual)
        return len(drafts), self._draw(p[len(drafts)])

    def _draw(self, dist: torch.Tensor) -> int:
        """A token from a distribution (unnormalized is fine). Greedy, every distribution here is a
        point mass (p, and p - q clamped at 0), so its argmax is the draw, without multinomial's
        ~1 ms over a 32k vocabulary, which would cost a paused round a few percent of a 124M step."""
        if self.settings.temperature == 0:
            return int(dist.argmax())
        return int(torch.multinomial(dist, 1, generator=self.generator))


def speculator_from(model, tokenizer, *, draft_path=None, load_draft=None, prompt_lookup: bool = False,
                    k: int = DEFAULT_K, dtype: str | None = None, compile: bool = False) -> Speculator | None:
    """The Speculator a command's --draft PATH / --prompt-lookup ask for, or None without either.
    load_draft(path) -> (model, tokenizer) reads the draft checkpoint, which must carry the model's
    tokenizer (the same ids are not enough: the same text must give the same ids)."""
    if draft_path is None and not prompt_lookup:
        return None
    draft = None
    if draft_path is not None:
        draft, draft_tok = load_draft(draft_path)
        if tokenizer is not None and draft_tok.fingerprint != tokenizer.fingerprint:
            raise LmforgeError(f"the draft model {draft_path} has another tokenizer than the model: "
                               "speculation needs the same one")
    return Speculator(model, tokenizer, draft=draft, prompt_lookup=prompt_lookup, k=k, dtype=dtype, compile=compile)
