"""Problems with checkable answers, for RL and its evaluation: where prompts come from (a synthetic
task or a GSM8K-style file), how a reply is generated (through the tool loop or not) and checked,
and the held-out accuracy of a policy (greedy replies, exact match)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lmforge.answers import is_correct_number
from lmforge.common import LmforgeError
from lmforge.data.rows import ProcessShare
from lmforge.models.protocol import tokens_left
from lmforge.posttrain.synthetic import heldout_problems
from lmforge.train.distributed import all_reduce_sum


class PromptSource:
    """Problems with checkable answers: `sample(rng) -> (prompt, expected)`, `check(text, expected)`."""

    name = "prompts"

    def sample(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def check(self, text: str, expected: str) -> bool:
        raise NotImplementedError


class SyntheticSource(PromptSource):
    """A synthetic task by name; `arithmetic:D[:OPS]` narrows arithmetic to operands of at most D
    digits and the operators OPS (e.g. arithmetic:2:+-)."""

    def __init__(self, spec: str, split: str):
        from lmforge.posttrain.synthetic import ArithmeticTask, get_task

        name, _, rest = spec.partition(":")
        if name == "arithmetic" and rest:
            digits, _, ops = rest.partition(":")
            try:
                self.task = ArithmeticTask(max_digits=int(digits), ops=ops or "+-*")
            except ValueError:
                raise LmforgeError(f"{spec}: expected arithmetic:DIGITS[:OPS], e.g. arithmetic:2:+-") from None
        elif rest:
            raise LmforgeError(f"{spec}: only arithmetic takes options (arithmetic:DIGITS[:OPS])")
        else:
            self.task = get_task(name, split)
        self.name = spec

    def sample(self, rng):
        return self.task.sample(rng)

    def check(self, text, expected):
        return self.task.check(text, expected)


class GSM8KSource(PromptSource):
    """GSM8K-style JSONL ({"question", "answer"} with the final answer after '####'), read by the
    evaluation's reader; reward: the reply's answer equals it (lmforge.answers, as the metric)."""

    name = "gsm8k"

    def __init__(self, path: str):
        from lmforge.eval.tasks import read_gsm8k_file

        self.items = [(it.question, it.answer) for it in read_gsm8k_file(path)]

    def sample(self, rng):
        return rng.choice(self.items)

    def check(self, text, expected):
        return is_correct_number(text, expected)


def prompt_source(spec: str, split: str) -> PromptSource:
    """`TASK` (a synthetic task: arithmetic, letters, identity; arithmetic:DIGITS[:OPS]) or `gsm8k:PATH`."""
    if spec.startswith("gsm8k:"):
        return GSM8KSource(spec[len("gsm8k:"):])
    return SyntheticSource(spec, split)


@dataclass
class Reply:
    tokens: list[int]  # after the prompt, <|assistant_end|> included when the turn ended
    actions: list[int]  # 1 where the token is the policy's choice (0: a tool result inserted by the loop)
    text: str  # the final answer's text
    ended: bool  # the reply ended its turn with <|assistant_end|>


def generate_replies(engine, prompts: list[list[int]], max_new_tokens: int, *, tools: bool,
                     tool_names=None, **sampling) -> list[Reply]:
    """Replies to rendered chat prompts, with the tool loop (tools=True; the built-in tools named
    in tool_names, all when None) or without."""
    from lmforge.inference.tools import generate_with_tools_batch, select_tools

    if tools:
        return [Reply(r.tokens, r.action_mask, r.text, r.finish_reason == "stop")
                for r in generate_with_tools_batch(engine, prompts, max_new_tokens=max_new_tokens,
                                                   tools=select_tools(tool_names), **sampling)]
    end = engine.tokenizer.end_of_turn_id
    out = []
    for c in engine.generate(prompts, max_new_tokens, **sampling):
        ended = c.finish_reason == "stop" and c.stop == end
        tokens = list(c.tokens) + ([end] if ended else [])  # the end of turn is an action too
        out.append(Reply(tokens, [1] * len(tokens), c.text, ended))
    return out


@torch.no_grad()
def evaluate_policy(model, tok, tasks: list[str], n: int, *, max_new_tokens: int = 32, seed: int = 0,
                    device: str = "cpu", batch_size: int = 64, tools: bool = False,
                    tool_names=None) -> dict[str, float]:
    """Greedy replies (with the tool loop if tools) to n held-out problems per task, batched:
    exact-match accuracy (the reply must end its turn), per task and overall, and the mean reply
    length (the model's own tokens). The problems are the ones `lmforge synthetic eval` draws (same
    seeds)."""
    from lmforge.inference.engine import Engine

    engine = Engine(model, tok)
    dev = model.device.type
    # fp32 even inside the Trainer's bf16 evaluation: the same numbers as a standalone evaluation.
    with torch.autocast(dev, enabled=False):
        return _evaluate(engine, src_names=tasks, n=n, max_new_tokens=max_new_tokens, seed=seed, device=device,
                         batch_size=batch_size, tools=tools, tool_names=tool_names)


def _evaluate(engine, *, src_names, n, max_new_tokens, seed, device, batch_size, tools, tool_names):
    from lmforge.chat import render_messages

    tok, model = engine.tokenizer, engine.model
    out, correct_all, length_all, total = {}, 0.0, 0.0, 0
    for name in src_names:
        src = prompt_source(name, "test")
        problems = ProcessShare().items(heldout_problems(src, name, n, seed))
        correct = length = 0.0
        for k in range(0, len(problems), batch_size):
            chunk = problems[k:k + batch_size]
            prompts = [render_messages(tok, [{"role": "user", "content": q}]) for q, _ in chunk]
            budget = min(max_new_tokens, tokens_left(model, max(len(p) for p in prompts)))
            for (_, expected), r in zip(chunk, generate_replies(engine, prompts, max(budget, 1), tools=tools,
                                                                tool_names=tool_names, temperature=0.0)):
                correct += r.ended and src.check(r.text, expected)
                length += sum(r.actions) - r.ended
        correct, length, count = all_reduce_sum([correct, length, len(problems)], device)
        out[f"accuracy_{src.name}"] = correct / max(count, 1)
        correct_all, length_all, total = correct_all + correct, length_all + length, total + count
    out["accuracy"] = correct_all / max(total, 1)
    out["length"] = length_all / max(total, 1)
    return out
