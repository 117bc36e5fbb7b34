"""The chat front ends run the tools the model was trained to call: `lmforge chat` (tool loop in the
REPL, on by default for a model fine-tuned with tool calls) and `lmforge serve --tools builtin` (the
server runs the call and the model continues after the result).

The model is test_serve.py's scripted GPT: greedy decoding predicts a fixed token at each position,
so knowing the prompt lengths the test makes it call the calculator and then, given the result,
answer. Only a loop that really runs the tool and appends its result reaches the answer's positions
with the right prompt: a loop that skipped the tool (or fed back something else) would get a
different (here: shorter or longer) prompt and the model would say 'a's.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import missing, run_cli, save_tiny_checkpoint
from test_serve import TOOLS, ServerThread, is_openai_error, say, scripted_model
from test_serve_browser import CHROMIUM

from lmforge.chat import render_messages
from lmforge.inference.engine import Engine
from lmforge.serve.app import ServeConfig, create_app
from lmforge.serve.protocol import ToolDef, tools_system_text
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_checkpoint_tokenizer, load_model, save_checkpoint, trained_with_tools

QUESTION = {"role": "user", "content": "What is 12*7?"}
CALL = {"name": "calculator", "arguments": {"expression": "12*7"}}
ANSWER = "The answer is 84."
# Five tokens of the reply when the tool-call tokens are banned: the fill 'a' where the model would
# start the call, then the call's JSON as plain text (the model does not know it may not call).
BANNED_CALL = "a" + json.dumps(CALL)[:4]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def scripted(tok):
    """A model that answers QUESTION (no system prompt, as the speedrun's SFT data) with a calculator
    call and, given the result 84, with ANSWER. Given QUESTION with the client-side tool list in the
    system prompt (the OpenAI-style path), it makes the same call. Everywhere else it says 'a'."""
    sid = tok.special_id
    first = render_messages(tok, [QUESTION])
    reply1 = [sid("<|tool_call_start|>")] + tok.encode(json.dumps(CALL)) + [sid("<|tool_call_end|>")]
    second = render_messages(tok, [QUESTION, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                   {"role": "tool", "content": "84"}])
    reply2 = tok.encode(ANSWER) + [sid("<|assistant_end|>")]
    system = {"role": "system", "content": tools_system_text([ToolDef.model_validate(t) for t in TOOLS])}
    client_side = render_messages(tok, [system, QUESTION])
    assert len(client_side) > len(second) + len(reply2)  # the scripts do not overlap
    script = say(say(say({}, len(first), reply1), len(second), reply2), len(client_side), reply1)
    model = scripted_model(tok, script, fill=tok.encode("a")[0], block_size=len(client_side) + len(reply1) + 8)
    model.reply_tokens = (len(reply1), len(reply2))
    return model


def save_run(root, model, tok, **state):
    tok_path = tok.save(root / "tokenizer.json")
    save_checkpoint(root / "checkpoints", 1, model, state={"tokenizer_fingerprint": tok.fingerprint, **state},
                    files={"tokenizer.json": tok_path.read_bytes()})
    return root


def chat(monkeypatch, *argv, stdin: str):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return run_cli("chat", *argv)


# ----------------------------------------------------------------------------- which models use tools


def test_trained_with_tools_follows_the_record(tmp_path, tok, scripted):
    base = save_run(tmp_path / "base", scripted, tok)  # pretraining: no record
    sft_tools = save_run(tmp_path / "sft", scripted, tok, stage="sft", tool_conversations=12,
                         base_checkpoint=str(base))
    sft_plain = save_run(tmp_path / "sft0", scripted, tok, stage="sft", tool_conversations=0,
                         base_checkpoint=str(base))
    rl_no_tools = save_run(tmp_path / "rl", scripted, tok, stage="grpo", rl={"tools": False},
                           base_checkpoint=str(sft_tools / "checkpoints" / "step_000001"))
    rl_tools = save_run(tmp_path / "rl2", scripted, tok, stage="grpo", rl={"tools": True},
                        base_checkpoint=str(sft_plain))
    assert not trained_with_tools(base) and not trained_with_tools(sft_plain)
    assert trained_with_tools(sft_tools) and trained_with_tools(rl_tools)
    assert trained_with_tools(rl_no_tools)  # RL without tools keeps what its SFT base learned


def test_sft_records_whether_its_data_used_tools(tmp_path, corpus_text):
    """The record `lmforge chat` reads is written by SFT itself."""
    from lmforge.stages.sft import SFTOptions, sft
    from lmforge.train.checkpoint import read_checkpoint_state, resolve_checkpoint
    from lmforge.train.loop import TrainConfig

    base = save_tiny_checkpoint(tmp_path / "base", block_size=128)
    for tools, name in ((True, "with"), (False, "without")):
        cfg = TrainConfig(out_dir=str(tmp_path / name), max_steps=1, device="cpu", progress=False, compile="off",
                          optimizer="adamw", eval_every=0)
        sft(SFTOptions(checkpoint=str(base), data=["synthetic:arithmetic:20"], tools=tools, batch_size=2),
            cfg, log=lambda *a: None)
        state = read_checkpoint_state(resolve_checkpoint(tmp_path / name))
        assert (state["tool_conversations"] > 0) == tools, state["tool_conversations"]
        assert trained_with_tools(tmp_path / name) == tools


# ----------------------------------------------------------------------------- lmforge chat


def test_chat_runs_tools_by_default_for_a_tool_model(tmp_path, tok, scripted, monkeypatch):
    run = save_run(tmp_path / "sft", scripted, tok, stage="sft", tool_conversations=5)
    code, out, err = chat(monkeypatch, "--checkpoint", run, "--temperature", 0, "--max-new-tokens", 150,
                          stdin="What is 12*7?\n")
    assert code == 0, err
    assert out.splitlines() == ['[tool call] calculator {"expression": "12*7"}', "[tool result] 84", ANSWER]
    assert "tools run" in err
    # --no-tools: the reply is streamed as it comes, markup included; nothing is run
    code, out, err = chat(monkeypatch, "--checkpoint", run, "--temperature", 0, "--max-new-tokens", 150,
                          "--no-tools", stdin="What is 12*7?\n")
    assert code == 0, err
    assert out.startswith("<|tool_call_start|>" + json.dumps(CALL)) and "[tool" not in out


def test_chat_tools_follow_the_checkpoint_or_the_flag(tmp_path, tok, scripted, monkeypatch):
    run = save_run(tmp_path / "plain", scripted, tok, stage="sft", tool_conversations=0)
    code, out, _ = chat(monkeypatch, "--checkpoint", run, "--temperature", 0, "--max-new-tokens", 150,
                        stdin="What is 12*7?\n")
    assert code == 0 and "[tool" not in out
    code, out, _ = chat(monkeypatch, "--checkpoint", run, "--temperature", 0, "--max-new-tokens", 150, "--tools",
                        stdin="What is 12*7?\n/reset\nWhat is 12*7?\n")
    assert code == 0
    # /reset: the second question is answered the same way from an empty history
    assert out.splitlines() == ['[tool call] calculator {"expression": "12*7"}', "[tool result] 84", ANSWER] * 2


def test_chat_passes_min_p_and_repetition_penalty(tmp_path, monkeypatch):
    """Both options reach the sampler (they were silently dropped): the reply is exactly the engine's
    with them, and differs from the reply without them."""
    from lmforge.inference.tools import generate_with_tools

    run = save_tiny_checkpoint(tmp_path / "run")
    model, _ = load_model(run)
    tok = load_checkpoint_tokenizer(run)
    engine = Engine(model, tok)
    ids = render_messages(tok, [{"role": "user", "content": "hello"}])
    cases = [(dict(temperature=0.0, repetition_penalty=3.0), ["--temperature", 0, "--repetition-penalty", 3]),
             (dict(temperature=1.0, min_p=0.5, seed=3), ["--temperature", 1, "--min-p", 0.5, "--seed", 3])]
    for kwargs, flags in cases:
        [want] = engine.generate([ids], 24, **kwargs)
        plain = {k: v for k, v in kwargs.items() if k in ("temperature", "seed")}
        assert engine.generate([ids], 24, **plain)[0].text != want.text  # the option matters here
        code, out, err = chat(monkeypatch, "--checkpoint", run, "--max-new-tokens", 24, *flags, stdin="hello\n")
        assert code == 0, err
        assert out == want.text + "\n"
        # the tool loop gets them too
        with_tools = generate_with_tools(engine, [{"role": "user", "content": "hello"}], max_new_tokens=24,
                                         **kwargs)
        code, out, err = chat(monkeypatch, "--checkpoint", run, "--max-new-tokens", 24, "--tools", *flags,
                              stdin="hello\n")
        assert code == 0, err
        assert with_tools.tool_calls == 0 and out == with_tools.text + "\n"


# ----------------------------------------------------------------------------- lmforge serve --tools builtin


@pytest.fixture(scope="module")
def builtin_server(tok, scripted):
    with ServerThread(create_app(scripted, tok, ServeConfig(model_name="m", tools="builtin"))) as srv:
        yield srv


def test_server_runs_the_builtin_tool_and_the_model_continues(builtin_server, scripted):
    c = openai.OpenAI(base_url=builtin_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    resp = c.chat.completions.create(model="m", messages=[QUESTION], temperature=0, max_tokens=100)
    choice = resp.choices[0]
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    assert not choice.message.tool_calls  # nothing left for the client to run
    [run] = choice.message.model_extra["tool_runs"]
    assert run["function"]["name"] == "calculator" and json.loads(run["function"]["arguments"]) == CALL["arguments"]
    assert run["result"] == "84" and run["id"].startswith("call_")
    assert resp.usage.completion_tokens == sum(scripted.reply_tokens)  # the model's tokens of both rounds

    # streamed: the call, then its result, then the answer, in that order
    order, text, finish = [], "", None
    with httpx.stream("POST", builtin_server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "m", "messages": [QUESTION], "temperature": 0, "max_tokens": 100,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for ch in json.loads(line[6:])["choices"]:
                delta = ch["delta"]
                if "tool_run" in delta:
                    order.append(("call", delta["tool_run"]["function"]["name"], delta["tool_run"]["id"]))
                if "tool_result" in delta:
                    order.append(("result", delta["tool_result"]["content"], delta["tool_result"]["id"]))
                if delta.get("content"):
                    text += delta["content"]
                    if order[-1] != "text":
                        order.append("text")
                finish = ch["finish_reason"] or finish
    assert [o[:2] if isinstance(o, tuple) else o for o in order] == [("call", "calculator"), ("result", "84"), "text"]
    assert order[0][2] == order[1][2]  # the result names its call
    assert text == ANSWER and finish == "stop"
    health = httpx.get(builtin_server.url + "/health").json()
    assert health["scheduler"]["errors"] == 0 and health["scheduler"]["running"] == 0


def test_server_tool_budget_counts_every_round(builtin_server, scripted):
    """max_tokens bounds the model's tokens over the call and the answer together."""
    n_call = scripted.reply_tokens[0]
    resp = httpx.post(builtin_server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "m", "messages": [QUESTION], "temperature": 0, "max_tokens": n_call + 3}).json()
    choice = resp["choices"][0]
    assert choice["message"]["tool_runs"][0]["result"] == "84"
    assert choice["message"]["content"] == ANSWER[:3] and choice["finish_reason"] == "length"
    assert resp["usage"]["completion_tokens"] == n_call + 3


