"""The HTTP server: OpenAI-compatible routes and the chat page, over the continuous-batching scheduler.

This file is long because it holds the whole HTTP layer in reading order: the configuration, the
`Server` object the routes share (request checks, a request's event stream with the server-run
tool loop, collection and streaming), `create_app` with the routes, and the OpenAPI description.

    POST /v1/chat/completions   messages -> reply (tool calls included), JSON or server-sent events
    POST /v1/completions        prompt -> continuation, JSON or server-sent events
    GET  /v1/models             the one model served
    GET  /health                liveness and scheduler counters (no key needed)
    GET  /openapi.json          the routes and their request bodies (no key needed)
    GET  /                      the chat page (static/index.html)

With ServeConfig(tools="builtin") (`lmforge serve --tools builtin`) a chat request that brings no
tools of its own may call lmforge's calculator and python tools: the server runs each call and the
model continues after the result (see `events`); the reply reports them as `tool_runs`.

With ServeConfig(rag_index=INDEX) (`lmforge serve --rag INDEX`) a chat request gets the passages
retrieved for its last user message in its prompt (lmforge/rag.py) unless it says `"rag": false`,
and the response reports them in the extra top-level field `lmforge_rag` (see `Server.retrieve`).

With ServeConfig(draft=CHECKPOINT) or ServeConfig(prompt_lookup=True) (`lmforge serve --draft` /
`--prompt-lookup`) every request decodes speculatively at batch 1 (docs/speculative.md); /health
counts the draft tokens proposed and accepted.

Each request's sequences report to an asyncio queue of their own (the scheduler thread puts events
there with call_soon_threadsafe), so the model loop never waits for a client. A stream whose client
goes away is cancelled and leaves the batch at the next step.

Usage:
    app = create_app(model, tokenizer, ServeConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lmforge.chat import render_messages
from lmforge.common import LmforgeError
from lmforge.inference.scheduler import Event, SamplingParams, Scheduler
from lmforge.models.protocol import tokens_left
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_messages,
    completion_prompts,
    new_id,
    now,
    parse_request,
    sse,
    tool_call_obj,
    tool_choice_mode,
    tools_system_text,
    usage,
)

log = logging.getLogger("lmforge.serve")


@dataclass
class ServeConfig:
    model_name: str = "lmforge"
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 routes when set
    max_batch: int = 16  # most sequences decoded together (1 = one at a time)
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # default: the context window minus one (no limit without a window)
    max_request_bytes: int = 1_000_000
    max_n: int = 8  # most choices per request
    max_waiting: int = 256  # sequences queued beyond the batch before new requests get 429
    dtype: str | None = None  # "fp32" or "bf16": cast the weights once at start; None: as stored
    compile: bool = False  # torch.compile the decode step (see Engine(compile=True))
    chat_completion_default_tokens: int | None = None  # chat default for max_tokens (None: up to the limit)
    completion_default_tokens: int = 16  # OpenAI's default for /v1/completions
    # "builtin": a chat request that brings no tools of its own may call lmforge's tools (calculator,
    # python), which the server runs, feeding each result back to the model. "none": it may not.
    tools: str = "none"
    max_tool_calls: int = 4  # server-run calls per choice; the reply ends (finish "length") past it
    rag_index: str | None = None  # a retrieval index: chat requests answer from its passages (lmforge/rag.py)
    rag_k: int = 5  # passages retrieved per request
    # Speculative decoding (docs/speculative.md): a draft model's checkpoint, or prompt lookup, and
    # draft tokens per step. With either, every request runs at batch 1 through its own speculative
    # session (lmforge/inference/scheduler.py says why), up to max_batch of them in turn.
    draft: str | None = None
    prompt_lookup: bool = False
    speculate: int = 4
    # A masked diffusion model (after `lmforge sft`) writes each reply whole in this many passes
    # (None: one per token of the reply's budget); lmforge/inference/scheduler.py.
    diffusion_steps: int | None = None


class RagChatRequest(ChatRequest):
    """A chat request with lmforge's retrieval switch: `rag` false leaves the server's index out,
    true asks for it (a 400 on a server without one); absent, the server's default (on with an index)."""
    rag: bool | None = None


