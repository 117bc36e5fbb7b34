"""Continuous batching: many requests share the model's decode steps, and new ones join between steps.

`Engine.generate` batches a fixed set of prompts. A server cannot wait for a batch to fill, nor make
a new request wait for the running batch to finish: a request arriving mid-way should start at the
next step. The scheduler keeps one running batch, a key/value cache with one row per sequence:

    step():  drop rows whose client went away
             admit waiting sequences: prefill them together (their own cache, right-padded), sample
             each one's first token, and concatenate their cache rows onto the running batch
             one decode step for every row (each at its own position: model.decode handles that)
             sample each row's next token with the row's own settings, hand out its text
             drop finished rows (cache.keep)

Every row's cache is allocated at the model's full context window, so caches admitted at
different times always have the same length and concatenate along the batch dimension.

One background thread runs the loop (torch releases the GIL during compute, so the HTTP server
stays responsive). Sequences report through an `emit` callback, called on that thread; the server
turns it into an asyncio queue per request, so a slow client never holds up the loop.

Tool calls: when a sequence may call tools, `<|tool_call_start|>` ends its content; the tokens after
it, up to `<|tool_call_end|>`, are the call's JSON (lmforge/chat.py's format), parsed and handed out
as a tool call with finish reason "tool_calls".

Speculative decoding (Scheduler(speculator=...), `lmforge serve --draft/--prompt-lookup`): each
request runs at batch 1 through its own speculative session (lmforge/inference/speculative.py):
a step runs one round (draft, verify, 1 to k + 1 tokens) for every live request in turn, up to
max_batch of them, each with a cache of its own prompt plus budget. Speculation pays where a
decode step is bound by reading the weights for a single row; a batch of rows already shares that
read, and rows that accept different numbers of drafts would drift out of step. So a server that
mostly sees one request at a time gains from it, and a busy one should batch instead.

A masked diffusion model (after `lmforge sft`; lmforge/inference/diffusion.py) has no token-by-token
step: each admitted sequence's whole reply, its budget of masked positions, is filled in
`diffusion_steps` passes (default: one per position), then handed to the sequence token by token
like decoded ones, so stop tokens, stop strings, max_tokens and tool calls apply as they arrive.

This file is long because one loop serves three ways of producing tokens (batched decode steps,
speculative sessions, whole diffusion replies) through the same sequences, events and failure
handling, which would otherwise be repeated per way.

Failures: a step that raises (a bug, an out-of-memory) fails every sequence it held, the running
rows and those it was admitting (already off the waiting list), each with one "error" event, so no
client waits forever; the loop keeps serving and /health shows the count and the last message.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.chat import parse_tool_call
from lmforge.common import LmforgeError
from lmforge.inference.engine import RowOutput, compiled_decode_step
from lmforge.inference.precision import prepare_for_inference, weight_dtype
from lmforge.inference.sampling import check_sampling_args, sample_next
from lmforge.inference.speculative import SamplingSettings, SpecSession
from lmforge.models.protocol import require_decoding, tokens_left

log = logging.getLogger("lmforge.serve")


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's generation settings (checked by `Scheduler.submit`)."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    tools: bool = False  # may the model call a tool (its call becomes a tool_call event)
    ban_tool_tokens: bool = False  # never sample the tool-call tokens (a chat request without tools)
    tool_prefix: str | None = None  # the call was forced: this text (JSON) already follows <|tool_call_start|>


@dataclass
class Event:
    """What a sequence reports. kind: "text" (text = the new piece), "tool_call" (tool_call =
    {"name", "arguments"}), "done" (finish_reason, token counts), "error" (text = message)."""
    kind: str
    seq_id: int
    text: str = ""
    tool_call: dict | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Sequence:
    """One prompt being continued: its tokens, sampling settings and where its text stands."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None], tokenizer,
                 budget: int, stop_ids: frozenset[int], call_ids: tuple[int, int]):
        self.id = next(Sequence._ids)
        self.prompt = prompt
        self.params = params
        self.emit = emit
        self.tok = tokenizer
        self.budget = budget  # tokens this sequence may sample in total
        self.generated = 0  # tokens sampled so far (stop tokens included: the model produced them)
        self.tokens: list[int] = []  # those tokens (a server-run tool call continues after them)
        self.cancelled = False
        self.finish_reason: str | None = None
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed)
        self.call_start, self.call_end = call_ids
        self.stop_ids = stop_ids
        self.in_call = params.tool_prefix is not None
        if self.in_call:  # forced call: generation starts inside the call's JSON
            self.row = RowOutput(budget, stop_ids | {self.call_end}, (), tokenizer)
        else:
            content_stops = stop_ids | ({self.call_start} if params.tools else set())
            self.row = RowOutput(budget, content_stops, params.stop, tokenizer)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def banned(self) -> list[int]:
        """Ids this sequence must not sample."""
        return [self.call_start, self.call_end] if self.params.ban_tool_tokens and self.call_start >= 0 else []

    def add(self, token: int) -> None:
        """Take the next sampled token: hand out text, switch to the tool call, or finish."""
        self.generated += 1
        self.tokens.append(token)
        piece = self.row.add(token)
        if not self.in_call:
            if piece:
                self._emit(Event("text", self.id, text=piece))
            if not self.row.done:
                return
            if self.row.stop == self.call_start:
                if self.generated >= self.budget:  # a call begun with no room left for it
                    self._finish("length")
                    return
                # The content ended where a tool call begins: collect the call's JSON next.
                self.in_call = True
                self.row = RowOutput(self.budget - self.generated, self.stop_ids | {self.call_end}, (), self.tok)
                return
            self._finish("length" if self.row.finish_reason == "length" else "stop")
            return
        if not self.row.done:
            return
        call_text = (self.params.tool_prefix or "") + self.row.text
        if self.row.stop == self.call_end:
            try:
                call = parse_tool_call(call_text)
            except LmforgeError:
                call = None
            if call is not None:
                self._emit(Event("tool_call", self.id, tool_call=call))
                self._finish("tool_calls")
                return
        # A call cut short or malformed: nothing is dropped, its text becomes content.
        self._emit(Event("text", self.id, text=call_text))
        self._finish("length" if self.row.finish_reason == "length" else "stop")

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self._emit(Event("error", self.id, text=message))

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._emit(Event("done", self.id, finish_reason=reason, prompt_tokens=len(self.prompt),
                         completion_tokens=self.generated))

    def _emit(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # the receiving side is gone (e.g. its event loop closed): stop working for it
            self.cancelled = True


@dataclass
class SchedulerStats:
    """Counters for tests, /health and the benchmark."""
    decode_steps: int = 0
    prefills: int = 0
    admitted: int = 0
    joined_running: int = 0  # sequences admitted while others were mid-generation (continuous batching)
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    generated_tokens: int = 0
    max_rows: int = 0  # most rows in one decode step
    draft_proposed: int = 0  # speculation: draft tokens proposed, and of them accepted by the model
    draft_accepted: int = 0
    last_error: str | None = None  # the latest failed step's message (the loop keeps serving)
    rows_per_step: Counter = field(default_factory=Counter)  # decode steps by batch size

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "rows_per_step"}
        d["rows_per_step"] = {str(k): v for k, v in sorted(self.rows_per_step.items())}
        d["shared_steps"] = sum(v for k, v in self.rows_per_step.items() if k > 1)
        return d


