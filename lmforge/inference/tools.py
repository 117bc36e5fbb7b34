"""Tools a chat model can call, and the generation loop that runs them.

The model writes a call inside its turn, `<|tool_call_start|>{"name": ..., "arguments": {...}}<|tool_call_end|>`
(see lmforge/chat.py). `generate_with_tools` stops generation at `<|tool_call_end|>`, parses the
call, runs the tool, appends `<|assistant_end|><|tool_result_start|>result<|tool_result_end|><|assistant_start|>`
and lets the model continue until it ends a turn without a call.

Tools:
  calculator  arithmetic on numbers (+ - * / // % ** and parentheses), evaluated by walking the
              `ast` of the expression: no eval, no names, no attribute access, bounded sizes.
  python      a snippet run inside an operating-system sandbox (lmforge/inference/sandbox.py):
              new user/mount/network/pid/ipc namespaces, a private read-only root holding only the
              Python installation and shared libraries, a size-limited tmpfs as working folder,
              a seccomp filter that makes process creation, exec, sockets, ptrace and mounts fail,
              rlimits on CPU time, memory, file size and open files, output read with a byte cap and
              a wall-clock timeout that kill the whole process group. Where the kernel cannot
              provide this (macOS, user namespaces disabled) it refuses (SandboxUnavailable); it
              never runs the code unsandboxed. Threat model: docs/posttraining.md, "Tools".
"""
from __future__ import annotations

import ast
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.chat import format_tool_call, parse_tool_call, render_messages
from lmforge.common import LmforgeError
from lmforge.inference.sandbox import PythonLimits, SandboxUnavailable, run_sandboxed
from lmforge.models.protocol import tokens_left

# ----------------------------------------------------------------------------- calculator

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_DIGITS = 1000  # results beyond this many digits are refused (a ** b can be astronomically large)


