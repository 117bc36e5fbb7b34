"""Tools (calculator, sandboxed python) and the tool-using generation loop."""
import os
import random

import pytest

from lmforge.chat import render_messages
from lmforge.common import LmforgeError
from lmforge.engine import Completion
from lmforge.posttrain.tools import PythonLimits, calculator, generate_with_tools, run_python, run_tool
from lmforge.tokenizer import Tokenizer


def test_calculator_agrees_with_python_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        a, b, c = rng.randint(-999, 999), rng.randint(-999, 999), rng.randint(1, 99)
        op1, op2 = rng.choice("+-*"), rng.choice(["+", "-", "*", "//", "%"])
        expr = f"({a} {op1} {b}) {op2} {c}"
        assert calculator(expr) == str(int({"+": lambda x, y: x + y, "-": lambda x, y: x - y,
                                              "*": lambda x, y: x * y, "//": lambda x, y: x // y,
                                              "%": lambda x, y: x % y}[op2](
            {"+": a + b, "-": a - b, "*": a * b}[op1], c)))
    assert calculator("7 / 2") == "3.5" and calculator("2 ** 10") == "1024" and calculator("-(3)") == "-3"
    assert calculator("1 / 3") == format(1 / 3, ".12g") and calculator("6 / 3") == "2"


@pytest.mark.parametrize("expr, match", [
    ("__import__('os').system('ls')", "not Call"), ("x + 1", "not Name"), ("(1).real", "not Attribute"),
    ("9 ** 9 ** 9", "too large"), ("1 / 0", "division by zero"), ("'a' * 3", "not Constant"),
    ("1 +", "cannot parse"), ("", "give an arithmetic"), ("[1, 2]", "not List"), ("lambda: 1", "not Lambda"),
])
def test_calculator_refuses_everything_but_arithmetic(expr, match):
    with pytest.raises(LmforgeError, match=match):
        calculator(expr)


def test_python_tool_runs_code_in_a_temp_folder_with_an_empty_environment():
    assert run_python("print('strawberry'.count('r'))") == "3"
    out = run_python("import os, sys; print(os.getcwd()); print(sorted(os.environ)); print(sys.flags.isolated)")
    cwd, env, isolated = out.splitlines()
    assert os.path.basename(cwd).startswith("lmforge-py-") and not os.path.exists(cwd)  # removed afterwards
    assert env in ("[]", "['LC_CTYPE']") and isolated == "1"
    assert run_python("open('f.txt', 'w').write('hi'); print(open('f.txt').read())") == "hi"
    assert "ZeroDivisionError" in run_python("1/0")


@pytest.mark.parametrize("code, match", [
    ("import socket; socket.socket()", "socket"),
    ("import urllib.request; urllib.request.urlopen('http://example.com')", "socket"),
    ("import subprocess; subprocess.run(['ls'])", "subprocess"),
    ("import os; os.system('ls')", "os.system"),
    ("import os; os.remove('/tmp')", "outside the temp folder"),
])
def test_python_tool_blocks_network_processes_and_outside_changes(code, match):
    out = run_python(code)
    assert "PermissionError" in out and match in out


def test_python_tool_cannot_write_outside_its_folder(tmp_path):
    target = tmp_path / "owned.txt"
    out = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert "PermissionError" in out and not target.exists()


def test_python_tool_limits_time_and_memory():
    assert run_python("while True: pass", PythonLimits(timeout=1.0, cpu_seconds=5)).startswith("error: timed out")
    assert "MemoryError" in run_python("x = bytearray(1 << 31)", PythonLimits(memory_mb=256))
    long = run_python("print('a' * 5000)", PythonLimits(max_output=100))
    assert len(long) < 200 and "more characters" in long


def test_run_tool_turns_failures_into_messages():
    assert run_tool({"name": "calculator", "arguments": {"expression": "2+3"}}) == "5"
    assert run_tool({"name": "calculator", "arguments": {"expression": "x"}}).startswith("error: calculator")
    assert run_tool({"name": "calculator", "arguments": {"expr": "1"}}).startswith("error: calculator: bad arguments")
    assert run_tool({"name": "search", "arguments": {}}).startswith("error: unknown tool 'search'")


class ScriptedEngine:
    """Stands in for Engine: replays scripted replies (text, stop) and records every prompt it is given,
    so the test can compare them with the chat template's rendering."""

    def __init__(self, tok, model_config, script):
        self.tokenizer, self.script, self.prompts = tok, list(script), []
        self.model = type("M", (), {"config": model_config})()

    def generate(self, prompts, max_new_tokens, stop_ids=None, **kw):
        self.prompts.append(list(prompts[0]))
        pieces, stop = self.script.pop(0)
        tokens = []
        for p in pieces:
            tokens += [self.tokenizer.special_id(p)] if p.startswith("<|") else self.tokenizer.encode(p)
        stop_id = self.tokenizer.special_id(stop)
        assert stop_id in stop_ids
        return [Completion(tokens, self.tokenizer.decode(tokens), "stop", stop_id)]


