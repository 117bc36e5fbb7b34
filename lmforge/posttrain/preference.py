"""Preference data: reading, converting and tokenising preference pairs.

A preference pair is a prompt (a conversation that ends with the user's turn) and two assistant
replies, one preferred (`chosen`) over the other (`rejected`). Loaders convert the common shapes
record by record:
  * `{"prompt", "chosen", "rejected"}`      prompt as text or as a message list; replies as text,
                                             a message list ending with the reply, or a ShareGPT turn
  * `{"chosen", "rejected"}`                 Anthropic HH: two full transcripts
                                             "\\n\\nHuman: ...\\n\\nAssistant: ..." that share all but
                                             the last assistant turn
  * `{"conversations", "chosen", "rejected"}`  LLaMA-Factory / ShareGPT preference records

A source spec (`load_preferences`) is a local .jsonl / .jsonl.gz / .json file,
`hf:NAME[:CONFIG][@SPLIT]` (a Hugging Face preference dataset, needs network) or
`synthetic:TASK[:N]`: N pairs from a synthetic task (lmforge.posttrain.synthetic) whose chosen reply
gives the right answer and whose rejected reply is the same text with a wrong number.

Pairs are tokenised by `encode_pairs`; their padded batches and log-probabilities come from
batches.py.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.chat import render_messages, validate_messages
from lmforge.common import LmforgeError


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages, the last one the user's
    chosen: str
    rejected: str


# ----------------------------------------------------------------------------- parsing

HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    if not isinstance(text, str):
        raise LmforgeError("an HH transcript must be text")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise LmforgeError("not an HH transcript: expected turns starting '\\n\\nHuman:' / '\\n\\nAssistant:'")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def _reply(value, where: str) -> tuple[list[dict] | None, str]:
    """(messages before the reply or None, the reply text) of a chosen/rejected field."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict) and isinstance(value.get("value"), str):  # a ShareGPT turn
        return None, value["value"]
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # one message
        return None, value["content"]
    if isinstance(value, list) and value:
        msgs = validate_messages(value)
        if msgs[-1]["role"] != "assistant":
            raise LmforgeError(f"{where}: the message list must end with the assistant's reply")
        return (msgs[:-1] or None), msgs[-1]["content"] or ""
    raise LmforgeError(f"{where} must be text, a message list or a {{'from', 'value'}} turn")


def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return validate_messages(value)


def record_to_pair(rec) -> PreferencePair:
    """One record of any supported shape (see the module docstring) -> a PreferencePair."""
    if not isinstance(rec, dict):
        raise LmforgeError(f"expected a JSON object, got {type(rec).__name__}")
    if "chosen" not in rec or "rejected" not in rec:
        raise LmforgeError(f"a preference record needs 'chosen' and 'rejected' (keys {sorted(rec)[:6]})")
    if "prompt" not in rec and "conversations" not in rec and isinstance(rec["chosen"], str):
        # Anthropic HH: two transcripts sharing everything but the last assistant turn.
        c, r = parse_hh_transcript(rec["chosen"]), parse_hh_transcript(rec["rejected"])
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise LmforgeError("HH transcripts must end with an assistant turn")
        if c[:-1] != r[:-1]:
            raise LmforgeError("HH chosen and rejected transcripts differ before the last assistant turn")
        return PreferencePair(c[:-1], c[-1]["content"], r[-1]["content"])
    c_prefix, chosen = _reply(rec["chosen"], "chosen")
    r_prefix, rejected = _reply(rec["rejected"], "rejected")
    if "prompt" in rec:
        prompt = _prompt(rec["prompt"])
        if c_prefix is not None and c_prefix != prompt and c_prefix[-len(prompt):] != prompt:
            raise LmforgeError("chosen messages do not continue the given prompt")
    elif "conversations" in rec:
        from lmforge.posttrain.conversations import _from_sharegpt

        prompt = _from_sharegpt(rec["conversations"])
        if rec.get("system"):
            prompt = [{"role": "system", "content": rec["system"]}] + prompt
    elif c_prefix is not None:
        prompt = c_prefix
    else:
        raise LmforgeError("no prompt: give 'prompt', 'conversations', or chosen/rejected as message lists")
    if c_prefix is not None and r_prefix is not None and c_prefix != r_prefix:
        raise LmforgeError("chosen and rejected message lists differ before the reply")
    validate_messages(prompt)
    if prompt[-1]["role"] != "user":
        raise LmforgeError("the prompt must end with the user's turn")
    if not chosen.strip() or not rejected.strip():
        raise LmforgeError("chosen and rejected replies must be non-empty")
    return PreferencePair(prompt, chosen, rejected)


