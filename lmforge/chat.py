"""The chat template: how a conversation becomes tokens.

A conversation is a list of messages `{"role": "system" | "user" | "assistant" | "tool", "content": str}`
(the OpenAI shape). Each message is its content wrapped in its role's special tokens, after one
`<|bos|>`:

    <|bos|><|system_start|>You are terse.<|system_end|><|user_start|>Hi<|user_end|><|assistant_start|>Hello.<|assistant_end|>

A tool's output is wrapped in `<|tool_result_start|>...<|tool_result_end|>`. To ask the model for a
reply, the rendering ends with `<|assistant_start|>` and generation stops at `<|assistant_end|>`.
Special tokens are inserted as ids, so text inside a message can never forge a turn boundary.
`CHAT_TEMPLATE_JINJA` is the same template for Hugging Face `apply_chat_template`.
"""
from __future__ import annotations

from lmforge.common import LmforgeError

ROLE_TOKENS = {
    "system": ("<|system_start|>", "<|system_end|>"),
    "user": ("<|user_start|>", "<|user_end|>"),
    "assistant": ("<|assistant_start|>", "<|assistant_end|>"),
    "tool": ("<|tool_result_start|>", "<|tool_result_end|>"),
}

CHAT_TEMPLATE_JINJA = (
    "{{ '<|bos|>' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system_start|>' + m['content'] + '<|system_end|>' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user_start|>' + m['content'] + '<|user_end|>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant_start|>' + m['content'] + '<|assistant_end|>' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|tool_result_start|>' + m['content'] + '<|tool_result_end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LmforgeError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LmforgeError(f"message {i} is not an object with 'role' and 'content'")
        if m.get("role") not in ROLE_TOKENS:
            raise LmforgeError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLE_TOKENS)}")
        if not isinstance(m.get("content"), str):
            raise LmforgeError(f"message {i} ({m['role']}) has no text 'content'")
    return messages


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with add_generation_prompt, ready for the assistant's reply."""
    validate_messages(messages)
    ids = [tokenizer.bos_id]
    for m in messages:
        start, end = ROLE_TOKENS[m["role"]]
        ids.append(tokenizer.special_id(start))
        ids.extend(tokenizer.encode(m["content"]))
        ids.append(tokenizer.special_id(end))
    if add_generation_prompt:
        ids.append(tokenizer.special_id("<|assistant_start|>"))
    return ids
