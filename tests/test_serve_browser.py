"""The chat page in a real headless browser: Debian's Chromium driven by Playwright.

The server runs a scripted model (see test_serve.py) that answers the first message with FIRST and,
given the whole history, the second with SECOND, so the test knows exactly what must appear. A
MutationObserver counts how many times the reply's text changed: more than once means it was
rendered as it streamed in, not at the end. The server requires an API key, typed into the page.
The screenshot is kept in pytest's temporary folder (and copied to $LMFORGE_TEST_ARTIFACTS if set).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import missing
from test_serve import ServerThread, say, scripted_model

from lmforge.chat import render_messages
from lmforge.serve.app import ServeConfig, create_app
from lmforge.tokenizer import Tokenizer

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FIRST = "Hello from lmforge! How can I help?"
SECOND = "Second reply, with history."
KEY = "browser-key"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        missing(f"a Chromium browser (none at {CHROMIUM})",
                "install it (Debian: apt-get install -y chromium) or point LMFORGE_CHROMIUM at one")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def test_chat_page_streams_replies_with_history(browser, tmp_path):
    tok = Tokenizer.byte_level()
    end = tok.special_id("<|assistant_end|>")
    turn1 = [{"role": "user", "content": "Hi there"}]
    turn2 = turn1 + [{"role": "assistant", "content": FIRST}, {"role": "user", "content": "Again"}]
    p1, p2 = render_messages(tok, turn1), render_messages(tok, turn2)
    script = say(say({}, len(p1), tok.encode(FIRST) + [end]), len(p2), tok.encode(SECOND) + [end])
    model = scripted_model(tok, script, fill=tok.encode("z")[0], block_size=len(p2) + len(SECOND) + 8)
    with ServerThread(create_app(model, tok, ServeConfig(model_name="scripted", api_key=KEY))) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        assert page.title() == "lmforge chat"
        page.wait_for_selector("#model:has-text('missing API key')")  # /v1/models refused without the key
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model:has-text('scripted')")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "64")
        # count the reply's text updates as they happen
        page.evaluate("""() => {
            window.updates = 0;
            new MutationObserver((records) => {
                for (const r of records)
                    if (r.target.classList && r.target.classList.contains('text')) window.updates++;
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#input", "Hi there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        replies = page.locator(".msg.assistant .text")
        assert replies.nth(0).inner_text() == FIRST
        assert page.locator(".msg.assistant .meta").nth(0).inner_text().startswith("finish: stop")
        assert page.evaluate("window.updates") > 1  # rendered piece by piece while streaming
        shot = tmp_path / "chat_page.png"
        page.screenshot(path=str(shot), full_page=True)

        # second turn: the page sends the whole conversation, so the scripted model answers SECOND
        page.fill("#input", "Again")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='true']", timeout=60_000)
        assert replies.nth(1).inner_text() == SECOND
        assert page.locator(".msg.user .text").all_inner_texts() == ["Hi there", "Again"]
        page.screenshot(path=str(shot), full_page=True)

        # a new chat starts from an empty history: the first question gets the first answer again
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        page.fill("#input", "Hi there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        assert page.locator(".msg.assistant .text").nth(0).inner_text() == FIRST

        # a wrong key shows the server's error in the page
        page.fill("#api-key", "wrong")
        page.fill("#input", "Hi there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant.error", timeout=60_000)
        assert "incorrect API key" in page.locator(".msg.assistant.error .meta").inner_text()
        page.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("LMFORGE_TEST_ARTIFACTS"):
        out = Path(os.environ["LMFORGE_TEST_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)


def test_chat_page_lists_the_sources_of_a_rag_reply(browser):
    """With `serve --rag`, the page shows the passages the reply was given under it, numbered as the
    model saw them, and marks the one it cited."""
    from lmforge.rag import Snippet, rag_turn

    tok = Tokenizer.byte_level()
    passages = [Snippet("The Rhine flows into the North Sea.", "docs/rhine.md", "rhine", "Rhine", 0, 35),
                Snippet("Paris is the capital of France.", "docs/paris.md", "paris", "Paris", 10, 41)]

    class Index:
        def search(self, query, k=5):
            return passages[:k]

    prompt = render_messages(tok, rag_turn("Capital of France?", passages))
    reply = tok.encode("Paris [2]") + [tok.special_id("<|assistant_end|>")]
    model = scripted_model(tok, say({}, len(prompt), reply), fill=tok.encode("z")[0],
                           block_size=2 * len(prompt) + 64)  # room for the whole prompt: no passage is cut
    cfg = ServeConfig(model_name="scripted", api_key=KEY, rag_index="fake", rag_k=2)
    with ServerThread(create_app(model, tok, cfg, retriever=Index())) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model:has-text('scripted')")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "16")
        page.fill("#input", "Capital of France?")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
        assert page.locator(".msg.assistant .text").inner_text() == "Paris [2]"
        items = page.locator(".msg.assistant .sources li")
        assert items.all_inner_texts() == ["docs/rhine.md:0-35 \u00b7 Rhine", "docs/paris.md:10-41 \u00b7 Paris"]
        cited = page.locator(".msg.assistant .sources li.cited").all_inner_texts()
        assert cited == ["docs/paris.md:10-41 \u00b7 Paris"]
        page.close()
