"""One answer checker: the RL reward, the synthetic-task check and the GSM8K metric agree."""
from __future__ import annotations

import json
import random

import pytest

from lmforge.answers import extract_number, is_correct_number, normalize_number, numbers_in

# (reply, expected answer, right?) — the replies a grader most easily gets wrong.
TRICKY = [
    ("The answer is 18.", "18", True),
    ("The answer is 18.00.", "18", True),
    ("It costs $18.", "18", True),
    ("It costs $1,234.00 in total.", "1234", True),
    ("1,234", "1,234", True),
    ("2.50 liters", "2.5", True),
    ("2.5", "25", False),
    ("3 - 2 = 1", "1", True),
    ("3-2", "-2", False),  # a subtraction, not minus two
    ("The temperature is -7 degrees.", "-7", True),
    ("x = -2", "-2", True),
    ("She counted 1,2,3", "123", False),  # a list, not one thousands-separated number
    ("First 12, then 40, so 52.", "52", True),
    ("So the answer is 52. Double-check: 50 + 2.", "52", False),  # the last number is the answer
    ("Work: 6 * 7 = 42\n#### 42\nQuestion: next one, 99", "42", True),  # the marker wins
    ("#### 1,000", "1000", True),
    ("I don't know.", "5", False),
    ("", "0", False),
]


@pytest.mark.parametrize("reply,expected,right", TRICKY)
def test_reward_check_and_metric_agree(reply, expected, right, tmp_path):
    from lmforge.eval.generative import score_gsm8k_reply
    from lmforge.posttrain.synthetic import get_task
    from lmforge.posttrain.verifiable import prompt_source

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "How many?", "answer": f"Work.\n#### {expected}"}) + "\n")
    source = prompt_source(f"gsm8k:{gsm}", "test")
    _, gold = source.sample(random.Random(0))
    verdicts = {
        "synthetic task check (SFT eval, RL reward)": get_task("arithmetic").check(reply, expected),
        "GSM8K RL reward": source.check(reply, gold),
        "GSM8K metric": score_gsm8k_reply(reply, f"Work.\n#### {expected}"),
        "answers.is_correct_number": is_correct_number(reply, expected),
    }
    assert verdicts == {k: right for k in verdicts}, reply


def test_normalize_and_extract():
    assert normalize_number("1,000.") == "1000" and normalize_number("-0.50") == "-0.5"
    assert normalize_number("abc") is None and normalize_number("nan") is None
    assert numbers_in("3-2=1, x = -4") == ["3", "2", "1", "-4"]
    assert extract_number("no numbers here") is None