class Scheduler:
    """Runs a model over a changing batch of sequences. `submit` from any thread; `start()` runs the
    loop on a background thread (or call `step()` yourself, e.g. in tests)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, dtype: str | None = None, compile: bool = False,
                 speculator=None, diffusion_steps: int | None = None):
        """dtype: None runs the weights as stored; "fp32" or "bf16" casts them once, in place, as
        Engine(dtype=...) does (a speculator's draft model too). speculator: a
        `speculative.Speculator` of this model: every request decodes through it (module docstring).
        diffusion_steps: a masked diffusion model's passes per reply (None: one per token)."""
        if max_batch < 1:
            raise LmforgeError(f"max batch must be >= 1, got {max_batch}")
        self.diffusion = getattr(model, "generation", None) == "diffusion"
        if not self.diffusion:
            require_decoding(model, "the server")
        elif speculator is not None:
            raise LmforgeError("speculative decoding needs token-by-token decoding; a masked diffusion model "
                               "writes a whole reply at once")
        if diffusion_steps is not None and diffusion_steps < 1:
            raise LmforgeError(f"diffusion steps must be >= 1, got {diffusion_steps}")
        self.diffusion_steps = diffusion_steps
        if speculator is not None and speculator.model is not model:
            raise LmforgeError("the speculator was built for another model than the server's")
        prepare_for_inference(model, dtype, compile=compile)
        if speculator is not None and speculator.draft is not None:
            prepare_for_inference(speculator.draft, dtype, compile=compile)
        self.model = model.eval()
        self.spec = speculator
        if speculator is not None and speculator.draft is not None:
            speculator.draft.eval()
        self._sessions: dict[int, SpecSession] = {}  # sequence id -> its speculative session
        self.tok = tokenizer
        self.max_batch = max_batch
        self.step_fn = compiled_decode_step(model) if compile and not self.diffusion else None  # Engine(compile=True)
        self.device = model.device
        self.cache_dtype = weight_dtype(model)
        # A model's vocabulary may be padded beyond the tokenizer's: those ids are never sampled.
        self.sample_vocab = min(model.vocab_size, tokenizer.vocab_size)
        self.stop_ids = tokenizer.stop_ids
        # A chat template without tool-call tokens: no call can start (the server refuses tool requests).
        self.call_ids = tokenizer.tool_call_ids or (-1, -1)
        self.stats = SchedulerStats()
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # the running batch, in cache row order
        self._next: torch.Tensor | None = None  # each row's next input token
        self._positions: list[int] = []  # each row's next cache slot
        self._cache = None
        # Sequences taken off the waiting list for this step's prefill: until they join _rows, a
        # failure must still reach them (else their clients wait forever).
        self._admitting: list[Sequence] = []
        self._cv = threading.Condition()
        self._paused = False
        self._in_step = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Sequence:
        """Queue a prompt; events go to `emit` (called on the scheduler's thread). Raises
        LmforgeError for a prompt that does not fit or bad settings."""
        check_sampling_args(params.temperature, params.top_k, params.top_p, params.max_tokens, params.min_p)
        if self.diffusion and params.min_p is not None:
            raise LmforgeError("min_p is not offered by the diffusion samplers (temperature, top_k and top_p are)")
        if not prompt:
            raise LmforgeError("the prompt is empty")
        room = tokens_left(self.model, len(prompt))
        if room <= 0:
            raise LmforgeError(f"the prompt is {len(prompt)} tokens; the model's context window is "
                               f"{self.model.context_limit} tokens and the reply needs at least one")
        if not all(0 <= t < self.model.vocab_size for t in prompt):
            raise LmforgeError(f"prompt token ids must be in 0..{self.model.vocab_size - 1}")
        budget = min(params.max_tokens, room)
        seq = Sequence(list(prompt), params, emit, self.tok, budget, self.stop_ids, self.call_ids)
        with self._cv:
            if budget == 0:  # nothing to generate: finished at once
                seq._finish("length")
                return seq
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves the batch at the next step."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify_all()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def paused(self):
        """Hold the loop between steps (tests use it to line up requests without relying on timing)."""
        with self._cv:
            self._paused = True
            while self._in_step:
                self._cv.wait()
        try:
            yield self
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def snapshot(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._rows), "max_batch": self.max_batch,
                    **self.stats.as_dict()}

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (self._paused or not (self._waiting or self._rows)):
                    self._cv.wait()
                if self._stopping:
                    for seq in list(self._rows) + list(self._waiting):
                        if not seq.done:
                            seq.fail("the server is shutting down")
                    return
                self._in_step = True
            try:
                self.step()
            except Exception as e:  # a bug or an out-of-memory: fail the batch, keep serving
                log.error("scheduler step failed:\n%s", traceback.format_exc())
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._in_step = False
                    self._cv.notify_all()

    def step(self) -> None:
        """One round: drop cancelled rows, admit waiting sequences, one decode step for all rows."""
        with self._cv:
            for seq in self._waiting:
                if seq.cancelled:
                    self.stats.cancelled += 1
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            room = self.max_batch - len(self._rows) + sum(s.cancelled for s in self._rows)
            new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self._admitting = new
        with self._context():
            self._drop_rows(cancelled=True)
            if new and self.diffusion:
                self._fill(new)
            elif new:
                (self._admit if self.spec is None else self._admit_speculative)(new)
            with self._cv:
                self._admitting = []
            if self._rows:
                (self._decode if self.spec is None else self._speculate)()

    # ------------------------------------------------------------------ internals

    def _context(self):
        return torch.inference_mode()

    def _admit(self, new: list[Sequence]) -> None:
        if self._rows:
            self.stats.joined_running += len(new)
        self.stats.admitted += len(new)
        self.stats.prefills += 1
        width = max(len(s.prompt) for s in new)
        idx = torch.tensor([s.prompt + [0] * (width - len(s.prompt)) for s in new], dtype=torch.long,
                           device=self.device)
        last = torch.tensor([len(s.prompt) - 1 for s in new], device=self.device)
        # Every row's state spans the whole window, so that states of rows admitted at different
        # times can be joined into one batch.
        cache = self.model.new_cache(len(new), None, self.cache_dtype)
        logits = self.model.prefill(idx, cache, last)
        tokens = self._sample(logits, new)
        if self._cache is None or not self._rows:
            self._cache, self._rows, self._next = cache, [], tokens[:0]
            self._positions = []
        else:
            self._cache.extend(cache)
        self._rows += new
        self._next = torch.cat([self._next, tokens])
        self._positions += [len(s.prompt) for s in new]
        for seq, t in zip(new, tokens.tolist()):
            seq.add(t)
        self._drop_rows()

    def _fill(self, new: list[Sequence]) -> None:
        """A masked diffusion model: each sequence's reply written whole, then handed out token by
        token (module docstring). The sequences never join the running batch."""
        from lmforge.inference.diffusion import diffusion_generate

        self.stats.admitted += len(new)
        for seq in new:
            if seq.cancelled:
                self.stats.cancelled += 1
                continue
            p = seq.params
            self.stats.prefills += 1
            reply = diffusion_generate(self.model, seq.prompt, seq.budget, min(self.diffusion_steps or seq.budget,
                                                                                seq.budget),
                                       temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
            for token in reply[0, len(seq.prompt):].tolist():
                seq.add(token)
                self.stats.generated_tokens += 1
                if seq.done or seq.cancelled:
                    break
            if not seq.done and not seq.cancelled:  # every position filled, no stop among them
                seq._finish("length")
            self.stats.finished += seq.done

    def _admit_speculative(self, new: list[Sequence]) -> None:
        """Each sequence gets a speculative session of its own (its prompt prefilled at batch 1)."""
        if self._rows:
            self.stats.joined_running += len(new)
        self.stats.admitted += len(new)
        for seq in new:
            p = seq.params
            settings = SamplingSettings(p.temperature, p.top_k, p.top_p, p.min_p)
            self._sessions[seq.id] = self.spec.session(seq.prompt, seq.budget, settings, seq.generator, seq.banned())
            self.stats.prefills += 1
            self._rows.append(seq)

    def _speculate(self) -> None:
        """One speculative round for each live sequence in turn; a sequence takes the round's
        tokens until it is done (the rest of the round is dropped with its session)."""
        self.stats.max_rows = max(self.stats.max_rows, 1)
        for seq in list(self._rows):
            session = self._sessions[seq.id]
            self.stats.decode_steps += 1
            self.stats.rows_per_step[1] += 1
            for t in session.round():
                self.stats.generated_tokens += 1
                seq.add(t)
                if seq.done or seq.cancelled:
                    break
            st = session.take_stats()
            self.stats.draft_proposed += st.proposed
            self.stats.draft_accepted += st.accepted
        self._drop_rows()

    def _decode(self) -> None:
        self.stats.decode_steps += 1
        self.stats.rows_per_step[len(self._rows)] += 1
        self.stats.max_rows = max(self.stats.max_rows, len(self._rows))
        logits = self.model.decode(self._next[:, None], self._cache, self._positions, step_fn=self.step_fn)
        self._positions = [p + 1 for p in self._positions]
        tokens = self._sample(logits, self._rows)
        self._next = tokens
        for seq, t in zip(self._rows, tokens.tolist()):
            seq.add(t)
        self._drop_rows()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Each row with its own settings. Rows that share settings and no private generator are
        sampled together; a seeded row draws from its own generator, so its output does not depend
        on which other requests share the batch."""
        self.stats.generated_tokens += len(seqs)
        logits = logits.float()
        if self.sample_vocab < logits.size(-1):
            logits[:, self.sample_vocab:] = float("-inf")
        for b, seq in enumerate(seqs):
            banned = seq.banned()
            if banned:
                logits[b, banned] = float("-inf")
        out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for b, seq in enumerate(seqs):
            p = seq.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p, b if seq.generator is not None else -1)
            groups.setdefault(key, []).append(b)
        for (temperature, top_k, top_p, min_p, _), rows in groups.items():
            index = torch.tensor(rows, device=logits.device)
            gen = seqs[rows[0]].generator
            group_logits = logits.index_select(0, index)
            if gen is not None and group_logits.device.type != "cpu":
                group_logits = group_logits.cpu()  # the per-request generators live on the CPU
            out[index] = sample_next(group_logits, temperature, top_k, top_p, gen, min_p=min_p).to(out.device)
        return out

    def _drop_rows(self, cancelled: bool = False) -> None:
        """Remove finished (and, between steps, cancelled) rows from the batch and its cache."""
        keep = []
        for j, seq in enumerate(self._rows):
            if seq.done:
                self.stats.finished += 1
            elif cancelled and seq.cancelled:
                self.stats.cancelled += 1
                seq.finish_reason = "cancelled"
            else:
                keep.append(j)
        if len(keep) == len(self._rows):
            return
        with self._cv:
            self._rows = [self._rows[j] for j in keep]
        if self.spec is not None:  # no shared cache: a finished sequence's session goes with it
            live = {seq.id for seq in self._rows}
            self._sessions = {i: s for i, s in self._sessions.items() if i in live}
            return
        if keep:
            index = torch.tensor(keep, device=self.device)
            self._cache.keep(index)
            self._next = self._next.index_select(0, index)
            self._positions = [self._positions[j] for j in keep]
        else:  # empty batch: free the cache
            self._cache, self._next, self._positions = None, None, []

    def _fail_all(self, message: str) -> None:
        """Fail every sequence the failed step held: the running rows and those being admitted."""
        with self._cv:
            rows, self._rows = self._rows, []
            admitting, self._admitting = self._admitting, []
            self._cache, self._next, self._positions = None, None, []
            self._sessions = {}
            self.stats.last_error = message
        failed = set()
        for seq in rows + admitting:
            if not seq.done and seq.id not in failed:
                failed.add(seq.id)
                self.stats.errors += 1
                seq.fail(message)