def chat_page() -> str:
    page = resources.files("lmforge.serve").joinpath("static/index.html")
    if not page.is_file():
        raise LmforgeError("the chat page lmforge/serve/static/index.html is missing from this installation "
                           "(it is package data of lmforge.serve)")
    return page.read_text(encoding="utf-8")


class Server:
    """What the routes share: the configuration and the scheduler, the request checks, and the
    stream of a request's events (the tool loop included). One per app (`create_app`)."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, retriever=None):
        self.cfg, self.tokenizer, self.sid = cfg, tokenizer, tokenizer.special_id
        if cfg.rag_index is not None and retriever is None:
            from lmforge.rag import load_index

            retriever = load_index(cfg.rag_index)
        self.retriever = retriever  # search(query, k) -> passages, or None
        self.search_lock = threading.Lock()  # one search at a time: an index need not be thread-safe
        self.sched = Scheduler(model, tokenizer, max_batch=cfg.max_batch, dtype=cfg.dtype, compile=cfg.compile,
                               speculator=speculator_for(model, tokenizer, cfg), diffusion_steps=cfg.diffusion_steps)
        self.window = model.context_limit  # None: no window (an LSTM, an n-gram)
        room = tokens_left(model, 1)  # at least one token for the reply
        self.max_prompt = min(cfg.max_prompt_tokens or room, room)

    def check_key(self, request: Request) -> None:
        if not self.cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.cfg.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(self, request: Request):
        self.check_key(request)
        limit = self.cfg.max_request_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes is larger than the limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is larger than the limit of {limit} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(499, "client closed the request while sending it") from None

        def no_constants(name):
            raise ValueError(f"{name} is not valid JSON")

        try:
            return json.loads(b"".join(chunks), parse_constant=no_constants)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def check_common(self, req, default_tokens: int | None) -> int:
        if req.model != self.cfg.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.cfg.model_name}'",
                           param="model", code="model_not_found")
        if req.n > self.cfg.max_n:
            raise APIError(400, f"n is {req.n}; this server allows at most {self.cfg.max_n}", param="n")
        max_tokens = getattr(req, "max_completion_tokens", None)
        max_tokens = req.max_tokens if max_tokens is None else max_tokens
        if max_tokens is None:
            max_tokens = self.cfg.max_tokens if default_tokens is None else min(default_tokens, self.cfg.max_tokens)
        if max_tokens > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {self.cfg.max_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        return max_tokens

    def check_prompt(self, ids: list[int], param: str) -> None:
        if len(ids) > self.max_prompt:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's limit is {self.max_prompt} "
                                f"(context window {self.window} tokens, at least one for the reply)",
                           param=param, code="context_length_exceeded")

    def wants_rag(self, req) -> bool:
        if req.rag and self.retriever is None:
            raise APIError(400, "this server has no retrieval index (start it with --rag INDEX)", param="rag")
        return self.retriever is not None and req.rag is not False

    def search(self, query: str) -> list:
        with self.search_lock:
            try:
                return self.retriever.search(query, self.cfg.rag_k)
            except LmforgeError as e:
                raise APIError(500, f"retrieval failed: {e}", type="server_error") from None

    async def retrieve(self, messages: list[dict], max_tokens: int, tools) -> tuple[list[dict], list]:
        """(the messages with the passages retrieved for the last user message, those passages),
        rendered as lmforge.rag.fit_rag_turn does: passages are dropped or shortened to leave room for
        the reply (up to max_tokens, at most half the window); the client's messages are all kept."""
        from lmforge.rag import fit_rag_turn

        users = [i for i, m in enumerate(messages) if m["role"] == "user" and isinstance(m["content"], str)]
        if not users:
            return messages, []
        u = users[-1]
        passages = await asyncio.to_thread(self.search, messages[u]["content"])
        budget = None if self.window is None else min(self.max_prompt, self.window - min(max_tokens, self.window // 2))
        try:
            return fit_rag_turn(self.tokenizer, messages[:u], messages[u]["content"], passages, budget,
                                after=messages[u + 1:], drop_history=False, tools=tools)
        except LmforgeError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None

    def params_for(self, req, max_tokens: int, i: int, **extra) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                              # n choices differ; wrapped so the last of n still fits in 64 bits
                              seed=None if req.seed is None else (req.seed + i) % 2**64,
                              stop=req.stops(), **extra)

    def submit_all(self, jobs: list[tuple[list[int], SamplingParams]]):
        """Queue every sequence of a request; returns (queue, sequences in choice order, the emit
        callback that feeds the queue)."""
        if self.sched.waiting + len(jobs) > self.cfg.max_waiting:
            raise APIError(429, "the server is busy (too many queued requests); retry shortly",
                           type="rate_limit_error", code="server_busy")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        seqs = []
        try:
            for ids, params in jobs:
                seqs.append(self.sched.submit(ids, params, emit))
        except Exception as e:  # all or nothing: the choices already queued must not run for no one
            for s in seqs:
                self.sched.cancel(s)
            if isinstance(e, LmforgeError):
                raise APIError(400, str(e)) from None
            raise
        return queue, seqs, emit

    async def events(self, queue, seqs, server_tools=None) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice is done.

        server_tools = (emit, max_tokens): the server runs the calls. A choice whose model calls a
        tool reports a "tool_run" event (tool_call = the call in OpenAI's shape), runs the tool off
        the event loop, reports a "tool_result" event (text = the result), and continues in a new
        sequence (seqs[i] is replaced, so a disconnect cancels the current one) whose prompt is
        everything so far plus the result, as lmforge.inference.tools.generate_with_tools does.
        Its last "done" counts the model's tokens over all rounds against max_tokens."""
        index = {s.id: i for i, s in enumerate(seqs)}
        remaining = len(seqs)
        earlier = [0] * len(seqs)  # completion tokens of a choice's finished rounds
        runs: list[list[tuple[dict, dict]]] = [[] for _ in seqs]  # (parsed call, OpenAI-shaped call)
        while remaining:
            ev = await queue.get()
            i = index[ev.seq_id]
            if server_tools is not None and ev.kind == "tool_call":
                shown = tool_call_obj(ev.tool_call)
                runs[i].append((ev.tool_call, shown))
                yield i, Event("tool_run", ev.seq_id, tool_call=shown)
                continue
            if server_tools is not None and ev.kind == "done" and ev.finish_reason == "tool_calls":
                earlier[i] += ev.completion_tokens
                call, shown = runs[i][-1]
                nxt = None
                if len(runs[i]) > self.cfg.max_tool_calls:
                    result, reason = f"error: not run: at most {self.cfg.max_tool_calls} tool calls per reply", "length"
                else:
                    result = await asyncio.to_thread(self.run_builtin_tool, call)
                    nxt, reason = self.continue_after_tool(seqs[i], result, server_tools, earlier[i], len(runs[i]))
                yield i, Event("tool_result", ev.seq_id, text=result, tool_call=shown)
                if isinstance(nxt, str):  # the continuation could not be queued
                    remaining -= 1
                    yield i, Event("error", ev.seq_id, text=nxt)
                elif nxt is not None:
                    seqs[i] = nxt
                    index[nxt.id] = i
                else:
                    remaining -= 1
                    yield i, Event("done", ev.seq_id, finish_reason=reason, completion_tokens=earlier[i])
                continue
            if ev.kind == "done" and earlier[i]:
                ev = Event("done", ev.seq_id, finish_reason=ev.finish_reason, prompt_tokens=ev.prompt_tokens,
                           completion_tokens=ev.completion_tokens + earlier[i])
            if ev.kind in ("done", "error"):
                remaining -= 1
            yield i, ev

    def run_builtin_tool(self, call: dict) -> str:
        from lmforge.inference.tools import run_tool

        return run_tool(call)

    def continue_after_tool(self, seq, result: str, server_tools, used: int, round_: int):
        """(the sequence that continues the reply after a tool's result, None) or (None, finish reason)
        when there is no room left, or (message, None) when it could not be queued."""
        emit, max_tokens = server_tools
        ids = (seq.prompt + seq.tokens + [self.sid("<|assistant_end|>"), self.sid("<|tool_result_start|>")]
               + self.tokenizer.encode(result) + [self.sid("<|tool_result_end|>"), self.sid("<|assistant_start|>")])
        if used >= max_tokens or len(ids) > self.max_prompt:
            return None, "length"
        p = seq.params
        params = replace(p, max_tokens=max_tokens - used,
                         seed=None if p.seed is None else (p.seed + round_) % 2**64)  # fresh draws each round
        try:
            return self.sched.submit(ids, params, emit), None
        except LmforgeError as e:
            return f"continuing after the tool result failed: {e}", None

    async def collect(self, request: Request, queue, seqs, server_tools=None) -> list[dict]:
        """Wait for every sequence (cancelling them if the client disconnects); per choice:
        text, tool_calls, finish_reason, token counts."""
        out = [{"text": "", "tool_calls": [], "tool_runs": [], "finish_reason": None, "prompt": 0, "completion": 0}
               for _ in seqs]

        async def gather():
            async for i, ev in self.events(queue, seqs, server_tools):
                if ev.kind == "text":
                    out[i]["text"] += ev.text
                elif ev.kind == "tool_call":
                    out[i]["tool_calls"].append(tool_call_obj(ev.tool_call))
                elif ev.kind == "tool_run":
                    out[i]["tool_runs"].append({**ev.tool_call, "result": None})
                elif ev.kind == "tool_result":
                    out[i]["tool_runs"][-1]["result"] = ev.text
                elif ev.kind == "done":
                    out[i].update(finish_reason=ev.finish_reason, prompt=ev.prompt_tokens,
                                  completion=ev.completion_tokens)
                else:
                    raise APIError(500, ev.text, type="server_error")

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.create_task(gather()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                for s in seqs:
                    self.sched.cancel(s)
        if work.cancelled():
            raise APIError(499, "client closed the request")
        work.result()  # re-raise a generation error
        return out

    def total_usage(self, results, prompt_counts) -> dict:
        return usage(sum(prompt_counts), sum(r["completion"] for r in results))

    def streaming(self, body: AsyncIterator[str | None], queue, seqs) -> StreamingResponse:
        async def guarded():
            try:
                # Events that piled up while this client was being served go out in one write;
                # None from the body means "send now" (a server-run tool is about to block it).
                pending = []
                async for chunk in body:
                    if chunk is not None:
                        pending.append(chunk)
                    if pending and (chunk is None or queue.empty()):
                        yield "".join(pending)
                        pending = []
                if pending:
                    yield "".join(pending)
            finally:  # finished, or the client went away (the task is cancelled): free the rows
                for s in seqs:
                    if not s.done:
                        self.sched.cancel(s)

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(model, tokenizer, config: ServeConfig | None = None, retriever=None) -> FastAPI:
    """The app; `retriever` (anything with search(query, k)) stands in for loading cfg.rag_index."""
    cfg = config or ServeConfig()
    if cfg.tools not in ("none", "builtin"):
        raise LmforgeError(f"tools must be 'none' or 'builtin', got {cfg.tools!r}")
    if retriever is not None and cfg.rag_index is None:
        raise LmforgeError("a retriever was given without ServeConfig.rag_index (the index it stands for)")
    srv = Server(model, tokenizer, cfg, retriever)
    sched, window = srv.sched, srv.window
    page = chat_page()

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.stop()

    # /openapi.json describes the routes (request bodies included, see request_body_schema) for
    # clients and for the schema fuzz test (bench/serve_fuzz.py); no interactive docs pages.
    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.scheduler = sched
    app.state.config = cfg

    # ------------------------------------------------------------------ errors: always OpenAI's body

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def request_error(request, e):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, e):
        log.exception("unhandled error")
        body = APIError(500, f"internal error: {type(e).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    # ------------------------------------------------------------------ routes

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        alive = sched._thread is not None and sched._thread.is_alive()
        body = {"status": "ok" if alive else "error", "model": cfg.model_name, "scheduler": sched.snapshot()}
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "lmforge",
                "context_length": window}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request):
        srv.check_key(request)
        if name != cfg.model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", openapi_extra=request_body_schema(RagChatRequest, documented_fields(cfg)))
    async def chat_completions(request: Request):
        req = parse_request(RagChatRequest, await srv.read_json(request))
        max_tokens = srv.check_common(req, cfg.chat_completion_default_tokens)
        if req.top_logprobs:
            raise APIError(400, "'top_logprobs' is not supported by lmforge", param="top_logprobs")
        mode, forced = tool_choice_mode(req.tool_choice, req.tools)
        # The built-in tools, run here, for a request that brings none of its own and does not
        # refuse tools: the model calls them as it was fine-tuned to (no tool list in the prompt).
        # An imported model's own chat template lists the tools itself (and has its own tool-call tokens,
        # if any); the built-in tool loop speaks lmforge's template only.
        imported = hasattr(tokenizer, "chat_ids")
        if req.tools and mode != "none" and tokenizer.tool_call_ids is None:
            raise APIError(400, "this model's chat template has no tool-call tokens (<tool_call>...</tool_call>), "
                           "so it cannot call tools", param="tools")
        run_tools = cfg.tools == "builtin" and not imported and not req.tools and req.tool_choice is None
        messages = chat_messages(req.messages)
        template_tools = None
        if req.tools and mode != "none" and imported:
            template_tools = [t.model_dump(exclude_none=True) for t in req.tools]
        elif req.tools and mode != "none":  # the tool definitions go into the system prompt
            text = tools_system_text(req.tools)
            if messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
            else:
                messages.insert(0, {"role": "system", "content": text})
        rag = None  # the passages shown, when the request retrieves
        if srv.wants_rag(req):
            messages, rag = await srv.retrieve(messages, max_tokens, template_tools)
        try:
            ids = render_messages(tokenizer, messages, tools=template_tools)
        except LmforgeError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        prefix = None
        if mode == "required":  # force a call: the reply starts inside one (with the name, if chosen)
            prefix = "" if forced is None else '{"name": ' + json.dumps(forced) + ', "arguments": '
            ids = ids + [tokenizer.tool_call_ids[0]] + tokenizer.encode(prefix)
        srv.check_prompt(ids, "messages")
        jobs = [(ids, srv.params_for(req, max_tokens, i, tools=mode != "none" or run_tools,
                                      ban_tool_tokens=mode == "none" and not run_tools, tool_prefix=prefix))
                for i in range(req.n)]
        queue, seqs, emit = srv.submit_all(jobs)
        server_tools = (emit, max_tokens) if run_tools else None
        rid, created = new_id("chatcmpl"), now()

        def chunk(choices, **extra):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                    "system_fingerprint": None, "choices": choices, **extra}

        def rag_field(**parts) -> dict:
            """The extra top-level field `lmforge_rag` of a request that retrieved (docs/serving.md)."""
            return {"lmforge_rag": parts} if rag is not None else {}

        def rag_passages() -> list[dict]:
            from lmforge.rag import passage_record

            return [passage_record(n, p) for n, p in enumerate(rag or [], 1)]

        def rag_cited(text: str) -> list[int]:
            from lmforge.rag import cited_numbers

            return cited_numbers(text, len(rag or []))

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body():
                for i in range(len(seqs)):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}],
                                    **(rag_field(passages=rag_passages()) if i == 0 else {})))
                completion = 0
                texts = [""] * len(seqs)
                async for i, ev in srv.events(queue, seqs, server_tools):
                    if ev.kind == "text":
                        texts[i] += ev.text
                        delta = {"content": ev.text}
                    elif ev.kind == "tool_call":
                        delta = {"tool_calls": [tool_call_obj(ev.tool_call, index=0)]}
                    elif ev.kind == "tool_run":  # lmforge extension: a call the server runs itself
                        delta = {"tool_run": ev.tool_call}
                    elif ev.kind == "tool_result":
                        delta = {"tool_result": {"id": ev.tool_call["id"], "content": ev.text}}
                    elif ev.kind == "done":
                        completion += ev.completion_tokens
                        yield sse(chunk([{"index": i, "delta": {}, "logprobs": None,
                                          "finish_reason": ev.finish_reason}],
                                        **rag_field(choice=i, cited=rag_cited(texts[i]))))
                        continue
                    else:
                        yield sse(APIError(500, ev.text, type="server_error").body())
                        continue
                    yield sse(chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
                    if ev.kind == "tool_run":
                        yield None  # the client sees the call before the tool has run
                if include_usage:
                    yield sse(chunk([], usage=usage(len(ids) * len(seqs), completion)))
                yield sse("[DONE]")

            return srv.streaming(body(), queue, seqs)

        results = await srv.collect(request, queue, seqs, server_tools)
        choices = []
        for i, r in enumerate(results):
            msg = {"role": "assistant", "content": r["text"] if r["text"] or not r["tool_calls"] else None}
            if r["tool_calls"]:
                msg["tool_calls"] = r["tool_calls"]
            if r["tool_runs"]:
                msg["tool_runs"] = r["tool_runs"]
            choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": r["finish_reason"]})
        extra = rag_field(passages=rag_passages(), cited=[rag_cited(r["text"]) for r in results])
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "system_fingerprint": None, "choices": choices,
                "usage": srv.total_usage(results, [len(ids)] * len(seqs)), **extra}

    @app.post("/v1/completions", openapi_extra=request_body_schema(CompletionRequest, documented_fields(cfg)))
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await srv.read_json(request))
        max_tokens = srv.check_common(req, cfg.completion_default_tokens)
        if req.echo:
            raise APIError(400, "'echo' is not supported by lmforge", param="echo")
        if req.suffix:
            raise APIError(400, "'suffix' (fill-in-the-middle) is not supported by lmforge", param="suffix")
        if req.best_of not in (None, req.n):
            raise APIError(400, "'best_of' is not supported by lmforge", param="best_of")
        prompts = []
        for p in completion_prompts(req.prompt):
            ids = [tokenizer.bos_id] + tokenizer.encode(p) if isinstance(p, str) else list(p)
            srv.check_prompt(ids, "prompt")
            prompts.append(ids)
        if len(prompts) * req.n > cfg.max_n * 4:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than {cfg.max_n * 4} completions",
                           param="prompt")
        # Choice index = prompt index * n + j, as in OpenAI's API.
        jobs = [(ids, srv.params_for(req, max_tokens, j)) for ids in prompts for j in range(req.n)]
        queue, seqs, _ = srv.submit_all(jobs)
        prompt_counts = [len(ids) for ids, _ in jobs]
        rid, created = new_id("cmpl"), now()

        def chunk(choices, **extra):
            return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "system_fingerprint": None, "choices": choices, **extra}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body():
                completion = 0
                async for i, ev in srv.events(queue, seqs):
                    if ev.kind == "text":
                        yield sse(chunk([{"index": i, "text": ev.text, "logprobs": None, "finish_reason": None}]))
                    elif ev.kind == "done":
                        completion += ev.completion_tokens
                        yield sse(chunk([{"index": i, "text": "", "logprobs": None,
                                          "finish_reason": ev.finish_reason}]))
                    elif ev.kind == "error":
                        yield sse(APIError(500, ev.text, type="server_error").body())
                if include_usage:
                    yield sse(chunk([], usage=usage(sum(prompt_counts), completion)))
                yield sse("[DONE]")

            return srv.streaming(body(), queue, seqs)

        results = await srv.collect(request, queue, seqs)
        choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                   for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                "system_fingerprint": None, "choices": choices, "usage": srv.total_usage(results, prompt_counts)}

    return app


