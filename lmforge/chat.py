"""The chat template: how a conversation becomes tokens (and which of them the model learns).

A conversation is a list of messages `{"role": "system" | "user" | "assistant" | "tool", "content": str}`
(the OpenAI shape). Each message is its content wrapped in its role's special tokens, after one
`<|bos|>` (each example below is one token sequence with nothing between the turns, shown wrapped
over two lines):

    <|bos|><|system_start|>You are terse.<|system_end|><|user_start|>Hi<|user_end|>
    <|assistant_start|>Hello.<|assistant_end|>

Tool calls. An assistant message may carry `tool_calls` (OpenAI's `[{"id", "type": "function",
"function": {"name", "arguments": "<JSON string>"}}]`, or the simple `[{"name", "arguments": {...}}]`).
Each call is written after the message's content, inside the assistant turn, as JSON
`{"name": ..., "arguments": {...}}` between `<|tool_call_start|>` and `<|tool_call_end|>`; the turn then
ends. A tool's output (role "tool") is its own `<|tool_result_start|>...<|tool_result_end|>` block, and
the answer that uses it is a new assistant turn:

    <|assistant_start|><|tool_call_start|>{"name": "calculator", "arguments": {"expression": "12*7"}}<|tool_call_end|>
    <|assistant_end|><|tool_result_start|>84<|tool_result_end|><|assistant_start|>12*7 = 84.<|assistant_end|>

To ask the model for a reply, the rendering ends with `<|assistant_start|>`; generation stops at
`<|assistant_end|>` (or at `<|tool_call_end|>` in a tool-using loop, see lmforge/inference/tools.py).
Special tokens are inserted as ids, so text inside a message can never forge a turn boundary.

For supervised fine-tuning, `render_for_training` also returns a loss mask that is 1 exactly on the
tokens the assistant produces: its content, its tool calls and its `<|assistant_end|>` (so the model
learns to stop), never on the `<|assistant_start|>` the prompt supplies, the user's or system's text, or
tool results (which the tool, not the model, writes).

`CHAT_TEMPLATE_JINJA` is the same template for Hugging Face `apply_chat_template` (tool-call
arguments given as a JSON *string* are inserted verbatim there; lmforge re-serialises them).

An imported model (`lmforge import`) brings its own template instead: its tokenizer is a
HubTokenizer, which renders the conversation with the model's Jinja chat template exactly as
`transformers` does, and marks for training the characters each assistant turn adds (its reply and
end of turn) — see lmforge/hub_tokenizer.py.
"""
from __future__ import annotations

import json

from lmforge.common import LmforgeError

ROLE_TOKENS = {
    "system": ("<|system_start|>", "<|system_end|>"),
    "user": ("<|user_start|>", "<|user_end|>"),
    "assistant": ("<|assistant_start|>", "<|assistant_end|>"),
    "tool": ("<|tool_result_start|>", "<|tool_result_end|>"),
}
TOOL_CALL_TOKENS = ("<|tool_call_start|>", "<|tool_call_end|>")

CHAT_TEMPLATE_JINJA = (
    "{{ '<|bos|>' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system_start|>' + m['content'] + '<|system_end|>' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user_start|>' + m['content'] + '<|user_end|>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant_start|>' + (m['content'] or '') }}"
    "{% for tc in (m['tool_calls'] or []) %}"
    "{% set f = tc['function'] if tc['function'] is defined else tc %}"
    "{% set args = f['arguments'] if f['arguments'] is string else (f['arguments'] or {}) | tojson %}"
    "{{ '<|tool_call_start|>{\"name\": ' + (f['name'] | tojson) + ', \"arguments\": ' + args + '}<|tool_call_end|>' }}"
    "{% endfor %}"
    "{{ '<|assistant_end|>' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|tool_result_start|>' + m['content'] + '<|tool_result_end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def normalize_tool_call(call, where: str = "tool call") -> dict:
    """`{"name": str, "arguments": dict}` from the OpenAI shape (arguments a JSON string or an object)
    or the simple shape."""
    if not isinstance(call, dict):
        raise LmforgeError(f"{where} must be an object with a name and arguments, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise LmforgeError(f"{where} has no function name")
    args = fn.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where} ({fn['name']}): arguments are not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise LmforgeError(f"{where} ({fn['name']}): arguments must be a JSON object, got {type(args).__name__}")
    return {"name": fn["name"], "arguments": args}


def format_tool_call(call: dict) -> str:
    """The text between the tool-call tokens (json.dumps' default separators, as Jinja's tojson)."""
    call = normalize_tool_call(call)
    return json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def parse_tool_call(text: str) -> dict:
    """Parse the text a model wrote between `<|tool_call_start|>` and `<|tool_call_end|>`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"malformed tool call {text[:200]!r}: {e}") from None
    if not isinstance(obj, dict):
        raise LmforgeError(f"malformed tool call {text[:200]!r}: expected a JSON object")
    return normalize_tool_call(obj, "tool call")


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LmforgeError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LmforgeError(f"message {i} is not an object with 'role' and 'content'")
        if m.get("role") not in ROLE_TOKENS:
            raise LmforgeError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLE_TOKENS)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                raise LmforgeError(f"message {i} ({m['role']}) has tool_calls; only assistant messages may")
            if not isinstance(calls, list):
                raise LmforgeError(f"message {i}: tool_calls must be a list")
            for j, c in enumerate(calls):
                normalize_tool_call(c, f"message {i} tool call {j}")
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise LmforgeError(f"message {i} ({m['role']}) has no text 'content'")
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool,
            tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    validate_messages(messages)
    if hasattr(tokenizer, "chat_ids"):  # an imported tokenizer: the model's own Jinja template
        if tokenizer.chat_template is None:
            raise LmforgeError("this tokenizer has no chat template (a base model's): chat and fine-tuning on "
                               "conversations need one; import an instruct model, or add a chat_template to "
                               "its tokenizer_config.json before importing")
        if add_generation_prompt:
            ids = tokenizer.chat_ids(messages, add_generation_prompt=True, tools=tools)
            return ids, [0] * len(ids)
        return tokenizer.chat_ids_for_training(messages, tools=tools)
    if tools:
        raise LmforgeError("lmforge's chat template takes tool definitions in the system message, not as tools=")
    sid = tokenizer.special_id
    ids, mask = [tokenizer.bos_id], [0]

    def put(tokens, learn: bool):
        ids.extend(tokens)
        mask.extend([int(learn)] * len(tokens))

    for m in messages:
        start, end = ROLE_TOKENS[m["role"]]
        learn = m["role"] == "assistant"
        put([sid(start)], False)  # the prompt supplies the turn's start
        put(tokenizer.encode(m.get("content") or ""), learn)
        for call in m.get("tool_calls") or []:
            put([sid(TOOL_CALL_TOKENS[0])], learn)
            put(tokenizer.encode(format_tool_call(call)), learn)
            put([sid(TOOL_CALL_TOKENS[1])], learn)
        put([sid(end)], learn)  # the assistant learns to end its turn
    if add_generation_prompt:
        put([sid("<|assistant_start|>")], False)
    return ids, mask


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation; with add_generation_prompt, ready for the assistant's reply.
    tools (OpenAI function definitions) go to an imported model's template, which lists them itself."""
    return _render(tokenizer, messages, add_generation_prompt, tools)[0]


def render_for_training(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation: mask[i] is 1 when token i is written by the
    assistant (content, tool calls, end of turn), 0 for everything given to it."""
    return _render(tokenizer, messages, add_generation_prompt=False)