def test_tool_loop_feeds_results_back_exactly_as_the_template_renders_them():
    from lmforge.model import get_config

    tok = Tokenizer.byte_level()
    cfg = get_config("tiny", vocab_size=tok.vocab_size, block_size=512)
    call = '{"name": "calculator", "arguments": {"expression": "12 * 7"}}'
    engine = ScriptedEngine(tok, cfg, [
        (["Let me see.", "<|tool_call_start|>", call], "<|tool_call_end|>"),
        (["12 * 7 = 84."], "<|assistant_end|>"),
    ])
    user = [{"role": "user", "content": "What is 12 * 7?"}]
    r = generate_with_tools(engine, user, max_new_tokens=200)
    assert r.finish_reason == "stop" and r.text == "12 * 7 = 84." and r.tool_calls == 1 and r.failed_calls == 0
    assert r.messages == [
        {"role": "assistant", "content": "Let me see.",
         "tool_calls": [{"name": "calculator", "arguments": {"expression": "12 * 7"}}]},
        {"role": "tool", "content": "84"},
        {"role": "assistant", "content": "12 * 7 = 84."}]
    # What the model saw before its second turn is the template's rendering of the conversation so far.
    assert engine.prompts[0] == render_messages(tok, user)
    assert engine.prompts[1] == render_messages(tok, user + r.messages[:2])
    assert render_messages(tok, user) + r.tokens == render_messages(tok, user + r.messages, add_generation_prompt=False)


def test_tool_loop_reports_malformed_calls_to_the_model():
    from lmforge.model import get_config

    tok = Tokenizer.byte_level()
    cfg = get_config("tiny", vocab_size=tok.vocab_size, block_size=512)
    engine = ScriptedEngine(tok, cfg, [
        (["<|tool_call_start|>", '{"name": "calculator", "arguments": {'], "<|tool_call_end|>"),
        (["Sorry."], "<|assistant_end|>"),
    ])
    r = generate_with_tools(engine, [{"role": "user", "content": "1+1?"}], max_new_tokens=200)
    assert r.failed_calls == 1 and r.messages[1]["role"] == "tool"
    assert r.messages[1]["content"].startswith("error: malformed tool call")
    assert r.text == "Sorry." and r.finish_reason == "stop"


def test_tool_loop_with_a_real_engine_stops_at_its_budget():
    import torch

    from lmforge.engine import Engine
    from lmforge.model import GPT, get_config

    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=tok.vocab_size, block_size=128)).eval()
    r = generate_with_tools(Engine(model, tok), [{"role": "user", "content": "hi"}], max_new_tokens=5,
                            temperature=0.0)
    # an untrained model rambles: the reply is cut by the token budget, and says so
    assert r.finish_reason in ("length", "stop") and len(r.tokens) <= 5 + 1


class ScriptedBatchEngine:
    """Replays a script per conversation (keyed by the user's question), for batches: the round a row
    is in is the number of tool results already in its prompt."""

    def __init__(self, tok, model_config, scripts):
        self.tokenizer, self.scripts, self.batches = tok, scripts, []
        self.model = type("M", (), {"config": model_config})()

    def generate(self, prompts, max_new_tokens, stop_ids=None, **kw):
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            question = next(q for q in self.scripts if q in text)
            pieces, stop = self.scripts[question][p.count(self.tokenizer.special_id("<|tool_result_end|>"))]
            tokens = []
            for piece in pieces:
                tokens += [self.tokenizer.special_id(piece)] if piece.startswith("<|") else self.tokenizer.encode(piece)
            out.append(Completion(tokens, self.tokenizer.decode(tokens), "stop", self.tokenizer.special_id(stop)))
        return out


def test_batched_tool_loop_matches_one_at_a_time_and_marks_inserted_tokens():
    from lmforge.model import get_config
    from lmforge.posttrain.tools import generate_with_tools_batch

    tok = Tokenizer.byte_level()
    cfg = get_config("tiny", vocab_size=tok.vocab_size, block_size=512)
    call = '{"name": "calculator", "arguments": {"expression": "12 * 7"}}'
    scripts = {"What is 12 * 7?": [(["<|tool_call_start|>", call], "<|tool_call_end|>"),
                                   (["It is 84."], "<|assistant_end|>")],
               "Hello?": [(["Hi."], "<|assistant_end|>")],
               "Count to ten.": [(["one two three four five six"], "<|assistant_end|>")]}
    questions = list(scripts)
    prompts = [render_messages(tok, [{"role": "user", "content": q}]) for q in questions]
    engine = ScriptedBatchEngine(tok, cfg, scripts)
    batch = generate_with_tools_batch(engine, prompts, max_new_tokens=80)
    assert engine.batches == [3, 1]  # the second round runs only the row that called a tool
    for q, r in zip(questions, batch):
        single = generate_with_tools(ScriptedBatchEngine(tok, cfg, scripts), [{"role": "user", "content": q}],
                                     max_new_tokens=80)
        assert (r.messages, r.text, r.finish_reason, r.tokens) == (single.messages, single.text,
                                                                  single.finish_reason, single.tokens)
    calc, hello, count = batch
    assert calc.text == "It is 84." and calc.tool_calls == 1 and hello.text == "Hi." and hello.tool_calls == 0
    assert hello.action_mask == [1] * len(hello.tokens)
    # Inserted by the loop (not the model's choices): the forced end of turn after the call and the
    # tool block; everything else, the call and both ends of turn included, is the model's.
    inserted = [t for t, a in zip(calc.tokens, calc.action_mask) if not a]
    sid = tok.special_id
    assert inserted == [sid("<|assistant_end|>"), sid("<|tool_result_start|>"), *tok.encode("84"),
                        sid("<|tool_result_end|>"), sid("<|assistant_start|>")]
    chosen = [t for t, a in zip(calc.tokens, calc.action_mask) if a]
    assert chosen == [sid("<|tool_call_start|>"), *tok.encode(call), sid("<|tool_call_end|>"),
                      *tok.encode("It is 84."), sid("<|assistant_end|>")]
    # A row's own budget holds even when the round's is larger (a longer row shares the batch).
    cut = generate_with_tools_batch(ScriptedBatchEngine(tok, cfg, scripts), prompts, max_new_tokens=10)
    assert cut[2].finish_reason == "length" and len(cut[2].tokens) == 10 and cut[1].finish_reason == "stop"