def calculator(expression: str) -> str:
    """Value of an arithmetic expression as text; LmforgeError for anything that is not arithmetic."""
    if not isinstance(expression, str) or not expression.strip():
        raise LmforgeError("calculator: give an arithmetic expression, e.g. '12 * (3 + 4)'")
    if len(expression) > 500:
        raise LmforgeError("calculator: expression longer than 500 characters")
    try:
        with warnings.catch_warnings():  # Python warns about odd literals ("8a") on stderr: not the user's business
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise LmforgeError(f"calculator: cannot parse {expression!r}") from None
    value = _eval(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LmforgeError("calculator: result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > 10_000 or (abs(left) > 1 and abs(right) * math.log10(abs(left)) > MAX_DIGITS):
                raise LmforgeError("calculator: power too large")
        try:
            value = _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise LmforgeError("calculator: division by zero") from None
        except OverflowError:
            raise LmforgeError("calculator: result too large") from None
        if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
            raise LmforgeError("calculator: result too large")
        if isinstance(value, complex):
            raise LmforgeError("calculator: result is not a real number")
        return value
    raise LmforgeError(f"calculator: only numbers and + - * / // % ** ( ) are allowed, "
                       f"not {type(node).__name__}")


# ----------------------------------------------------------------------------- python in a sandbox


def run_python(code: str, limits: PythonLimits | None = None) -> str:
    """Run a Python snippet in the OS sandbox (lmforge.inference.sandbox); returns its stdout and
    stderr (truncated). Errors in the snippet come back as text (the model sees them), never as
    exceptions here; a machine where the sandbox cannot be built raises SandboxUnavailable."""
    if not isinstance(code, str) or not code.strip():
        raise LmforgeError("python tool: give some code to run")
    limits = limits or PythonLimits()
    result = run_sandboxed(code, limits)
    if result.timed_out:
        return f"error: timed out after {limits.timeout:g} s"
    out = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
    if result.output_cut:
        return out[:limits.max_output] + f"... (more than {limits.max_output_bytes} bytes of output: stopped)"
    if result.returncode != 0 and not out:
        out = f"error: exited with status {result.returncode}"
    if len(out) > limits.max_output:
        out = out[:limits.max_output] + f"... ({len(out) - limits.max_output} more characters)"
    return out


# ----------------------------------------------------------------------------- registry


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments (OpenAI's "function" shape)
    fn: Callable[..., str]

    def __call__(self, arguments: dict) -> str:
        try:
            return str(self.fn(**arguments))
        except TypeError as e:  # wrong or missing argument names
            raise LmforgeError(f"{self.name}: bad arguments {sorted(arguments)}: {e}") from None

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


TOOLS: dict[str, Tool] = {
    "calculator": Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
                       {"type": "object", "properties": {"expression": {"type": "string"}},
                        "required": ["expression"]}, calculator),
    "python": Tool("python", "Run a short Python program and return what it prints.",
                   {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
                   lambda code: run_python(code)),
}


def select_tools(names=None) -> dict[str, Tool]:
    """The built-in tools with these names (all of them when None); LmforgeError for an unknown one."""
    if names is None:
        return dict(TOOLS)
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise LmforgeError(f"unknown tool(s) {', '.join(map(repr, unknown))}; built-in tools: {', '.join(TOOLS)}")
    return {n: TOOLS[n] for n in names}


def run_tool(call: dict, tools: dict[str, Tool] | None = None) -> str:
    """Run one parsed call; any failure becomes an 'error: ...' result for the model to read."""
    tools = TOOLS if tools is None else tools
    if call["name"] not in tools:
        return f"error: unknown tool {call['name']!r} (available: {', '.join(tools)})"
    try:
        return tools[call["name"]](call["arguments"])
    except SandboxUnavailable:
        raise  # the machine's problem, not the model's: stop instead of feeding errors into training
    except LmforgeError as e:
        return f"error: {e}"


# ----------------------------------------------------------------------------- the tool-using loop


@dataclass
class ToolChatResult:
    messages: list[dict]  # the new messages: assistant turns (with tool_calls) and tool results
    text: str  # the final assistant turn's content
    finish_reason: str  # "stop" (ended its turn), "length" (tokens / context ran out), "eos", "max_calls"
    tool_calls: int = 0
    failed_calls: int = 0  # malformed calls or calls whose tool returned an error
    tokens: list[int] = field(default_factory=list)  # everything generated after the prompt, tool results included
    # 1 for each of `tokens` the model chose, 0 for those the loop inserted (tool results and the
    # markup around them): RL credits the model's own tokens only.
    action_mask: list[int] = field(default_factory=list)


class _ToolRow:
    """One conversation in the batched tool loop."""

    def __init__(self, prompt: list[int], budget: int):
        self.ids, self.prompt_len, self.budget = list(prompt), len(prompt), budget
        self.mask: list[int] = []
        self.messages: list[dict] = []
        self.calls = self.failed = 0

    def add(self, tokens: list[int], chosen: bool):
        self.ids += tokens
        self.mask += [int(chosen)] * len(tokens)

    def result(self, text: str, reason: str) -> ToolChatResult:
        return ToolChatResult(self.messages, text, reason, self.calls, self.failed, self.ids[self.prompt_len:],
                              self.mask)


def generate_with_tools(engine, messages: list[dict], *, max_new_tokens: int = 128, max_calls: int = 4,
                        tools: dict[str, Tool] | None = None, **sampling) -> ToolChatResult:
    """Reply to a conversation, running the tools the model calls along the way. `sampling` goes to
    `Engine.generate` (temperature, top_p, seed, ...). max_new_tokens bounds the model's own tokens."""
    if engine.tokenizer is None:
        raise LmforgeError("generate_with_tools needs an Engine with a tokenizer")
    ids = render_messages(engine.tokenizer, messages, add_generation_prompt=True)
    return generate_with_tools_batch(engine, [ids], max_new_tokens=max_new_tokens, max_calls=max_calls,
                                     tools=tools, **sampling)[0]


def generate_with_tools_batch(engine, prompts: list[list[int]], *, max_new_tokens: int = 128, max_calls: int = 4,
                              tools: dict[str, Tool] | None = None, seed: int | None = None,
                              **sampling) -> list[ToolChatResult]:
    """The tool loop over a batch of rendered prompts (each ending with <|assistant_start|>).

    Every round generates for all unfinished rows at once and stops each row at <|tool_call_end|>,
    <|assistant_end|> or end of text; a row that made a call gets the tool's result appended (the
    assistant turn closed, a tool block, a new assistant turn) and continues in the next round.
    max_new_tokens bounds each row's own tokens over all rounds; round r samples with seed + r."""
    tok = engine.tokenizer
    if tok is None:
        raise LmforgeError("generate_with_tools needs an Engine with a tokenizer")
    if hasattr(tok, "chat_ids"):
        raise LmforgeError("the built-in tool loop speaks lmforge's chat template; an imported model calls tools "
                           "through its own template with `lmforge serve` (tools in the request)")
    sid = tok.special_id
    call_start, call_end = sid("<|tool_call_start|>"), sid("<|tool_call_end|>")
    end, a_start = sid("<|assistant_end|>"), sid("<|assistant_start|>")
    result_start, result_end = sid("<|tool_result_start|>"), sid("<|tool_result_end|>")
    stop_ids = [end, tok.bos_id, call_end]
    window = tokens_left(engine.model, 0)
    rows = [_ToolRow(p, max_new_tokens) for p in prompts]
    results: list[ToolChatResult | None] = [None] * len(rows)
    active, rnd = list(range(len(rows))), 0
    while active:
        for i in [i for i in active if rows[i].budget <= 0 or len(rows[i].ids) >= window]:
            results[i] = rows[i].result("", "length")
            active.remove(i)
        if not active:
            break
        # One budget for the round (the largest left); a row that overshoots its own is cut below.
        outs = engine.generate([rows[i].ids for i in active], max(rows[i].budget for i in active),
                               stop_ids=stop_ids, seed=None if seed is None else seed + rnd, **sampling)
        rnd += 1
        still = []
        for i, c in zip(active, outs):
            r = rows[i]
            tokens, stop = c.tokens, c.stop
            if len(tokens) >= r.budget and (len(tokens) > r.budget or stop is not None):
                tokens, stop = tokens[:r.budget], None  # its own budget ran out first
            r.budget -= len(tokens) + (stop is not None)
            r.add(tokens, True)
            if stop != call_end:
                text = tok.decode(tokens)
                r.messages.append({"role": "assistant", "content": text})
                if stop == end:
                    r.add([end], True)
                # "stop": the turn ended properly; "eos": it stopped at <|bos|> (end of text, not of turn)
                results[i] = r.result(text, "stop" if stop == end else "length" if stop is None else "eos")
                continue
            # A completed call: content before <|tool_call_start|>, the call's JSON after it.
            k = tokens.index(call_start) if call_start in tokens else -1
            content, call_text = tok.decode(tokens[:max(k, 0)]), tok.decode(tokens[k + 1:])
            r.calls += 1
            try:
                call = parse_tool_call(call_text)
                result = run_tool(call, tools)
                r.messages.append({"role": "assistant", "content": content, "tool_calls": [call]})
            except LmforgeError as e:
                result = f"error: {e}"
                r.messages.append({"role": "assistant", "content": content + call_text})
            r.failed += result.startswith("error:")
            r.messages.append({"role": "tool", "content": result})
            if r.calls > max_calls:
                results[i] = r.result("", "max_calls")
                continue
            r.add([call_end], True)
            inserted = [end, result_start] + tok.encode(result) + [result_end, a_start]
            if len(r.ids) + len(inserted) >= window:  # no room left to read the result and answer
                results[i] = r.result("", "length")
                continue
            r.add(inserted, False)
            still.append(i)
        active = still
    return results


__all__ = ["calculator", "run_python", "PythonLimits", "SandboxUnavailable", "Tool", "TOOLS", "run_tool",
           "generate_with_tools",
           "generate_with_tools_batch",
           "ToolChatResult", "format_tool_call"]
