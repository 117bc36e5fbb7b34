"""Where pretraining documents come from.

`iter_documents(spec)` turns a user-supplied source string into a stream of document texts:

- a file (.txt, .jsonl, .jsonl.gz, .json, .parquet), a folder (searched recursively for those
  files) or a glob such as `data/*.txt`;
- `"stdlib"` or None: the built-in default corpus, the Python standard library's own source code,
  which exists on every machine and needs no network;
- anything else: a Hugging Face dataset `name[:config][@split]`, streamed with `datasets`.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError, json_lines

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")
STDLIB_SPEC = "stdlib"

# Books in our plain-text corpora are separated by two (or more) blank lines.
TXT_DOC_SEPARATOR = re.compile(r"\n\s*\n\s*\n")

# Standard-library folders that hold test suites (lots of odd encodings and fixtures, not
# representative code) or third-party packages.
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

_TXT_CHUNK_CHARS = 4 << 20  # read big .txt files in 4M-character chunks
_PARQUET_BATCH_ROWS = 1024


@dataclass
class SourceStats:
    """Counters filled in while a document stream is consumed (pass one to `iter_documents`)."""

    documents: int = 0  # non-empty documents yielded
    chars: int = 0  # characters yielded (after max_chars truncation)
    empty_skipped: int = 0  # empty / whitespace-only documents that were dropped


def iter_documents(
    spec: str | os.PathLike | None,
    text_field: str = "text",
    max_chars: int | None = None,
    max_docs: int | None = None,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Yield the non-empty documents of `spec` (see the module docstring for what spec may be).

    The source is resolved immediately, so a missing path or an empty glob raises LmforgeError at
    the call, not at the first `next()`. `max_docs`/`max_chars` stop early; the document that
    crosses `max_chars` is cut at that point. A source without any non-empty document raises
    LmforgeError once exhausted."""
    if max_chars is not None and max_chars < 1:
        raise LmforgeError(f"max_chars must be a positive number, got {max_chars}")
    if max_docs is not None and max_docs < 1:
        raise LmforgeError(f"max_docs must be a positive number, got {max_docs}")
    if not text_field:
        raise LmforgeError("text_field must be a non-empty column/field name")
    raw, description = _resolve(spec, text_field)
    return _limit(raw, description, max_chars, max_docs, stats if stats is not None else SourceStats())


def describe_source(spec: str | os.PathLike | None) -> str:
    """A short human-readable description of a source spec (for logs and manifests)."""
    if spec is None or str(spec) == STDLIB_SPEC:
        return f"Python {sysconfig.get_python_version()} standard library source (built-in default corpus)"
    return str(spec)


def _limit(docs: Iterable[str], description: str, max_chars, max_docs, stats: SourceStats) -> Iterator[str]:
    for text in docs:
        if not text or text.isspace():
            stats.empty_skipped += 1
            continue
        if max_chars is not None and stats.chars + len(text) > max_chars:
            text = text[: max_chars - stats.chars]
        stats.documents += 1
        stats.chars += len(text)
        yield text
        if (max_docs is not None and stats.documents >= max_docs) or (
            max_chars is not None and stats.chars >= max_chars
        ):
            return
    if stats.documents == 0:
        raise LmforgeError(f"{description} contains no non-empty documents")


# ---------------------------------------------------------------------------------------------
# Resolving a spec