def test_client_side_tools_and_tool_choice_none_are_unchanged(builtin_server):
    """A request with its own tools gets the call back to run itself (no server run); tool_choice
    "none" keeps the tool tokens banned."""
    c = openai.OpenAI(base_url=builtin_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    resp = c.chat.completions.create(model="m", messages=[QUESTION], tools=TOOLS, temperature=0, max_tokens=100)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and "tool_runs" not in (choice.message.model_extra or {})
    assert json.loads(choice.message.tool_calls[0].function.arguments) == CALL["arguments"]
    plain = c.chat.completions.create(model="m", messages=[QUESTION], tool_choice="none", temperature=0, max_tokens=5)
    assert plain.choices[0].message.content == BANNED_CALL and "tool_runs" not in plain.choices[0].message.model_extra


def test_server_without_builtin_tools_bans_the_call(tok, scripted):
    with ServerThread(create_app(scripted, tok, ServeConfig(model_name="m"))) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                          json={"model": "m", "messages": [QUESTION], "temperature": 0, "max_tokens": 5}).json()
    assert resp["choices"][0]["message"]["content"] == BANNED_CALL and "tool_runs" not in resp["choices"][0]["message"]


def test_server_tool_call_limit(tok, scripted):
    with ServerThread(create_app(scripted, tok, ServeConfig(model_name="m", tools="builtin", max_tool_calls=0))) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                          json={"model": "m", "messages": [QUESTION], "temperature": 0, "max_tokens": 100}).json()
        [run] = resp["choices"][0]["message"]["tool_runs"]
        assert run["result"].startswith("error: not run") and resp["choices"][0]["finish_reason"] == "length"
        assert is_openai_error(httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                                          json={"model": "m", "messages": [QUESTION], "tool_choice": "auto"}), 400)


