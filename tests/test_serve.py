"""Serving: the continuous-batching scheduler against the engine, and the HTTP server through real
clients (the official `openai` package and httpx) on a loopback port.

Two kinds of model:
  * a random tiny GPT: its greedy or seeded output is arbitrary but fixed, and `Engine.generate`
    (an independent implementation of the same sampling) must produce exactly the same text;
  * a *scripted* GPT whose greedy output depends only on the position: at position p it predicts
    script[p], else a fill token. Only the position embedding (one-hot) and the head are non-zero.
    Knowing the prompt's length, a test makes the model say exactly what it needs: a tool call, a
    known reply, or endless 'a's (so a request never stops early). Training a tiny model to emit a
    tool call would take seconds and still not be certain; this is exact.
Concurrency is checked from the scheduler's counters with the loop paused while requests line up,
never from timings.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from lmforge.chat import render_messages
from lmforge.inference.engine import Engine
from lmforge.inference.scheduler import SamplingParams, Scheduler
from lmforge.models.transformer import GPT, GPTConfig, get_config
from lmforge.serve.app import ServeConfig, create_app, load_served_model
from lmforge.serve.protocol import ToolDef, tools_system_text
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_checkpoint

KEY = "test-key-123"
REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- helpers (also used by
# test_serve_browser.py)


def random_model(tok: Tokenizer, seed: int = 0, block_size: int = 128) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=block_size)).eval()


def scripted_model(tok: Tokenizer, script: dict[int, int], fill: int, block_size: int) -> GPT:
    """Greedy decoding predicts script[p] after position p (fill where the script says nothing)."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=block_size,
                    pos="learned", mlp="gelu")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wpe.weight.copy_(torch.eye(block_size))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        model.lm_head.weight[fill, :] = 0.5
        for pos, token in script.items():
            model.lm_head.weight[token, pos] = 1.0
    return model


def say(script: dict[int, int], prompt_len: int, tokens: list[int]) -> dict[int, int]:
    """Script `tokens` as the reply to a prompt of prompt_len tokens."""
    for j, t in enumerate(tokens):
        script[prompt_len - 1 + j] = t
    return script


class ServerThread:
    """uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def scheduler(self) -> Scheduler:
        return self.app.state.scheduler


def wait_for(condition, what: str, timeout: float = 30.0):
    """Poll until condition() is true (a deadline for a hung server, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def is_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str), body
    return err


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def rand_server(tok):
    """A random model behind an API key, with small limits to test them."""
    model = random_model(tok)
    cfg = ServeConfig(model_name="tiny", api_key=KEY, max_tokens=64, max_request_bytes=20_000, max_n=4)
    with ServerThread(create_app(model, tok, cfg)) as srv:
        srv.model = model
        yield srv


TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}},
                                                          "required": ["expression"]}}}]
QUESTION = {"role": "user", "content": "What is 12*7?"}
CALL = '{"name": "calculator", "arguments": {"expression": "12*7"}}'
ANSWER = "The answer is 84."


@pytest.fixture(scope="module")
def tool_server(tok):
    """A scripted model that answers QUESTION (with TOOLS) by calling the calculator, then, given the
    result, answers ANSWER; everywhere else it says 'a'."""
    sid = tok.special_id
    system = {"role": "system", "content": tools_system_text([ToolDef.model_validate(t) for t in TOOLS])}
    first = render_messages(tok, [system, QUESTION])
    reply1 = [sid("<|tool_call_start|>")] + tok.encode(CALL) + [sid("<|tool_call_end|>")]
    second = render_messages(tok, [system, QUESTION,
                                   {"role": "assistant", "content": None, "tool_calls": [json.loads(CALL)]},
                                   {"role": "tool", "content": "84"}])
    reply2 = tok.encode(ANSWER) + [sid("<|assistant_end|>")]
    script = say(say({}, len(first), reply1), len(second), reply2)
    block = len(second) + len(reply2) + 8
    model = scripted_model(tok, script, fill=tok.encode("a")[0], block_size=block)
    with ServerThread(create_app(model, tok, ServeConfig(model_name="scripted"))) as srv:
        srv.first_len = len(first)
        yield srv


