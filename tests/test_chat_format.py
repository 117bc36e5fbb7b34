"""The chat template with tool calls, and the SFT loss mask."""
import json

import pytest

from lmforge.chat import CHAT_TEMPLATE_JINJA, format_tool_call, parse_tool_call, render_for_training, render_messages
from lmforge.common import LmforgeError
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]

TOOL = [{"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "calculator", "arguments": "{\"expression\": \"12*7\"}"}}]},
        {"role": "tool", "content": "84", "tool_call_id": "c1"},
        {"role": "assistant", "content": "The answer is 84."}]


def masked_text(tok, ids, mask, value=1):
    """The text of each maximal run of tokens whose mask equals value."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m == value:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_multi_turn_mask_covers_exactly_the_assistant_turns(tok):
    ids, mask = render_for_training(tok, MULTI)
    assert ids == render_messages(tok, MULTI, add_generation_prompt=False)
    assert len(mask) == len(ids)
    assert masked_text(tok, ids, mask) == ["Hello.<|assistant_end|>", "4<|assistant_end|>"]
    assert tok.decode(ids) == ("<|bos|><|system_start|>Be brief.<|system_end|><|user_start|>Hi<|user_end|>"
                               "<|assistant_start|>Hello.<|assistant_end|><|user_start|>2+2?<|user_end|>"
                               "<|assistant_start|>4<|assistant_end|>")
    # every assistant_start is given (mask 0), every assistant_end is learned (mask 1)
    a_start, a_end = tok.special_id("assistant_start"), tok.special_id("assistant_end")
    assert all(m == 0 for i, m in zip(ids, mask) if i == a_start)
    assert all(m == 1 for i, m in zip(ids, mask) if i == a_end)


def test_tool_call_rendering_matches_the_agreed_format(tok):
    ids, mask = render_for_training(tok, TOOL)
    assert tok.decode(ids) == (
        '<|bos|><|user_start|>What is 12*7?<|user_end|><|assistant_start|><|tool_call_start|>'
        '{"name": "calculator", "arguments": {"expression": "12*7"}}<|tool_call_end|><|assistant_end|>'
        '<|tool_result_start|>84<|tool_result_end|><|assistant_start|>The answer is 84.<|assistant_end|>')
    # the call is learned, the tool's result is not
    assert masked_text(tok, ids, mask) == [
        '<|tool_call_start|>{"name": "calculator", "arguments": {"expression": "12*7"}}'
        '<|tool_call_end|><|assistant_end|>',
        "The answer is 84.<|assistant_end|>"]
    assert "84<|tool_result_end|>" in "".join(masked_text(tok, ids, mask, 0))


def test_tool_call_shapes_render_identically(tok):
    simple = [dict(m) for m in TOOL]
    simple[1] = {"role": "assistant", "content": "",
                 "tool_calls": [{"name": "calculator", "arguments": {"expression": "12*7"}}]}
    compact = [dict(m) for m in TOOL]
    compact[1] = {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "calculator", "arguments": '{"expression":"12*7"}'}}]}
    assert render_messages(tok, simple) == render_messages(tok, TOOL) == render_messages(tok, compact)


def test_content_before_a_tool_call_is_kept(tok):
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": "Let me compute.",
             "tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]}]
    text = tok.decode(render_messages(tok, msgs, add_generation_prompt=False))
    assert text.endswith('<|assistant_start|>Let me compute.<|tool_call_start|>{"name": "calculator", '
                         '"arguments": {"expression": "1+1"}}<|tool_call_end|><|assistant_end|>')


def test_parse_tool_call_round_trip_and_errors():
    call = {"name": "python", "arguments": {"code": "print('héllo \"x\"')\n"}}
    assert parse_tool_call(format_tool_call(call)) == call
    assert parse_tool_call('{"name": "calculator"}') == {"name": "calculator", "arguments": {}}
    for bad in ['{"name": "calculator", "arguments": {"expression": "1+1"}', "calculator(1+1)", "[1, 2]",
                '{"arguments": {}}', '{"name": "c", "arguments": [1]}', '{"name": "c", "arguments": "{bad"}']:
        with pytest.raises(LmforgeError):
            parse_tool_call(bad)


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant"),
    ([{"role": "assistant", "content": None}], "no text"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "c", "arguments": "{oops"}]}], "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], "no function name"),
    ([{"role": "assistant", "content": "", "tool_calls": "calc"}], "must be a list"),
])
def test_invalid_messages_are_rejected(tok, msgs, match):
    with pytest.raises(LmforgeError, match=match):
        render_messages(tok, msgs)


def test_jinja_template_renders_the_same_text(tok):
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)  # as transformers defines it
    template = env.from_string(CHAT_TEMPLATE_JINJA)
    simple_tool = [dict(m) for m in TOOL]
    simple_tool[1] = {"role": "assistant", "content": None,
                      "tool_calls": [{"name": "calculator", "arguments": {"expression": "12*7"}}]}
    for msgs in (MULTI, TOOL, simple_tool):
        for gen in (True, False):
            assert template.render(messages=msgs, add_generation_prompt=gen) == \
                tok.decode(render_messages(tok, msgs, add_generation_prompt=gen))


def test_hugging_face_apply_chat_template_renders_tool_calls_the_same(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.export_hf(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf.chat_template = CHAT_TEMPLATE_JINJA
    msgs = [dict(m) for m in TOOL]
    msgs[1] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}]}
    for gen in (True, False):
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text == tok.decode(render_messages(tok, msgs, add_generation_prompt=gen))
