"""Reading a number out of a model's reply, and deciding whether it is the expected one.

One rule for every place that grades a numeric answer — the synthetic tasks' checks (SFT
evaluation), the RL rewards and the GSM8K metric — so a reply that earns a reward is exactly a
reply that the metric counts as right:

  * the answer is the number after the marker ("####" in GSM8K solutions) when the reply has one,
    else the last number in the reply (lm-eval's "flexible extract");
  * thousands separators and a leading "$" are ignored ("$1,234" is 1234); "1,2,3" is three numbers;
  * a minus sign counts only where it cannot be subtraction ("3-2" is 3 and 2, "x = -2" is -2);
  * numbers compare by value: "18", "18.", "18.0" and "18.00" are the same answer, "2.50" is "2.5".
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: digits in comma-separated groups of three, or plain digits, with an optional fraction.
# The minus sign belongs to the number only where no word character or closing bracket stands
# right before it (else it is a subtraction).
NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
ANSWER_MARKER = "####"


def normalize_number(text: str) -> str | None:
    """The canonical spelling of a number ("-1234", "2.5"), or None when `text` is not one."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def numbers_in(text: str) -> list[str]:
    """Every number in the text, in order, as written."""
    return NUMBER.findall(text)


def extract_number(text: str, marker: str | None = ANSWER_MARKER) -> str | None:
    """The reply's answer, normalised: the first number after the last `marker` if the text has
    one, else the last number in the text, else None."""
    if marker and marker in text:
        after = numbers_in(text.rsplit(marker, 1)[1])
        if after:
            return normalize_number(after[0])
    found = numbers_in(text)
    return normalize_number(found[-1]) if found else None


def is_correct_number(reply: str, expected: str) -> bool:
    """Whether the reply's answer (see extract_number) equals the expected number by value."""
    want = normalize_number(str(expected))
    return want is not None and extract_number(reply) == want
