"""Conversation datasets: read, convert and validate chat data for supervised fine-tuning.

The one format lmforge trains on is a list of OpenAI-shaped messages (see lmforge/chat.py); a file
of them is JSONL with one `{"messages": [...]}` object per line. Loaders convert the other common
shapes record by record:
  * `{"messages": [...]}`                               OpenAI / lmforge
  * `{"instruction", "input"?, "output", "system"?}`    Alpaca
  * `{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}]}`
                                                         ShareGPT / FastChat / LLaMA-Factory

A source spec (`load_source`) is one of
  path.jsonl | path.json         a local file (JSON lines, or a JSON array / one object per line)
  hf:NAME[:CONFIG][@SPLIT]       a Hugging Face dataset (needs network and the `datasets` package)
  synthetic:TASK[:N]             N generated worked examples (lmforge.posttrain.synthetic), default 2000
  safety                         lmforge's refusal / helpful look-alike set (lmforge.posttrain.safety)

A malformed record is an error naming its file and line, unless skipping is asked for; skipped
records are counted and reported, never dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.chat import validate_messages
from lmforge.common import LmforgeError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def summary(self) -> str:
        s = f"{self.source}: {self.loaded} conversations"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
        return s


def record_to_messages(rec) -> list[dict]:
    """One record of any supported shape -> a validated list of messages."""
    if not isinstance(rec, dict):
        raise LmforgeError(f"expected a JSON object, got {type(rec).__name__}")
    rec = {k: v for k, v in rec.items() if v is not None}  # table-backed datasets fill absent columns with None
    if "messages" in rec:
        msgs = rec["messages"]
    elif "conversations" in rec:
        msgs = _from_sharegpt(rec["conversations"])
        if rec.get("system"):
            msgs = [{"role": "system", "content": rec["system"]}] + msgs
    elif "instruction" in rec and "output" in rec:
        msgs = _from_alpaca(rec)
    else:
        raise LmforgeError(f"unknown record shape (keys {sorted(rec)[:6]}); expected 'messages', "
                           "'conversations' or 'instruction'/'output'")
    validate_messages(msgs)
    if not any(m["role"] == "assistant" for m in msgs):
        raise LmforgeError("conversation has no assistant message (nothing to learn from)")
    return msgs


def _from_alpaca(rec: dict) -> list[dict]:
    for k in ("instruction", "output"):
        if not isinstance(rec[k], str):
            raise LmforgeError(f"alpaca field {k!r} must be text")
    user = rec["instruction"].strip()
    extra = rec.get("input") or ""
    if not isinstance(extra, str):
        raise LmforgeError("alpaca field 'input' must be text")
    if extra.strip():
        user = f"{user}\n\n{extra.strip()}"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    if rec.get("system"):
        msgs.insert(0, {"role": "system", "content": rec["system"]})
    return msgs


def _from_sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list):
        raise LmforgeError("'conversations' must be a list of turns")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise LmforgeError(f"turn {i} must be {{'from': one of {sorted(SHAREGPT_ROLES)}, 'value': text}}")
        if t["from"] == "function_call":  # LLaMA-Factory: the value is the call's JSON
            from lmforge.chat import parse_tool_call

            msgs.append({"role": "assistant", "content": None, "tool_calls": [parse_tool_call(t["value"])]})
        else:
            msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return msgs


def _records_from_file(path: Path):
    """(where, record) pairs from a .jsonl file or a .json array; JSON errors are raised naming the line."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, rec in enumerate(data):
            yield f"{path} record {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", LmforgeError(f"invalid JSON: {e.msg}")
            continue
        yield f"{path}:{lineno}", rec


def convert_each(records, convert, *, skip_invalid: bool) -> tuple[list, list[tuple[str, str]]]:
    """(converted, skipped [(where, why)]) from (where, record) pairs: the first bad record (or a
    reading error passed along as a record) is an error naming its place, unless skip_invalid,
    when it is counted instead. Conversations and preference pairs both load through this."""
    out, skipped = [], []
    for where, rec in records:
        try:
            if isinstance(rec, LmforgeError):
                raise rec
            out.append(convert(rec))
        except LmforgeError as e:
            if not skip_invalid:
                raise LmforgeError(f"{where}: {e} (pass --skip-invalid to skip and count such records)") from None
            skipped.append((where, str(e)))
    return out, skipped


def load_records(records, source: str, *, skip_invalid: bool = False) -> tuple[list[list[dict]], LoadReport]:
    """Convert (where, record) pairs; raise on the first bad one, or skip and count them."""
    report = LoadReport(source)
    out, report.skipped = convert_each(records, record_to_messages, skip_invalid=skip_invalid)
    report.loaded = len(out)
    if not out:
        raise LmforgeError(f"{source}: no usable conversations" +
                           (f" ({len(report.skipped)} skipped, first: {report.skipped[0][1]})"
                            if report.skipped else ""))
    return out, report


def load_file(path: str | Path, *, skip_invalid: bool = False):
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"conversation file not found: {path}")
    return load_records(_records_from_file(path), str(path), skip_invalid=skip_invalid)


def load_hf(spec: str, *, skip_invalid: bool = False):
    """`NAME[:CONFIG][@SPLIT]` from the Hugging Face hub (split default 'train')."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise LmforgeError("hf: sources need the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # network, unknown name, bad split: one clear line
        raise LmforgeError(f"cannot load Hugging Face dataset {spec!r}: {type(e).__name__}: {e}") from None
    return load_records(((f"hf:{spec} row {i}", rec) for i, rec in enumerate(ds)), f"hf:{spec}",
                        skip_invalid=skip_invalid)


def load_source(spec: str, *, skip_invalid: bool = False, seed: int = 0, tools: bool = True):
    """Conversations of one source spec (see the module docstring) and a LoadReport."""
    if spec.startswith("hf:"):
        return load_hf(spec[3:], skip_invalid=skip_invalid)
    if spec.startswith("synthetic:"):
        from lmforge.posttrain.synthetic import generate_conversations, parse_synthetic_spec

        task, n = parse_synthetic_spec(spec)
        recs = generate_conversations(task, n, seed=seed, tools=tools)
        return load_records(((f"{spec} #{i}", r) for i, r in enumerate(recs)), spec)
    if spec == "safety":
        from lmforge.posttrain.safety import safety_conversations

        recs = safety_conversations("train")
        return load_records(((f"safety #{i}", r) for i, r in enumerate(recs)), spec)
    return load_file(spec, skip_invalid=skip_invalid)


def parse_mixture(specs: list[str]) -> list[tuple[str, float]]:
    """`SOURCE` or `SOURCE*WEIGHT` strings -> (source, weight) pairs."""
    out = []
    for s in specs:
        src, star, w = s.rpartition("*") if "*" in s else (s, "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise LmforgeError(f"--data {s!r}: the weight after '*' must be a number") from None
        if not weight > 0:
            raise LmforgeError(f"--data {s!r}: the weight must be positive")
        out.append((src, weight))
    if not out:
        raise LmforgeError("give at least one --data source")
    return out


def write_jsonl(path: str | Path, conversations) -> Path:
    """Write conversations (lists of messages, or {"messages": ...} records) as lmforge JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in conversations:
            rec = c if isinstance(c, dict) else {"messages": c}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
