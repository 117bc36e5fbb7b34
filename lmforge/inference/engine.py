"""The inference engine: batched generation from a model's decode state, with stop handling and streaming.

`sampling.generate` re-runs the model over the whole sequence for every new token. The engine
runs each prompt through the model once (prefill), keeps what the model needs to continue — its
decode state (lmforge/models/protocol.py): for the transformer every layer's keys and values in a
preallocated cache (`models.transformer.KVCache`), for an LSTM its (h, c) — and then feeds only the
newest token of each row (decode). The padding and slot rules below are the transformer's; a
recurrent state simply advances one token per row and step.

Batching prompts of different lengths: the rows are right-padded, and every token lives in the
cache slot equal to its position. The alternative, left-padding, lines up the rows' ends so all
rows write the same slot each step, but then every row needs a position offset (for RoPE and for
learned positions alike), the prefill needs a combined causal + padding mask (and padding queries
with nothing to attend to produce NaN), and the longest prompt eats into every row's window. With
right-padding, positions are just 0..T-1 for every row, so each row computes exactly what it would
alone; the prefill needs only the causal mask, because padding comes after every real token of its
row; each decode step writes each row's token to its own slot (overwriting the padding there) and
masks the slots beyond each row's position. Rows that finish are dropped from the batch.

Usage:
    engine = Engine(model, tokenizer)
    [c] = engine.generate([prompt_ids], 100, temperature=0.8, top_p=0.95, seed=0)
    for piece in engine.stream(prompt_ids, 100):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.common import LmforgeError
from lmforge.inference.precision import prepare_for_inference, weight_dtype
from lmforge.inference.sampling import check_sampling_args, sample_next
from lmforge.models.protocol import require_decoding, tokens_left

# A reply ends at the end of the assistant's turn; any text ends at end-of-text (bos doubles as it).


@dataclass
class Completion:
    """One row's result.

    tokens: the generated ids. A stop id is not included; the tokens that spell a stop string are
        (a token may hold text on both sides of where the stop string starts).
    text: the decoded tokens, cut just before the stop string if one ended generation. Bytes that are
        not valid UTF-8 become U+FFFD, as in `Tokenizer.decode`. Empty without a tokenizer.
    finish_reason: "stop" (a stop id or stop string) or "length" (max_new_tokens, or the prompt plus
        output filled the context window).
    stop: the stop id or stop string that ended generation, else None."""

    tokens: list[int]
    text: str
    finish_reason: str
    stop: int | str | None = None


@dataclass(frozen=True)
class _Settings:
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None
    use_cache: bool


class RowOutput:
    """The output of one sequence being generated: its tokens, its text so far, and whether and why
    it stopped (shared by the engine and the server's scheduler).

    Text is decoded incrementally: a multi-byte character split across tokens is held back until its
    last byte arrives. Text that could be the start of a stop string is held back too, so streamed
    pieces never contain any part of a stop string."""

    def __init__(self, budget: int, stop_ids: frozenset[int], stop_strings: tuple[str, ...], tokenizer):
        self.budget = budget  # most tokens this row may generate
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # length of the text already handed out
        self.finish_reason: str | None = None if budget > 0 else "length"
        self.stop: int | str | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take the row's next sampled token; returns the text that can be handed out now."""
        if token in self.stop_ids:
            self.finish_reason, self.stop = "stop", token
            return self._flush()
        self.tokens.append(token)
        if self.tokenizer is not None:
            old_len = len(self.text)
            self.text += self._utf8.decode(self.tokenizer.token_bytes(token))
            if self.stop_strings and self._cut_at_stop_string(old_len):
                return self._release(len(self.text))
        if len(self.tokens) >= self.budget:
            self.finish_reason = "length"
            return self._flush()
        return self._release(len(self.text) - self._held_back())

    def completion(self) -> Completion:
        return Completion(self.tokens, self.text, self.finish_reason, self.stop)

    def _cut_at_stop_string(self, old_len: int) -> bool:
        # Only an occurrence that ends in the new text is new; earlier text was searched before.
        start = max(0, old_len - max(map(len, self.stop_strings)) + 1)
        found = [(i, s) for s in self.stop_strings if (i := self.text.find(s, start)) >= 0]
        if not found:
            return False
        i, s = min(found)
        self.text = self.text[:i]
        self.finish_reason, self.stop = "stop", s
        return True

    def _held_back(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _flush(self) -> str:
        if self.tokenizer is not None:
            self.text += self._utf8.decode(b"", final=True)  # an unfinished character becomes U+FFFD
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], end
        return piece


def checked_stops(stop_ids, stop_strings, default_stop_ids: frozenset[int], tokenizer
                  ) -> tuple[frozenset[int], tuple[str, ...]]:
    """The stop ids (None: the defaults) and stop strings (one string or several) of a generation
    call, checked: stop strings need a tokenizer and must be non-empty strings."""
    stop_ids = default_stop_ids if stop_ids is None else frozenset(int(t) for t in stop_ids)
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    if stop_strings and tokenizer is None:
        raise LmforgeError("stop strings need a tokenizer")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise LmforgeError("stop strings must be non-empty strings")
    return stop_ids, stop_strings


def _right_padded(prompts: list[list[int]], width: int, device) -> torch.Tensor:
    return torch.tensor([p + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)


class CompiledDecodeStep:
    """`model.decode_step` under torch.compile: at batch 1 on a small model a decode step is mostly
    per-operation overhead (a few microseconds for each of ~100 small ops), which compiling fuses
    away (docs/benchmarks.md). dynamic=True: one graph serves every cache length and batch size
    instead of recompiling as they change. If compiling fails here (no C++ compiler, an unsupported
    backend), it warns once and runs the plain step from then on."""

    def __init__(self, model):
        self.plain = model.decode_step
        self.compiled = torch.compile(model.decode_step, dynamic=True)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # inductor raises many types; a real error recurs in the plain step
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); decoding without it", stacklevel=2)
                self.failed = True
        return self.plain(*args)


def compiled_decode_step(model) -> CompiledDecodeStep | None:
    """A torch.compile'd decode step to pass as `decode(..., step_fn=...)`, or None for a family
    without a `decode_step` (its decode is not one tensor graph; it runs as it is)."""
    return CompiledDecodeStep(model) if callable(getattr(model, "decode_step", None)) else None


class _CachedRunner:
    """Prefill once, then one token per row and step from the key/value cache."""

    def __init__(self, model, prompts: list[list[int]], max_len: int, dtype: torch.dtype | None,
                 step_fn=None):
        self.model = model
        self.step_fn = step_fn
        self.prompts = prompts
        self.positions = [len(p) for p in prompts]  # where each row's next token goes
        # One spare slot when compiled: the last step would otherwise attend to exactly the whole
        # buffer, a shape relation torch.compile specializes on (a second graph, compiled again).
        self.cache = model.new_cache(len(prompts), max_len + (step_fn is not None), dtype)

    def start(self) -> torch.Tensor:
        device = self.model.device
        idx = _right_padded(self.prompts, max(self.positions), device)
        last = torch.tensor([n - 1 for n in self.positions], device=device)
        return self.model.prefill(idx, self.cache, last)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode(tokens[:, None], self.cache, self.positions, step_fn=self.step_fn)
        self.positions = [p + 1 for p in self.positions]
        return logits

    def keep(self, rows: list[int], index: torch.Tensor) -> None:
        self.cache.keep(index)
        self.positions = [self.positions[j] for j in rows]


class _RecomputeRunner:
    """The baseline: every step runs the whole (right-padded) batch of sequences through the model.
    Causal attention keeps each row's real tokens blind to the padding after them."""

    def __init__(self, model, prompts: list[list[int]], max_len: int):
        self.model = model
        self.lengths = [len(p) for p in prompts]
        self.ids = _right_padded(prompts, max_len, model.device)

    def start(self) -> torch.Tensor:
        return self._last_logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(self.lengths), device=self.ids.device)
        self.ids[rows, torch.tensor(self.lengths, device=self.ids.device)] = tokens
        self.lengths = [n + 1 for n in self.lengths]
        return self._last_logits()

    def keep(self, rows: list[int], index: torch.Tensor) -> None:
        self.ids = self.ids.index_select(0, index)
        self.lengths = [self.lengths[j] for j in rows]

    def _last_logits(self) -> torch.Tensor:
        logits = self.model(self.ids[:, :max(self.lengths)])
        rows = torch.arange(len(self.lengths), device=self.ids.device)
        return logits[rows, torch.tensor(self.lengths, device=self.ids.device) - 1]


