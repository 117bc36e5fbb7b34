"""The OpenAI API shapes: request models (checked strictly, with clear messages), error bodies, and
the response and stream-chunk objects.

Requests are validated with pydantic in strict mode: a field of the wrong type (`"temperature": "hot"`,
`"n": true`) is a 400, not a silent conversion, and an unknown field is a 400 that names it, so a
client never believes an option took effect when it did not. OpenAI options that lmforge does not
implement are accepted only at their neutral value (e.g. `presence_penalty: 0`).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error, as one sentence naming the field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field '{loc}' (lmforge does not support it)", param=loc,
                        code="unknown_field")
    if err["type"] == "missing":
        return APIError(400, f"missing required field '{loc}'", param=loc, code="missing_field")
    got = err.get("input")
    shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
    return APIError(400, f"invalid value for '{loc}': {err['msg']} (got {shown})", param=loc, code="invalid_value")


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON-schema extras (e.g. "strict") are fine
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class _Sampling(_Strict):
    """Fields shared by both endpoints."""
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # lmforge extension (as in vLLM)
    min_p: float | None = Field(None, ge=0, le=1)  # lmforge extension
    stop: str | list[str] | None = None
    # What a torch generator accepts: a signed or an unsigned 64-bit integer (negative ones alias).
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's logs: nothing to do with generation
    # OpenAI options lmforge does not implement: only their neutral values are accepted.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        return tuple(stop)

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(400, f"'{name}' is not supported by lmforge (use 0 or leave it out)", param=name)
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "'logprobs' is not supported by lmforge", param="logprobs")


class ChatRequest(_Sampling):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens
    tools: list[ToolDef] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None  # accepted; the model makes at most one call per turn
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def parse_request(cls, data) -> _Sampling:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    req.check_unsupported()
    return req


def completion_prompts(prompt) -> list[str | list[int]]:
    """The prompts of a /v1/completions request: each a string or a list of token ids."""
    def ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return list(prompt)
    raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                        "lists of token ids (non-empty)", param="prompt")


def chat_messages(messages: list) -> list[dict]:
    """OpenAI messages -> the messages lmforge.chat renders (role, content, tool_calls). Content given
    as a list of parts must be text parts; "developer" is the newer name of "system"."""
    if not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages.{i}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported",
                                   param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        msg = {"role": role, "content": content}
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


TOOLS_PREAMBLE = ("You can call these tools. To call one, write <|tool_call_start|>{\"name\": ..., "
                  "\"arguments\": {...}}<|tool_call_end|>.")


def tools_system_text(tools: list[ToolDef]) -> str:
    """How tool definitions reach the model: a system-prompt paragraph, one JSON line per tool."""
    lines = [TOOLS_PREAMBLE]
    for t in tools:
        f = t.function
        lines.append(json.dumps({"name": f.name, "description": f.description or "",
                                 "parameters": f.parameters or {}}, ensure_ascii=False))
    return "\n".join(lines)


def tool_choice_mode(choice, tools: list[ToolDef] | None) -> tuple[str, str | None]:
    """("none" | "auto" | "required", forced function name or None)."""
    names = [t.function.name for t in tools or []]
    if choice is None:
        return ("auto" if names else "none"), None
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise APIError(400, f"tool_choice '{choice}' needs 'tools'", param="tool_choice")
        return choice, None
    if (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
        if name not in names:
            raise APIError(400, f"tool_choice names function '{name}', which is not in 'tools'", param="tool_choice")
        return "required", name
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_call_obj(call: dict, index: int | None = None) -> dict:
    """A parsed call ({"name", "arguments": dict}) in OpenAI's shape (arguments as a JSON string)."""
    obj = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
           "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
    if index is not None:
        obj = {"index": index, **obj}
    return obj


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