def test_bad_tools_setting_is_refused(tok, scripted):
    from lmforge.common import LmforgeError

    with pytest.raises(LmforgeError, match="tools must be"):
        create_app(scripted, tok, ServeConfig(tools="all"))


@contextlib.contextmanager
def _released_at_exit(event):
    """A failing test must not leave the server's tool thread waiting."""
    try:
        yield
    finally:
        event.set()


def test_chat_page_shows_server_tool_calls_as_they_happen(builtin_server, tmp_path, monkeypatch):
    """The page (headless Chromium, as in test_serve_browser.py) shows the call while the tool is
    still running (the test holds it), then its result, then the answer; the next turn sends the
    call and the result back as history."""
    import threading

    import lmforge.inference.tools as tools

    release, real_run_tool = threading.Event(), tools.run_tool

    def held_run_tool(call, *args, **kwargs):
        assert release.wait(60), "the test never released the tool"
        return real_run_tool(call, *args, **kwargs)

    monkeypatch.setattr(tools, "run_tool", held_run_tool)
    if not Path(CHROMIUM).is_file():
        missing("Chromium", "apt-get install -y chromium, or set LMFORGE_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, _released_at_exit(release):
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.goto(builtin_server.url + "/")
        page.wait_for_selector("#model:has-text('model: m')")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "100")
        sent = []
        page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
        page.fill("#input", QUESTION["content"])
        page.press("#input", "Enter")
        # the tool is held: the page shows the call, still waiting for its result, and no answer yet
        page.wait_for_selector(".msg.assistant .tool-result.pending", timeout=60_000)
        bubble = page.locator(".msg.assistant").nth(0)
        assert bubble.locator(".tool-call").inner_text() == '\u2192 calculator {"expression": "12*7"}'
        assert bubble.locator(".text").inner_text() == "" and bubble.get_attribute("data-done") is None
        release.set()
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        assert bubble.locator(".tool-result").inner_text() == "\u2190 84"
        assert bubble.locator(".text").inner_text() == ANSWER
        assert bubble.locator(".meta").inner_text().startswith("finish: stop")
        page.screenshot(path=str(tmp_path / "chat_page_tools.png"), full_page=True)
        # the second turn's history holds the call and its result, as the model saw them
        page.fill("#input", "Thanks")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='true']", timeout=60_000)
        history = json.loads(sent[-1])["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant", "user"]
        assert history[1]["tool_calls"][0]["function"]["name"] == "calculator" and history[2]["content"] == "84"
        assert history[3]["content"] == ANSWER
        browser.close()


def test_streamed_call_reaches_the_client_before_the_tool_runs(builtin_server, monkeypatch):
    """The stream coalesces events that are already queued; a server-run call must still be sent
    before the tool blocks the stream (it used to wait in the buffer until the tool returned)."""
    import threading

    import lmforge.inference.tools as tools

    release, real_run_tool = threading.Event(), tools.run_tool

    def held_run_tool(call, *args, **kwargs):
        assert release.wait(30), "the test never released the tool"
        return real_run_tool(call, *args, **kwargs)

    monkeypatch.setattr(tools, "run_tool", held_run_tool)
    seen_before_release = []
    try:
        with httpx.stream("POST", builtin_server.url + "/v1/chat/completions", timeout=60,
                          json={"model": "m", "messages": [QUESTION], "temperature": 0, "max_tokens": 100,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and not release.is_set():
                    deltas = [ch["delta"] for ch in json.loads(line[6:])["choices"]]
                    seen_before_release += [k for d in deltas for k in d if k in ("tool_run", "tool_result")]
                    if "tool_run" in seen_before_release:
                        release.set()
    finally:
        release.set()
    assert seen_before_release == ["tool_run"]