class Engine:
    """Generates from any lmforge language model (lmforge/models/protocol.py) through its decode
    state: a key/value cache for a transformer, (h, c) for an LSTM, the last tokens for an n-gram.
    The tokenizer is needed for text (stop strings,
    streaming, Completion.text); without it the engine works on token ids only.

    dtype: None (the default) computes in the dtype the weights are stored in (fp32 when trained here,
    bf16 when imported so). "bf16" or "fp32" casts the model's weights to that dtype once, in place
    (lmforge/inference/precision.py: the model passed in is the engine's from then on), and keeps the
    cache in it: a bf16 step reads half the bytes of an fp32 one, with nothing converted per step.
    bf16 is not bit-comparable with fp32; fp32 is exact. On a CPU the linear layers compute from
    oneDNN-packed copies of their weights (lmforge/inference/packed.py: 2-3x faster matrix-vector
    products, at the price of a second copy of those weights in memory).

    compile=True runs each decode step as one torch.compile'd graph: faster per token once compiled
    (the first generation pays ~10-30 s of compiling on a CPU), worth it for a server, a benchmark or
    a long batch job, not for one short answer. Logits agree with the plain step to float rounding.
    The model's weights may still change between generations (training in between): they are
    inputs of the graph, not constants baked into it."""

    def __init__(self, model, tokenizer=None, *, dtype: str | None = None, compile: bool = False):
        require_decoding(model, "the inference engine (chat, tools, evaluation by generation)")
        prepare_for_inference(model, dtype, compile=compile)
        self.model = model
        self.step_fn = compiled_decode_step(model) if compile else None
        self.tokenizer = tokenizer
        self.device = model.device
        # The decode state's dtype: the weights' (None lets the family choose, e.g. an n-gram's counts).
        self.cache_dtype = weight_dtype(model)
        vocab = model.vocab_size
        # A model's vocabulary may be padded beyond the tokenizer's (e.g. to a multiple of 64):
        # ids the tokenizer cannot decode are never sampled.
        self.sample_vocab = vocab if tokenizer is None else min(vocab, tokenizer.vocab_size)
        self.default_stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop_ids: Iterable[int] | None = None, stop_strings: Iterable[str] = (),
                 use_cache: bool = True) -> list[Completion]:
        """Continue each prompt (a list of token ids); one Completion per prompt, in order.

        Each row stops on its own: at a stop id (default: end-of-turn and end-of-text, when there is
        a tokenizer; pass () for none), at a stop string (found in the decoded text, not included in
        it), after max_new_tokens, or when prompt plus output fill the context window: the engine
        never slides the window (unlike `sampling.generate`), so the whole sequence can be fed
        back to the model, e.g. as the next chat turn's prompt.

        temperature 0 is greedy; top_k, top_p, min_p and repetition_penalty as in
        `sampling.sample_next`. seed makes sampling reproducible (a private generator: the global RNG
        is untouched); the batch shares it, so a row's samples depend on the other rows.
        use_cache=False recomputes the full sequences at every step (the reference, for tests and
        benchmarks)."""
        prompts, rows, settings = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                                repetition_penalty, seed, stop_ids, stop_strings, use_cache)
        for _ in self._steps(prompts, rows, settings):
            pass
        return [row.completion() for row in rows]

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop_ids: Iterable[int] | None = None, stop_strings: Iterable[str] = (),
               use_cache: bool = True) -> Iterator[str]:
        """Generate from one prompt, yielding text as soon as it is complete UTF-8 (and cannot be
        part of a stop string). The pieces join to the text `generate` returns for the same
        arguments. Arguments are checked here, before the first piece is asked for."""
        if self.tokenizer is None:
            raise LmforgeError("streaming text needs a tokenizer")
        prompts, rows, settings = self._prepare([prompt_ids], max_new_tokens, temperature, top_k, top_p, min_p,
                                                repetition_penalty, seed, stop_ids, stop_strings, use_cache)
        return (piece for _, piece in self._steps(prompts, rows, settings))

    # ------------------------------------------------------------------ internals

    def _prepare(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                 stop_ids, stop_strings, use_cache):
        check_sampling_args(temperature, top_k, top_p, max_new_tokens, min_p, repetition_penalty)
        model = self.model
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise LmforgeError("give a non-empty list of prompts, each a list of token ids")
        if any(isinstance(p, int) for p in prompts):
            raise LmforgeError("generate takes a list of prompts; for one prompt pass [prompt_ids]")
        prompts = [[int(t) for t in p] for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise LmforgeError(f"prompt {i} is empty (give at least one token, e.g. the bos token)")
            if tokens_left(model, len(p)) < 0:
                raise LmforgeError(f"prompt {i} is {len(p)} tokens, longer than the model's context "
                                   f"window of {model.context_limit} tokens")
            if not all(0 <= t < model.vocab_size for t in p):
                raise LmforgeError(f"prompt {i} has token ids outside the model's vocabulary "
                                   f"(0..{model.vocab_size - 1})")
        stop_ids, stop_strings = checked_stops(stop_ids, stop_strings, self.default_stop_ids, self.tokenizer)
        rows = [RowOutput(min(max_new_tokens, tokens_left(model, len(p))), stop_ids, stop_strings, self.tokenizer)
                for p in prompts]
        settings = _Settings(temperature, top_k, top_p, min_p, repetition_penalty, seed, use_cache)
        return prompts, rows, settings

    def _context(self):
        """Inference mode, entered for each step's computation only: a stream suspended between
        pieces must not leave the caller's code in inference mode."""
        return torch.inference_mode()

    def _sample(self, logits: torch.Tensor, s: _Settings, seen, generator) -> torch.Tensor:
        if self.sample_vocab < logits.size(-1):
            logits[:, self.sample_vocab:] = float("-inf")
        return sample_next(logits, s.temperature, s.top_k, s.top_p, generator, min_p=s.min_p,
                           repetition_penalty=s.repetition_penalty, seen=seen)

    def _steps(self, prompts: list[list[int]], rows: list[RowOutput], s: _Settings) -> Iterator[tuple[int, str]]:
        """Run generation, yielding (row index, text piece) as rows produce text."""
        live = [i for i, row in enumerate(rows) if not row.done]  # batch position -> row index
        if not live:
            return
        prompts = [prompts[i] for i in live]
        # Cache slots a row needs: its prompt plus every output token but the last (never fed back).
        max_len = max(max(len(p) for p in prompts),
                      max(len(p) + rows[i].budget - 1 for p, i in zip(prompts, live)))
        generator = None
        if s.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(s.seed)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with self._context():
                if s.use_cache:
                    runner = _CachedRunner(model, prompts, max_len, self.cache_dtype, self.step_fn)
                else:
                    runner = _RecomputeRunner(model, prompts, max_len)
                seen = None
                if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
                    seen = torch.zeros(len(prompts), model.vocab_size, dtype=torch.bool,
                                       device=self.device)
                    for b, p in enumerate(prompts):
                        seen[b, p] = True
                logits = runner.start()
            while True:
                with self._context():
                    tokens = self._sample(logits, s, seen, generator)
                keep = []
                for j, (i, t) in enumerate(zip(live, tokens.tolist())):
                    piece = rows[i].add(t)
                    if piece:
                        yield i, piece
                    if not rows[i].done:
                        keep.append(j)
                if not keep:
                    return
                with self._context():
                    if len(keep) < len(live):  # drop finished rows: no compute spent on them
                        index = torch.tensor(keep, device=self.device)
                        runner.keep(keep, index)
                        tokens = tokens[index]
                        seen = None if seen is None else seen[index]
                        live = [live[j] for j in keep]
                    if seen is not None:
                        seen[torch.arange(len(live), device=self.device), tokens] = True
                    logits = runner.step(tokens)
        finally:
            model.train(was_training)