def documented_fields(cfg: ServeConfig) -> dict:
    """What the handlers accept for the fields whose pydantic type is looser than the rules they
    check (the one model name, the server's limits, "not supported" options only at their neutral
    value, the shapes of `messages` and `prompt`), for the OpenAPI schema: a client, or the schema
    fuzz test, then knows which requests are valid. The handlers still check all of it."""
    nullable = lambda schema: {"anyOf": [schema, {"type": "null"}]}  # noqa: E731
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": nullable({"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]}),
        "tool_calls": {"type": "array", "items": {"type": "object"}}}}
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    return {
        "model": {"type": "string", "enum": [cfg.model_name]},
        "n": {"type": "integer", "minimum": 1, "maximum": cfg.max_n, "default": 1},
        "max_tokens": nullable({"type": "integer", "minimum": 0, "maximum": cfg.max_tokens}),
        "max_completion_tokens": nullable({"type": "integer", "minimum": 0, "maximum": cfg.max_tokens}),
        "stop": nullable({"anyOf": [{"type": "string", "minLength": 1},
                                    {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}}]}),
        "presence_penalty": nullable({"enum": [0]}),
        "frequency_penalty": nullable({"enum": [0]}),
        "logprobs": nullable({"enum": [False, 0]}),
        "top_logprobs": nullable({"enum": [0]}),
        "echo": {"enum": [False], "default": False},
        "suffix": nullable({"enum": [""]}),
        "best_of": nullable({"enum": [1]}),
        "messages": {"type": "array", "minItems": 1, "items": message},
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                             token_ids, {"type": "array", "minItems": 1, "items": token_ids}]},
        # lmforge's retrieval switch (RagChatRequest): true only on a server started with --rag INDEX.
        "rag": nullable({"type": "boolean"} if cfg.rag_index else {"enum": [False]}),
        "tool_choice": nullable({"anyOf": [
            {"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "function"],
             "properties": {"type": {"enum": ["function"]},
                            "function": {"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}}}}]}),
    }


def request_body_schema(model, documented: dict) -> dict:
    """The OpenAPI requestBody of a route that parses its JSON itself (strictly, within the size
    limit: see read_json): the request model's JSON schema, with its definitions inlined so the
    route's entry stands alone, and the fields of `documented` described as the handlers check them."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    for name, field_schema in documented.items():
        if name in schema["properties"]:
            schema["properties"][name] = {"title": schema["properties"][name].get("title", name), **field_schema}

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline({**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def speculator_for(model, tokenizer, cfg: ServeConfig):
    """The Speculator the config asks for (None without --draft or --prompt-lookup)."""
    from lmforge.inference.speculative import speculator_from

    return speculator_from(model, tokenizer, draft_path=cfg.draft, prompt_lookup=cfg.prompt_lookup, k=cfg.speculate,
                           load_draft=lambda path: load_served_model(path, device=str(model.device)),
                           dtype=cfg.dtype, compile=cfg.compile)


def load_served_model(path, device: str = "cpu"):
    """(model, tokenizer) from an lmforge checkpoint (run or checkpoint folder) or a Hugging Face
    model folder (config.json + weights, converted in memory through lmforge.hf.import_hf)."""
    import tempfile
    from pathlib import Path

    from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model

    path = Path(path)
    if (path / "config.json").is_file() and not (path / "state.json").is_file():
        from lmforge.hf import import_hf

        with tempfile.TemporaryDirectory() as tmp:
            conv = import_hf(path, tmp)
            if not conv.tokenizer:
                raise LmforgeError(f"cannot serve {path}: {conv.note}")
            model, _ = load_model(tmp, device=device)
            return model, load_checkpoint_tokenizer(tmp)
    model, _ = load_model(path, device=device)
    return model, load_checkpoint_tokenizer(path)