def _records(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield from ((f"{path} record {i}", r) for i, r in enumerate(data))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", LmforgeError(f"invalid JSON: {e.msg}")


def convert_records(records, source: str, *, skip_invalid: bool = False) -> tuple[list[PreferencePair], list]:
    """(pairs, skipped [(where, why)]) from (where, record) pairs; the first bad record is an error
    unless skip_invalid, when it is counted instead."""
    from lmforge.posttrain.conversations import convert_each

    out, skipped = convert_each(records, record_to_pair, skip_invalid=skip_invalid)
    if not out:
        raise LmforgeError(f"{source}: no usable preference pairs" +
                           (f" ({len(skipped)} skipped, first: {skipped[0][1]})" if skipped else ""))
    return out, skipped


def synthetic_pairs(task_name: str, n: int, seed: int = 0) -> list[PreferencePair]:
    """Pairs whose chosen reply is the task's worked answer (no tools) and whose rejected reply is
    the same text with the final answer replaced by a wrong number: the preference is exactly
    "correct beats wrong", checkable and free."""
    from lmforge.posttrain.synthetic import get_task

    if task_name not in ("arithmetic", "letters"):
        raise LmforgeError(f"synthetic preference pairs exist for arithmetic and letters, not {task_name!r}")
    task = get_task(task_name)
    rng = random.Random(f"pref-{task_name}-{seed}")
    out = []
    for _ in range(n):
        p = task.problem(rng)
        reply = task.solution(p, tools=False)[-1]["content"]
        right = int(p.answer)
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10] if task_name == "arithmetic" else [-1, 1, 2])
        if wrong < 0 and task_name == "letters":
            wrong = right + 1
        k = reply.rfind(p.answer)
        out.append(PreferencePair([{"role": "user", "content": p.prompt}], reply,
                                  reply[:k] + str(wrong) + reply[k + len(p.answer):]))
    return out


def load_preferences(spec: str, *, skip_invalid: bool = False, seed: int = 0) -> tuple[list[PreferencePair], str]:
    """Pairs of one source spec (see the module docstring) and a one-line summary."""
    if spec.startswith("synthetic:"):
        from lmforge.posttrain.synthetic import parse_synthetic_spec

        name, n = parse_synthetic_spec(spec)
        pairs = synthetic_pairs(name, n, seed)
        return pairs, f"{spec}: {len(pairs)} pairs"
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition("@")
        name, _, config = name.partition(":")
        try:
            import datasets

            ds = datasets.load_dataset(name, config or None, split=split or "train")
        except Exception as e:  # network, unknown name, bad split: one clear line
            raise LmforgeError(f"cannot load Hugging Face dataset {spec!r}: {type(e).__name__}: {e}") from None
        records = ((f"{spec} row {i}", {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(ds))
    else:
        path = Path(spec)
        if not path.is_file():
            raise LmforgeError(f"preference file not found: {path}")
        records = _records(path)
    pairs, skipped = convert_records(records, spec, skip_invalid=skip_invalid)
    summary = f"{spec}: {len(pairs)} pairs" + (f", {len(skipped)} skipped (first: {skipped[0][0]}: "
                                               f"{skipped[0][1]})" if skipped else "")
    return pairs, summary


# ----------------------------------------------------------------------------- tokens and batches


@dataclass
class EncodedPair:
    prompt: list[int]  # the rendered prompt, ending with <|assistant_start|>
    chosen: list[int]  # the reply's tokens and <|assistant_end|>
    rejected: list[int]


def encode_response(tok, text: str) -> list[int]:
    return tok.encode(text) + [tok.end_of_turn_id]


def fit_window(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Cut prompt + response to max_len tokens: the response keeps at most half the window (its
    tail is cut), the prompt keeps its most recent tokens. Returns (prompt, response, was_cut)."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    response = response[:max(max_len // 2, max_len - len(prompt))]
    return prompt[len(prompt) - (max_len - len(response)):], response, True


def encode_pairs(tok, pairs: list[PreferencePair], max_len: int) -> tuple[list[EncodedPair], int]:
    """Tokenise pairs to fit max_len tokens per sequence; returns (encoded, number cut to fit)."""
    out, cut = [], 0
    for p in pairs:
        prompt = render_messages(tok, p.prompt)
        pc, c, cut_c = fit_window(prompt, encode_response(tok, p.chosen), max_len)
        pr, r, cut_r = fit_window(prompt, encode_response(tok, p.rejected), max_len)
        cut += cut_c or cut_r
        # Both replies are scored after the same prompt tokens (the shorter cut of the two).
        k = min(len(pc), len(pr))
        out.append(EncodedPair(prompt[len(prompt) - k:], c, r))
    return out, cut


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    from lmforge.data.rows import split_heldout

    return split_heldout(pairs, fraction, seed)


def load_pair_sources(specs: list[str], val_specs: list[str], val_fraction: float, *, seed: int,
                      skip_invalid: bool, log=print) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and held-out pairs: the --val-data sources, or a seeded fraction of each source."""
    if not specs:
        raise LmforgeError("give at least one --data source of preference pairs")
    train, val = [], []
    for k, spec in enumerate(specs):
        pairs, summary = load_preferences(spec, skip_invalid=skip_invalid, seed=seed)
        tr, held = split_pairs(pairs, 0.0 if val_specs else val_fraction, seed + k)
        train += tr
        val += held
        log(f"data: {summary}; {len(tr)} train, {len(held)} held out")
    for spec in val_specs:
        pairs, summary = load_preferences(spec, skip_invalid=skip_invalid, seed=seed + 7919)
        val += pairs
        log(f"val data: {summary}")
    if not train:
        raise LmforgeError("no training pairs left after holding out the validation pairs")
    if not val:
        raise LmforgeError("no held-out pairs: set --val-fraction > 0 or give --val-data")
    return train, val