def client(srv, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


# ----------------------------------------------------------------------------- the scheduler alone


def run_to_end(sched: Scheduler, max_steps: int = 1000):
    for _ in range(max_steps):
        if not (sched.waiting or sched.running):
            return
        sched.step()
    raise AssertionError("scheduler did not finish")


def collector():
    events = []
    return events, events.append


def text_of(events, seq) -> str:
    return "".join(e.text for e in events if e.seq_id == seq.id and e.kind == "text")


def test_requests_joining_mid_run_match_the_engine(tok):
    """Sequences admitted while others are mid-generation (continuous batching) produce exactly
    what the engine produces for each prompt alone: greedy, and seeded sampling (per-request
    generators, so a request's samples do not depend on its batch mates)."""
    model = random_model(tok, seed=1)
    engine = Engine(model, tok)
    sched = Scheduler(model, tok, max_batch=8)
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("Hello", "Once upon a time", "x", "The quick brown fox")]
    settings = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7), dict(temperature=0.0),
                dict(temperature=1.0, top_k=20, seed=3)]
    events, emit = collector()
    seqs = [sched.submit(prompts[0], SamplingParams(max_tokens=40, **settings[0]), emit)]
    for _ in range(5):
        sched.step()
    seqs += [sched.submit(p, SamplingParams(max_tokens=40, **s), emit) for p, s in zip(prompts[1:3], settings[1:3])]
    sched.step()
    sched.step()
    seqs.append(sched.submit(prompts[3], SamplingParams(max_tokens=40, **settings[3]), emit))
    run_to_end(sched)
    for p, s, seq in zip(prompts, settings, seqs):
        [ref] = engine.generate([p], 40, **s)
        assert text_of(events, seq) == ref.text
        done = [e for e in events if e.seq_id == seq.id and e.kind == "done"]
        assert len(done) == 1 and done[0].finish_reason == ref.finish_reason
        assert done[0].completion_tokens == len(ref.tokens) + (ref.finish_reason == "stop")
    stats = sched.stats
    assert stats.joined_running == 3  # three sequences joined a running batch
    assert stats.admitted == 4 and stats.finished == 4 and stats.cancelled == 0
    assert max(stats.rows_per_step) >= 3  # decode steps really were shared
    assert sched.running == 0 and sched._cache is None  # the batch's memory is released


def test_cancel_frees_the_row_and_max_batch_queues_the_rest(tok):
    model = random_model(tok, seed=2)
    sched = Scheduler(model, tok, max_batch=2)
    events, emit = collector()
    greedy = SamplingParams(max_tokens=30, temperature=0.0)
    p = [tok.bos_id] + tok.encode("abc")
    a, b, c = (sched.submit(p, greedy, emit) for _ in range(3))
    sched.step()
    assert sched.running == 2 and sched.waiting == 1  # at most max_batch rows; c waits
    sched.cancel(a)
    sched.step()  # a leaves, c joins the running batch
    assert a.finish_reason == "cancelled" and sched.stats.cancelled == 1
    assert sched.running == 2 and sched.waiting == 0 and sched.stats.joined_running == 1
    run_to_end(sched)
    assert text_of(events, b) == text_of(events, c)  # same prompt, greedy: same text whenever it started
    assert not [e for e in events if e.seq_id == a.id and e.kind == "done"]


def test_bf16_scheduler_matches_the_bf16_engine(tok):
    model = random_model(tok, seed=5)
    sched = Scheduler(model, tok, dtype="bf16")
    events, emit = collector()
    prompt = [tok.bos_id] + tok.encode("bf16")
    seq = sched.submit(prompt, SamplingParams(max_tokens=20, temperature=0.0), emit)
    run_to_end(sched)
    [ref] = Engine(model, tok, dtype="bf16").generate([prompt], 20, temperature=0.0)
    assert text_of(events, seq) == ref.text