def _resolve(spec, text_field: str) -> tuple[Iterator[str], str]:
    """Return (lazy document iterator, description) after checking that the source exists."""
    if spec is None or str(spec) == STDLIB_SPEC:
        files = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        return _iter_stdlib(root, files), describe_source(None)

    text = os.path.expanduser(str(spec))
    if not text.strip():
        raise LmforgeError("empty data source; give a file, folder, glob, dataset name or 'stdlib'")
    path = Path(text)
    if path.is_file():
        _check_supported(path)
        return _iter_files([path], text_field), f"file {path}"
    if path.is_dir():
        files = _files_in_folder(path)
        if not files:
            raise LmforgeError(
                f"folder {path} contains no supported files ({', '.join(SUPPORTED_SUFFIXES)})"
            )
        return _iter_files(files, text_field), f"folder {path}"
    if any(c in text for c in "*?["):  # glob pattern
        files = _files_from_glob(text)
        if not files:
            raise LmforgeError(f"glob {text!r} matches no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
        return _iter_files(files, text_field), f"glob {text!r}"
    if _looks_like_path(text):
        raise LmforgeError(f"no such file or folder: {text}")
    name, config, split = parse_hf_spec(text)
    try:
        docs = iter_hf_dataset(name, config, split=split, text_field=text_field)
    except LmforgeError as e:
        raise LmforgeError(f"{text} is not a local file and could not load Hugging Face dataset {name}: {e}") from None
    return docs, f"Hugging Face dataset {text}"


def _looks_like_path(text: str) -> bool:
    """Hugging Face names look like `name` or `owner/name` (plus `:config@split`); anything with
    a file suffix, a leading ./ ~ /, a backslash or several slashes was meant as a local path."""
    bare = text.split("@", 1)[0]
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or bare.count("/") > 1
        or text.lower().endswith(SUPPORTED_SUFFIXES)
        or text.lower().endswith((".gz", ".csv", ".md"))
    )


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _check_supported(path: Path) -> None:
    if not _suffix_ok(path):
        raise LmforgeError(
            f"unsupported file type: {path} (expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )


def _files_in_folder(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .ipynb_checkpoints, ...) are never corpus data.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and _suffix_ok(p):
                found.append(p)
    # Sort by relative path so the document order (and thus the shards) is reproducible.
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _files_from_glob(pattern: str) -> list[Path]:
    files: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        p = Path(match)
        if p.is_dir():
            files.extend(_files_in_folder(p))
        elif p.is_file() and _suffix_ok(p):
            files.append(p)
    return files


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        yield from iter_file(path, text_field)


# ---------------------------------------------------------------------------------------------
# File formats


def iter_file(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Documents of one supported file (may include empty ones; `iter_documents` drops those)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".txt"):
        return _iter_txt(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _iter_jsonl(path, text_field)
    if name.endswith(".json"):
        return _iter_json(path, text_field)
    if name.endswith(".parquet"):
        return _iter_parquet(path, text_field)
    _check_supported(path)
    raise AssertionError("unreachable")


def _iter_txt(path: Path) -> Iterator[str]:
    """Split a text file at runs of two or more blank lines (a UTF-8 BOM is dropped), reading it in chunks so huge files
    never sit in memory whole. The result equals `TXT_DOC_SEPARATOR.split(whole_text)`."""
    parts: list[str] = []  # pieces of the document being read (ends with a non-space char)
    tail = ""  # trailing whitespace that may still grow into (or be part of) a separator
    try:
        with open(path, encoding="utf-8-sig") as f:
            while True:
                chunk = f.read(_TXT_CHUNK_CHARS)
                buf = tail + chunk
                # A separator is pure whitespace, so it cannot reach back past the last
                # non-space character; but one touching the end of the buffer may continue
                # (greedily) in the next chunk, so only split up to the last non-space char.
                body = buf.rstrip() if chunk else buf
                if body:
                    pieces = TXT_DOC_SEPARATOR.split(body)
                    parts.append(pieces[0])
                    if len(pieces) > 1:
                        yield "".join(parts)
                        yield from pieces[1:-1]
                        parts = [pieces[-1]]
                tail = buf[len(body):]
                if not chunk:
                    yield "".join(parts)
                    return
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not valid UTF-8 text: {e}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None


def _doc_from_record(record, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:10])) or "none"
        raise LmforgeError(f"{where}: no {text_field!r} field (fields: {keys}); set the text field option")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            for lineno, record in json_lines(f, path):
                yield _doc_from_record(record, text_field, f"{path}:{lineno}")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not valid UTF-8: {e}") from None
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated .gz files
        raise LmforgeError(f"cannot read {path}: {e}") from None


def _iter_json(path: Path, text_field: str) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    if not isinstance(data, list):
        raise LmforgeError(f"{path}: expected a JSON list of objects or strings, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield _doc_from_record(record, text_field, f"{path}: item {i}")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LmforgeError(f"cannot read parquet file {path}: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise LmforgeError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set the text field option")
    col_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise LmforgeError(f"{path}: column {text_field!r} has type {col_type}, not string")
    # iter_batches reads one row group at a time, so huge files are never loaded whole.
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield value or ""


# ---------------------------------------------------------------------------------------------
# Built-in default corpus: the standard library


def stdlib_files() -> list[Path]:
    """Relative paths of the standard library's .py files that make up the default corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise LmforgeError(f"the Python standard library folder {root} does not exist; give a data source")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                files.append((Path(dirpath) / name).relative_to(root))
    if not files:
        raise LmforgeError(f"no .py files found in the standard library folder {root}")
    return sorted(files, key=lambda p: p.as_posix())


def _iter_stdlib(root: Path, files: list[Path]) -> Iterator[str]:
    for rel in files:
        # A few stdlib files could be in another encoding on some builds; never fail on them.
        yield (root / rel).read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`name[:config][@split]` -> (name, config or None, split; default "train")."""
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise LmforgeError(f"not a valid Hugging Face dataset name: {spec!r}")
    return name, (config or None), (split or "train")


def iter_hf_dataset(
    name_or_builder: str,
    config: str | None = None,
    *,
    split: str = "train",
    text_field: str = "text",
    data_files=None,
) -> Iterator[str]:
    """Stream the `text_field` column of a Hugging Face dataset (`datasets.load_dataset(...,
    streaming=True)`). `name_or_builder` may also be a packaged builder such as "json" or
    "parquet" together with `data_files`, which is how this is tested offline.

    Loading happens now (so a bad name fails at the call); rows are read lazily."""
    try:
        import datasets
    except ImportError:
        raise LmforgeError("the `datasets` package is needed to load Hugging Face datasets "
                           "(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name_or_builder, config, split=split, streaming=True, data_files=data_files)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        raise LmforgeError(_one_line(e)) from None
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise LmforgeError(f"dataset {name_or_builder} has no column {text_field!r} (columns: {', '.join(columns)})")
    return _iter_hf_rows(ds, name_or_builder, text_field)


def _iter_hf_rows(ds, name: str, text_field: str) -> Iterator[str]:
    try:
        for i, row in enumerate(ds):
            yield _doc_from_record(row, text_field, f"dataset {name}: row {i}")
    except LmforgeError:
        raise
    except Exception as e:  # a streaming dataset can fail mid-way (network, corrupt shard)
        raise LmforgeError(f"error while reading Hugging Face dataset {name}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
