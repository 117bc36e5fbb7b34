"""Synthetic tasks with verifiable answers: post-training data that needs no download.

Each task draws problems from a `random.Random` and knows how to check an answer, so the same task
serves supervised fine-tuning (`conversation`: a worked example in the chat format), evaluation
(`sample` + `check` on held-out problems) and, later, reinforcement learning (`check` as the reward):

    task = TASKS["arithmetic"]()
    prompt, answer = task.sample(random.Random(0))      # "What is 417 + 86?", "503"
    task.check("417 + 86 = 503.", answer)                # True

Tasks:
  arithmetic  multi-digit + - *; the worked example calls the calculator tool (tools=True) or
              answers directly.
  letters     how many times a letter occurs in a word: the "strawberry" problem (a BPE model sees
              tokens, not letters). The worked example asks the python tool to count, or spells the
              word out letter by letter with a running count.
  identity    short questions about the model itself, with fixed answers naming it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from lmforge.answers import is_correct_number
from lmforge.common import LmforgeError

MODEL_NAME = "Forge"


def heldout_problems(task, name: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """The n held-out (prompt, answer) pairs every evaluation of task `name` draws — `lmforge
    synthetic eval`, SFT's and RL's evaluations — from one seed rule, so they score the same
    problems. `task` is anything with `sample(rng)` (a SyntheticTask or an RL prompt source)."""
    rng = random.Random(f"eval-{name}-{seed}")
    return [task.sample(rng) for _ in range(n)]


@dataclass
class Problem:
    prompt: str
    answer: str
    data: dict  # what the worked solution needs (operands, word, ...)


class SyntheticTask:
    """One kind of problem. Subclasses implement `problem` and `solution`."""

    name = "task"

    def problem(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def solution(self, p: Problem, tools: bool) -> list[dict]:
        """The assistant's side of a worked example (messages after the user's prompt)."""
        raise NotImplementedError

    def check(self, answer_text: str, expected: str) -> bool:
        """Whether the reply's answer is the expected number (lmforge.answers: the same rule as the
        GSM8K metric and every RL reward)."""
        return is_correct_number(answer_text, expected)

    def sample(self, rng: random.Random) -> tuple[str, str]:
        p = self.problem(rng)
        return p.prompt, p.answer

    def conversation(self, rng: random.Random, tools: bool = True) -> list[dict]:
        p = self.problem(rng)
        return [{"role": "user", "content": p.prompt}] + self.solution(p, tools)


def _call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


class ArithmeticTask(SyntheticTask):
    """a op b with 1..max_digits-digit operands, op in + - *."""

    name = "arithmetic"
    # The operands are written "a op b" everywhere, as in the tool call: copying them then means
    # copying the same tokens (BPE splits "4+896" and "4 + 896" differently).
    TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.",
                 "What's {a} {op} {b}?", "Please work out {a} {op} {b}.", "{a} {op} {b} = ?")

    def __init__(self, max_digits: int = 3, ops: str = "+-*"):
        if max_digits < 1 or not ops or set(ops) - set("+-*"):
            raise LmforgeError("arithmetic task: max_digits >= 1 and ops from '+-*'")
        self.max_digits, self.ops = max_digits, ops

    def problem(self, rng):
        def operand():
            digits = rng.randint(1, self.max_digits)
            return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

        a, b, op = operand(), operand(), rng.choice(self.ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = rng.choice(self.TEMPLATES).format(a=a, b=b, op=op)
        return Problem(prompt, str(value), {"expression": f"{a} {op} {b}"})

    def solution(self, p, tools):
        expr = p.data["expression"]
        if not tools:
            return [{"role": "assistant", "content": f"{expr} = {p.answer}."}]
        return [{"role": "assistant", "content": "", "tool_calls": [_call("calculator", expression=expr)]},
                {"role": "tool", "content": p.answer},
                {"role": "assistant", "content": f"The answer is {p.answer}."}]  # copies the tool's result


# Everyday words with repeated letters (and some without); "strawberry" is the famous one.
WORDS = """strawberry banana apple cherry raspberry blueberry mississippi committee bookkeeper balloon
coffee letter little bottle happiness success address necessary occurrence parallel millennium
possession tomorrow embarrass accommodate mammal pepper puppy kitten mirror carrot butter summer
winter rabbit giraffe hippopotamus elephant umbrella cinnamon broccoli spaghetti tennis soccer
assessment bubble cabbage daddy dinner dolphin eagle ferret goggles grass hello jelly kettle ladder
marshmallow noodle paddle pizza quarrel rubber scissors seesaw sheep street teeth toffee tattoo
valley waffle yellow zucchini avocado pineapple orange lemon grape melon peach pear plum mango
papaya coconut window garden forest river mountain ocean island desert castle dragon princess
knight wizard potato tomato onion garlic pumpkin pepperoni cucumber lettuce chocolate vanilla
caramel sugar honey bread cheese butterfly caterpillar grasshopper mosquito squirrel raccoon
beaver otter penguin panda koala kangaroo cheetah leopard gorilla monkey turtle tortoise lizard
parrot pigeon sparrow swallow falcon wolf fox bear deer moose horse donkey camel llama alpaca
zebra lion tiger""".split()


class LetterCountTask(SyntheticTask):
    """How many times does a letter occur in a word (letters that occur, and some that do not)."""

    name = "letters"
    TEMPLATES = ("How many times does the letter '{c}' appear in '{w}'?", "How many {c}'s are in {w}?",
                 "Count the letter {c} in the word {w}.", "How many '{c}' are there in \"{w}\"?")

    def __init__(self, words: list[str] | None = None, split: str = "train"):
        if words is None:  # every fifth word is kept for evaluation: unseen words test counting, not recall
            words = [w for i, w in enumerate(WORDS) if (i % 5 == 4) == (split == "test")]
        self.words = list(words)

    def problem(self, rng):
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        prompt = rng.choice(self.TEMPLATES).format(c=letter, w=word)
        return Problem(prompt, str(word.count(letter)), {"word": word, "letter": letter})

    def solution(self, p, tools):
        word, letter, n = p.data["word"], p.data["letter"], p.answer
        times = "time" if n == "1" else "times"
        if tools:
            code = f"print({word!r}.count({letter!r}))"
            return [{"role": "assistant", "content": "", "tool_calls": [_call("python", code=code)]},
                    {"role": "tool", "content": n},
                    {"role": "assistant", "content": f"The letter '{letter}' appears {n} {times} in '{word}'."}]
        count, spelled = 0, []
        for ch in word:  # one letter per step, with the running count: no need to "see" letters in a token
            if ch == letter:
                count += 1
                spelled.append(f"{ch}({count})")
            else:
                spelled.append(ch)
        return [{"role": "assistant",
                 "content": f"Spelling it out: {' '.join(spelled)}. "
                            f"The letter '{letter}' appears {n} {times} in '{word}'."}]


class IdentityTask(SyntheticTask):
    """Questions about the model; the expected answer is a word the reply must contain."""

    name = "identity"
    QA = [
        ("Who are you?", f"I am {MODEL_NAME}, a small language model trained with lmforge.", MODEL_NAME),
        ("What is your name?", f"My name is {MODEL_NAME}.", MODEL_NAME),
        ("What's your name?", f"My name is {MODEL_NAME}.", MODEL_NAME),
        ("Who made you?", "I was trained with lmforge, an open LLM stack, by the people who ran it.", "lmforge"),
        ("Who created you?", "I was trained with lmforge, an open LLM stack, by the people who ran it.", "lmforge"),
        ("What software trained you?", "lmforge: its tokenizer, pretraining and fine-tuning code.", "lmforge"),
        ("Are you ChatGPT?", f"No. I am {MODEL_NAME}, a small model trained with lmforge.", MODEL_NAME),
        ("Are you a human?", f"No, I am {MODEL_NAME}, a language model.", MODEL_NAME),
        ("What can you do?", "I can chat, do arithmetic with a calculator and count letters with python.",
         "calculator"),
        ("How big are you?", "I am a small model with a few million parameters.", "million"),
        ("Introduce yourself.", f"Hello! I am {MODEL_NAME}, a small language model trained with lmforge.",
         MODEL_NAME),
        ("Tell me about yourself.", f"I am {MODEL_NAME}, a small language model trained with lmforge.",
         MODEL_NAME),
    ]
    GREETINGS = ("", "Hi! ", "Hello. ", "Hey, ")

    def problem(self, rng):
        q, a, key = rng.choice(self.QA)
        return Problem(rng.choice(self.GREETINGS) + q, key, {"reply": a})

    def solution(self, p, tools):
        return [{"role": "assistant", "content": p.data["reply"]}]

    def check(self, answer_text, expected):
        return expected.lower() in answer_text.lower()


TASKS: dict[str, type[SyntheticTask]] = {t.name: t for t in (ArithmeticTask, LetterCountTask, IdentityTask)}


def get_task(name: str, split: str = "train") -> SyntheticTask:
    """A task by name. split="test" gives the held-out variant where one exists (letters: unseen words)."""
    if name not in TASKS:
        raise LmforgeError(f"unknown synthetic task {name!r}; choose from {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise LmforgeError(f"split must be train or test, got {split!r}")
    return TASKS[name](split=split) if name == "letters" else TASKS[name]()


def generate_conversations(task: str | SyntheticTask, n: int, seed: int = 0, tools: bool = True) -> list[dict]:
    """n worked examples as {"messages": [...]} records (the JSONL shape lmforge sft reads)."""
    task = get_task(task) if isinstance(task, str) else task
    rng = random.Random(f"{task.name}-{seed}")
    return [{"messages": task.conversation(rng, tools)} for _ in range(n)]


def parse_synthetic_spec(spec: str, default_n: int = 2000) -> tuple[str, int]:
    """`synthetic:TASK[:N]` -> (TASK, N), with a clear error for a bad count."""
    task, _, n = spec[len("synthetic:"):].partition(":")
    try:
        n = int(n) if n else default_n
    except ValueError:
        raise LmforgeError(f"{spec}: the count after the task name must be an integer") from None
    if n <= 0:
        raise LmforgeError(f"{spec}: the count must be positive")
    return task, n