def test_submit_rejects_what_does_not_fit(tok):
    from lmforge.common import LmforgeError

    sched = Scheduler(random_model(tok), tok)
    with pytest.raises(LmforgeError, match="context window"):
        sched.submit([1] * 128, SamplingParams(max_tokens=5), lambda e: None)
    with pytest.raises(LmforgeError, match="temperature"):
        sched.submit([1], SamplingParams(max_tokens=5, temperature=-1.0), lambda e: None)
    with pytest.raises(LmforgeError, match="empty"):
        sched.submit([], SamplingParams(max_tokens=5), lambda e: None)


# ----------------------------------------------------------------------------- through the openai client


def test_openai_chat_and_stream_match_the_engine(rand_server, tok):
    c = client(rand_server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    [ref] = Engine(rand_server.model, tok).generate([render_messages(tok, messages)], 30, temperature=0.0)
    # A chat request without tools never samples the tool-call tokens (the engine has no such rule):
    # the comparison holds because the reference did not produce them either.
    assert not {tok.special_id("tool_call_start"), tok.special_id("tool_call_end")} & set(ref.tokens)
    resp = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(render_messages(tok, messages))
    assert resp.usage.completion_tokens == len(ref.tokens) + (ref.finish_reason == "stop")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == ref.text and finish == ref.finish_reason
    assert len([p for p in pieces if p]) > 1  # streamed in pieces, not at the end
    assert usage.completion_tokens == resp.usage.completion_tokens


def test_streamed_n_choices_match_the_plain_response(rand_server):
    c = client(rand_server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Two please"}], max_tokens=20, temperature=1.0,
              seed=11, n=2)
    plain = c.chat.completions.create(**kw)
    texts, finish = ["", ""], [None, None]
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert texts == [ch.message.content for ch in plain.choices]
    assert finish == [ch.finish_reason for ch in plain.choices]
    assert texts[0] != texts[1]  # each choice has its own seed


def test_openai_completions_seed_n_and_stop(rand_server, tok):
    c = client(rand_server)
    engine = Engine(rand_server.model, tok)
    ids = [tok.bos_id] + tok.encode("Once")
    resp = c.completions.create(model="tiny", prompt="Once", max_tokens=25, temperature=0.8, seed=5, n=2)
    for j, choice in enumerate(sorted(resp.choices, key=lambda ch: ch.index)):
        [ref] = engine.generate([ids], 25, temperature=0.8, seed=5 + j)  # choice j uses seed + j
        assert choice.text == ref.text
    # a stop string cuts the text before it, whichever token it arrives in
    [full] = engine.generate([ids], 25, temperature=0.0)
    stop = full.text[5:7]
    resp = c.completions.create(model="tiny", prompt="Once", max_tokens=25, temperature=0, stop=[stop])
    assert resp.choices[0].text == full.text[:full.text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    # token-id prompts and several prompts at once
    resp = c.completions.create(model="tiny", prompt=[ids, "Once"], max_tokens=10, temperature=0)
    assert [ch.text for ch in resp.choices] == [full.text[:len(ch.text)] for ch in resp.choices]
    assert resp.usage.prompt_tokens == 2 * len(ids)


def test_tool_call_round_trip(tool_server):
    from lmforge.inference.tools import calculator

    c = client(tool_server, key="unused")  # no key configured: any key is fine
    resp = c.chat.completions.create(model="scripted", messages=[QUESTION], tools=TOOLS, temperature=0,
                                     max_tokens=100)
    assert resp.usage.prompt_tokens == tool_server.first_len  # tool definitions went into the prompt
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args == {"expression": "12*7"}
    result = calculator(args["expression"])  # the client runs the tool
    assert result == "84"
    messages = [QUESTION, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = c.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, temperature=0,
                                      max_tokens=100)
    assert final.choices[0].message.content == ANSWER
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls

    # streamed: the call arrives as a tool_calls delta
    stream = c.chat.completions.create(model="scripted", messages=[QUESTION], tools=TOOLS, temperature=0,
                                       max_tokens=100, stream=True)
    calls, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert json.loads(calls[0].function.arguments) == {"expression": "12*7"}

    # a call cut short by max_tokens is not a call: its text comes back as content
    for max_tokens, content in ((1, ""), (10, CALL[:9])):
        cut = c.chat.completions.create(model="scripted", messages=[QUESTION], tools=TOOLS, temperature=0,
                                        max_tokens=max_tokens)
        assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.tool_calls
        assert cut.choices[0].message.content == content

    # without tools the model can never emit a tool call: the call tokens are masked (it says 'a's)
    plain = c.chat.completions.create(model="scripted", messages=[QUESTION], temperature=0, max_tokens=5)
    assert plain.choices[0].message.content == "aaaaa" and not plain.choices[0].message.tool_calls


def test_forced_tool_choice_starts_the_reply_inside_a_call(tok):
    """tool_choice naming a function puts `<|tool_call_start|>{"name": "calculator", "arguments": ` at the
    end of the prompt, so the model only writes the arguments. With tool_choice "required" the reply starts
    at `<|tool_call_start|>`; here the model then writes no valid JSON, and that text comes back as
    content (nothing is dropped) with the finish reason of the cut."""
    sid = tok.special_id
    system = {"role": "system", "content": tools_system_text([ToolDef.model_validate(t) for t in TOOLS])}
    user = {"role": "user", "content": "go"}
    prefix = '{"name": "calculator", "arguments": '
    prompt = render_messages(tok, [system, user]) + [sid("<|tool_call_start|>")] + tok.encode(prefix)
    reply = tok.encode('{"expression": "2+3"}}') + [sid("<|tool_call_end|>")]
    model = scripted_model(tok, say({}, len(prompt), reply), fill=tok.encode("a")[0],
                           block_size=len(prompt) + len(reply) + 4)
    with ServerThread(create_app(model, tok, ServeConfig(model_name="m"))) as srv:
        c = client(srv, key="x")
        named = {"type": "function", "function": {"name": "calculator"}}
        resp = c.chat.completions.create(model="m", messages=[user], tools=TOOLS, tool_choice=named, temperature=0,
                                         max_tokens=50)
        assert resp.usage.prompt_tokens == len(prompt)
        assert resp.choices[0].finish_reason == "tool_calls"
        [call] = resp.choices[0].message.tool_calls
        assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "2+3"}
        resp = c.chat.completions.create(model="m", messages=[user], tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=4)
        choice = resp.choices[0]
        assert choice.finish_reason == "length" and not choice.message.tool_calls
        assert choice.message.content == "aaaa"
        with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
            c.chat.completions.create(model="m", messages=[user], tools=TOOLS,
                                      tool_choice={"type": "function", "function": {"name": "python"}})


def test_concurrent_streams_share_decode_steps(tool_server):
    """Four streaming requests lined up while the loop is paused are decoded together: the scheduler
    counts 19 decode steps with 4 rows (token 1 comes from the prefill, tokens 2..20 from shared steps)."""
    sched = tool_server.scheduler
    before = dict(sched.stats.rows_per_step)
    results = [None] * 4

    def worker(i):
        c = client(tool_server, key="x")
        stream = c.completions.create(model="scripted", prompt="p" * (i + 1), max_tokens=20, temperature=0,
                                      stream=True)
        results[i] = "".join(ch.choices[0].text for ch in stream if ch.choices)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    with sched.paused():
        for t in threads:
            t.start()
        wait_for(lambda: sched.waiting == 4, "4 queued requests")
    for t in threads:
        t.join(timeout=60)
    assert results == ["a" * 20] * 4
    assert sched.stats.rows_per_step[4] - before.get(4, 0) == 19


def test_disconnect_mid_stream_frees_the_slot(tool_server):
    sched = tool_server.scheduler
    cancelled = sched.stats.cancelled
    with httpx.Client(base_url=tool_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"model": "scripted", "prompt": "q", "max_tokens": 200,
                                                          "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] == "a"
            with sched.paused():  # hold generation so the request is certainly still running
                [seq] = sched._rows
                resp.close()  # the client goes away
                wait_for(lambda: seq.cancelled, "the server to notice the disconnect")
    wait_for(lambda: sched.running == 0, "the row to leave the batch")
    assert seq.finish_reason == "cancelled" and seq.generated < 200
    assert sched.stats.cancelled == cancelled + 1
    assert httpx.get(tool_server.url + "/health").json()["status"] == "ok"


def test_slow_reader_does_not_block_others(tool_server):
    """A client that opens a stream and reads nothing does not hold up another request."""
    with httpx.Client(base_url=tool_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"model": "scripted", "prompt": "q", "max_tokens": 100,
                                                          "stream": True, "temperature": 0}) as slow:
            assert slow.status_code == 200
            fast = client(tool_server, key="x").completions.create(model="scripted", prompt="z", max_tokens=30,
                                                                     temperature=0)
            assert fast.choices[0].text == "a" * 30
            body = "".join(slow.iter_text())  # now read the slow one: complete
    assert body.rstrip().endswith("data: [DONE]")


# ----------------------------------------------------------------------------- safety and limits


def test_api_key_is_checked_on_every_v1_route(rand_server):
    http = httpx.Client(base_url=rand_server.url, timeout=60)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, payload in (("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None),
                                  ("POST", "/v1/chat/completions", body),
                                  ("POST", "/v1/completions", {"model": "tiny", "prompt": "a"})):
        assert is_openai_error(http.request(method, path, json=payload), 401)["code"] == "invalid_api_key"
        wrong = http.request(method, path, json=payload, headers={"Authorization": "Bearer nope"})
        assert "incorrect" in is_openai_error(wrong, 401)["message"]
        ok = http.request(method, path, json=payload, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
    assert http.get("/health").status_code == 200 and http.get("/").status_code == 200  # open routes
    with pytest.raises(openai.AuthenticationError):
        client(rand_server, key="wrong").models.list()


@pytest.mark.parametrize("payload, status, needle", [
    (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "NaN"),
    (b"[1, 2]", 400, "JSON object"),
    (b'"just a string"', 400, "JSON object"),
    ({"model": "tiny", "messages": []}, 400, "non-empty"),
    ({"model": "tiny"}, 400, "missing required field 'messages'"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": True}, 400, "'n'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "at most 4"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}, 400, "at most 64"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "bogus": 1}, 400, "unknown field 'bogus'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1.5}, 400, "not supported"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "needs 'tools'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "context window"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
])
def test_bad_chat_requests_get_clear_4xx(rand_server, payload, status, needle):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kw = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    resp = httpx.post(rand_server.url + "/v1/chat/completions", headers=headers, timeout=60, **kw)
    err = is_openai_error(resp, status)
    assert needle in err["message"], err


def test_bad_completion_requests_and_limits(rand_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    post = lambda body, **kw: httpx.post(rand_server.url + "/v1/completions", json=body, headers=headers,  # noqa: E731
                                         timeout=60, **kw)
    assert "prompt" in is_openai_error(post({"model": "tiny", "prompt": [1, "a", None]}), 400)["message"]
    assert "prompt" in is_openai_error(post({"model": "tiny", "prompt": []}), 400)["message"]
    err = is_openai_error(post({"model": "tiny", "prompt": "x" * 200}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "echo" in is_openai_error(post({"model": "tiny", "prompt": "a", "echo": True}), 400)["message"]
    big = {"model": "tiny", "prompt": "y" * 30_000}
    assert is_openai_error(post(big), 413)["code"] == "request_too_large"
    # a chunked body (no Content-Length) is cut off at the limit too
    chunks = (b'{"model": "tiny", "prompt": "' + b"z" * 5000 for _ in range(6))
    resp = httpx.post(rand_server.url + "/v1/completions", content=chunks, headers=headers, timeout=60)
    assert is_openai_error(resp, 413)["code"] == "request_too_large"
    assert is_openai_error(httpx.get(rand_server.url + "/v1/chat/completions", headers=headers), 405)
    assert is_openai_error(httpx.get(rand_server.url + "/v2/nothing"), 404)
    with pytest.raises(openai.NotFoundError):
        client(rand_server).completions.create(model="other", prompt="a")
    with pytest.raises(openai.BadRequestError):
        client(rand_server).completions.create(model="tiny", prompt="a", max_tokens=1000)
    # the server is fine afterwards
    health = httpx.get(rand_server.url + "/health").json()
    assert health["status"] == "ok" and health["scheduler"]["errors"] == 0
    assert client(rand_server).completions.create(model="tiny", prompt="a", max_tokens=3).choices[0].finish_reason


def test_token_id_prompt_out_of_vocab_is_400(rand_server):
    resp = httpx.post(rand_server.url + "/v1/completions", json={"model": "tiny", "prompt": [99999]},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert "0.." in is_openai_error(resp, 400)["message"]


# ----------------------------------------------------------------------------- loading and the CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("serve_ckpt")
    model = random_model(tok, seed=4)
    tok_path = tok.save(root / "tokenizer.json")
    save_checkpoint(root / "run" / "checkpoints", 10, model, state={"tokenizer_fingerprint": tok.fingerprint},
                    files={"tokenizer.json": tok_path.read_bytes()})
    return root / "run", model


def test_loads_checkpoints_and_hf_folders(checkpoint, tok, tmp_path):
    from lmforge.hf import export_hf

    run, model = checkpoint
    export_hf(run, tmp_path / "hf")
    ids = [tok.bos_id] + tok.encode("abc")
    [ref] = Engine(model, tok).generate([ids], 12, temperature=0.0)
    for path in (run, tmp_path / "hf"):
        m, t = load_served_model(path)
        assert t.fingerprint == tok.fingerprint and m.config.block_size == model.config.block_size
        assert Engine(m, t).generate([ids], 12, temperature=0.0)[0].tokens == ref.tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_end_to_end(checkpoint, tok, capsys):
    """`lmforge serve` as a user runs it: a real process, the key from the environment."""
    from lmforge.cli import main

    run, model = checkpoint
    assert main(["serve", "--checkpoint", str(run.parent / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err and len(err.strip().splitlines()) == 1
    port = free_port()
    env = {**os.environ, "LMFORGE_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(run), "--port",
                             str(port), "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read()}")
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "lmforge serve to start", timeout=120)
        c = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in c.models.list()] == ["run"]  # the model is named after its folder
        messages = [{"role": "user", "content": "Hello"}]
        resp = c.chat.completions.create(model="run", messages=messages, max_tokens=10, temperature=0)
        [ref] = Engine(model, tok).generate([render_messages(tok, messages)], 10, temperature=0.0)
        assert resp.choices[0].message.content == ref.text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "serving 'run'" in proc.stdout.read()


def test_disconnect_while_waiting_for_a_plain_response_cancels_it(tool_server):
    """Non-streaming: a client that hangs up before its reply is ready frees its place too."""
    sched = tool_server.scheduler
    cancelled = sched.stats.cancelled
    body = json.dumps({"model": "scripted", "prompt": "w", "max_tokens": 50}).encode()
    port = int(tool_server.url.rsplit(":", 1)[1])
    with sched.paused():
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: sched.waiting == 1, "the request to be queued")
        [seq] = sched._waiting
        sock.close()
        wait_for(lambda: seq.cancelled, "the server to notice the disconnect")
    wait_for(lambda: sched.stats.cancelled == cancelled + 1, "the cancelled request to be dropped")
    assert seq.generated == 0 and sched.waiting == 0 and sched.running == 0


def test_full_queue_answers_429(tok):
    model = scripted_model(tok, {}, fill=tok.encode("a")[0], block_size=32)
    with ServerThread(create_app(model, tok, ServeConfig(model_name="m", max_waiting=2))) as srv:
        sched = srv.scheduler
        results = []

        def worker():
            results.append(client(srv, key="x").completions.create(model="m", prompt="p", max_tokens=3,
                                                                    temperature=0).choices[0].text)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        with sched.paused():
            for t in threads:
                t.start()
            wait_for(lambda: sched.waiting == 2, "2 queued requests")
            resp = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "p"}, timeout=60)
            assert is_openai_error(resp, 429)["code"] == "server_busy"
        for t in threads:
            t.join(timeout=60)
        assert results == ["aaa", "aaa"]


# ----------------------------------------------------------------------------- failures inside generation


def fail_prefill_call(model, n: int, message: str = "injected prefill failure"):
    """Make the model's n-th prefill call (counting from 1) raise, as an out-of-memory would."""
    real, calls = model.prefill, [0]

    def prefill(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    model.prefill = prefill
    return calls


def test_failed_admission_answers_every_request(tok):
    """A prefill that raises while new requests are being admitted: each of them (one streaming,
    one not) ends with an error instead of waiting forever, /health counts the failure, and the
    server answers the next request normally. The clients have a deadline, so a regression fails
    here rather than hanging the suite."""
    model = scripted_model(tok, {}, fill=tok.encode("a")[0], block_size=32)
    fail_prefill_call(model, 1)
    with ServerThread(create_app(model, tok, ServeConfig(model_name="m"))) as srv:
        sched = srv.scheduler
        results = {}

        def plain():
            try:
                results["plain"] = httpx.post(srv.url + "/v1/completions", timeout=15,
                                              json={"model": "m", "prompt": "p", "max_tokens": 5})
            except httpx.TimeoutException as e:
                results["plain"] = e

        def streamed():
            try:
                with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=15,
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 5, "stream": True}) as resp:
                    results["stream"] = (resp.status_code, [line for line in resp.iter_lines() if line])
            except httpx.TimeoutException as e:
                results["stream"] = e

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        with sched.paused():  # both are admitted by the same (failing) prefill
            for t in threads:
                t.start()
            wait_for(lambda: sched.waiting == 2, "2 queued requests")
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        assert isinstance(results["plain"], httpx.Response), f"no answer: {results['plain']!r}"
        err = is_openai_error(results["plain"], 500)
        assert err["type"] == "server_error" and "injected prefill failure" in err["message"]
        assert not isinstance(results["stream"], Exception), f"stream left open: {results['stream']!r}"
        status, lines = results["stream"]
        assert status == 200
        errors = [json.loads(line[6:]) for line in lines if line.startswith("data: {") and '"error"' in line]
        assert len(errors) == 1 and "injected prefill failure" in errors[0]["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        health = httpx.get(srv.url + "/health", timeout=15).json()
        assert health["status"] == "ok"  # the loop survived
        assert health["scheduler"]["errors"] == 2 and "injected" in health["scheduler"]["last_error"]
        assert health["scheduler"]["waiting"] == 0 and health["scheduler"]["running"] == 0
        ok = httpx.post(srv.url + "/v1/completions", timeout=15, json={"model": "m", "prompt": "p", "max_tokens": 3,
                                                                       "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "aaa"


def test_failure_joining_a_running_batch_fails_both(tok):
    """Scheduler alone: a request whose admission fails while another is mid-generation gets an
    error event, and so does the running one (they share the failed step)."""
    model = scripted_model(tok, {}, fill=tok.encode("a")[0], block_size=32)
    fail_prefill_call(model, 2)
    sched = Scheduler(model, tok)
    events, emit = collector()
    first = sched.submit([tok.bos_id, 5], SamplingParams(max_tokens=20, temperature=0.0), emit)
    sched.step()
    second = sched.submit([tok.bos_id, 6], SamplingParams(max_tokens=20, temperature=0.0), emit)
    with pytest.raises(RuntimeError, match="injected"):
        sched.step()
    sched._fail_all("generation failed: injected")  # what the loop does with the exception
    for seq in (first, second):
        kinds = [e.kind for e in events if e.seq_id == seq.id]
        assert kinds[-1] == "error" and kinds.count("error") == 1, kinds
    assert sched.running == 0 and sched.waiting == 0 and sched.stats.errors == 2


def test_seed_beyond_64_bits_is_400(rand_server, tok):
    headers = {"Authorization": f"Bearer {KEY}"}
    for seed in (2**64, -2**63 - 1, 10**30):
        resp = httpx.post(rand_server.url + "/v1/completions", headers=headers, timeout=60,
                          json={"model": "tiny", "prompt": "a", "max_tokens": 2, "seed": seed})
        err = is_openai_error(resp, 400)
        assert err["param"] == "seed" and "seed" in err["message"], err
    # the largest seed is fine with n > 1 too: choice i seeds with (seed + i) mod 2**64
    resp = httpx.post(rand_server.url + "/v1/completions", headers=headers, timeout=60,
                      json={"model": "tiny", "prompt": "Once", "max_tokens": 8, "seed": 2**64 - 1, "n": 2,
                            "temperature": 1.0})
    assert resp.status_code == 200, resp.text
    [ref] = Engine(rand_server.model, tok).generate([[tok.bos_id] + tok.encode("Once")], 8, temperature=1.0, seed=0)
    assert sorted(resp.json()["choices"], key=lambda c: c["index"])[1]["text"] == ref.text
    assert httpx.get(rand_server.url + "/health").json()["scheduler"]["errors"] == 0


def test_a_failed_submit_cancels_the_choices_already_queued(tok, monkeypatch):
    """n > 1: when queuing a later choice fails, the ones queued before it are cancelled instead of
    generating for a request that has already been answered with an error."""
    model = scripted_model(tok, {}, fill=tok.encode("a")[0], block_size=32)
    with ServerThread(create_app(model, tok, ServeConfig(model_name="m"))) as srv:
        sched = srv.scheduler
        real, calls, queued = sched.submit, [0], []

        def submit(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected submit failure")
            seq = real(*args, **kwargs)
            queued.append(seq)
            return seq

        monkeypatch.setattr(sched, "submit", submit)
        with sched.paused():
            resp = httpx.post(srv.url + "/v1/completions", timeout=30,
                              json={"model": "m", "prompt": "p", "max_tokens": 20, "n": 4})
            assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
            assert len(queued) == 2 and all(s.cancelled for s in queued)
        wait_for(lambda: sched.waiting == 0 and sched.running == 0, "the cancelled choices to leave")
        assert all(s.generated == 0 for s in queued) and sched.stats.cancelled == 2


def test_top_p_near_zero_keeps_the_most_likely_token(rand_server, tok):
    """Found by the schema fuzz: top_p = 5e-324 dropped every token (rounding left a tiny positive
    probability mass before the first one) and the batch failed with NaN probabilities (500)."""
    from lmforge.inference.sampling import sample_next

    logits = torch.randn(8, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, 1.0, None, 5e-324, None), logits.argmax(-1))
    resp = httpx.post(rand_server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "tiny", "prompt": "Once", "max_tokens": 6, "top_p": 5e-324})
    assert resp.status_code == 200, resp.text
    [greedy] = Engine(rand_server.model, tok).generate([[tok.bos_id] + tok.encode("Once")], 6, temperature=0.0)
    assert resp.json()["choices"][0]["text"] == greedy.text  # only the most likely token is ever left


def test_openapi_schema_describes_the_request_bodies(rand_server):
    schema = httpx.get(rand_server.url + "/openapi.json", timeout=60).json()  # open, like /health
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(chat["required"]) and chat["additionalProperties"] is False
    assert chat["properties"]["model"]["enum"] == ["tiny"]
    assert chat["properties"]["n"]["maximum"] == 4  # this server's --max-n
    assert "$ref" not in json.dumps(chat)  # stands alone
    completion = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in completion["required"]


@pytest.mark.slow
def test_schema_fuzz_gets_no_server_error():
    """bench/serve_fuzz.py's run, bounded: 300 requests from the OpenAPI schema (valid and invalid
    bodies), on loopback, in at most 100 s of fuzzing. No 5xx; healthy afterwards."""
    import importlib.util

    try:
        import schemathesis  # noqa: F401
    except ImportError:
        from conftest import missing

        missing("schemathesis", "pip install -e '.[test]'")
    spec = importlib.util.spec_from_file_location("serve_fuzz", REPO_ROOT / "bench" / "serve_fuzz.py")
    serve_fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_fuzz)
    server, thread, url = serve_fuzz.serve_tiny()
    try:
        result = serve_fuzz.fuzz(url, max_requests=300, time_limit=100)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not result["failures"], json.dumps(result["failures"][:3], indent=1)
    assert result["requests"] >= 100, result  # the time limit did not cut it to nothing
    assert 200 in result["statuses"] and any(400 <= s < 500 for s in result["statuses"])  # both kinds ran
    assert result["health_status"] == 200 and result["health"]["status"] == "ok"
    assert result["health"]["scheduler"]["errors"] == 0
    assert result["health"]["scheduler"]["running"] == 0 and result["health"]["scheduler"]["waiting"] == 0
    assert result["after_status"] == 200
