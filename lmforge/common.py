"""Small shared helpers: the user-facing error type, atomic file writes, hashing, device and
distributed-run facts. Everything here is used by more than one pipeline stage."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path


def setting(default, help: str, *, check: str | None = None, choices: tuple | None = None,
            flag: str | None = None):
    """A configuration field declared once, with its default and help; the command-line option is
    derived from it (lmforge.cli.common.add_options), and so is the argv that re-enters the command
    line under torchrun. `check` names the rule a value must meet: "positive", "nonneg", "fraction"
    (in [0, 1)) or "seed" (fits in 64 bits). `flag` replaces the option's derived name."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "flag": flag})


class LmforgeError(Exception):
    """An error caused by the user's input (bad path, bad option, mismatched files).

    The CLI prints it as one line (`error: ...`) and exits with status 2, never a traceback."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never half of it:
    write a temp file in the same folder, fsync it, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file", *, fmt: str | None = None,
              version: int | None = None, hint: str = ""):
    """Read a JSON file, turning a missing or corrupt file into a clear LmforgeError. With `fmt`,
    the file must be an object whose "format" is fmt (and whose "version" is `version`, if given);
    `hint` is appended to a version mismatch message (e.g. how to regenerate the file)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{what} {path} is not valid JSON: {e}") from None
    if fmt is not None:
        if not isinstance(obj, dict) or obj.get("format") != fmt:
            raise LmforgeError(f"{path} is not an lmforge {what} (expected format {fmt!r})")
        if version is not None and obj.get("version") != version:
            raise LmforgeError(f"{path}: {what} format version {obj.get('version')!r} is not supported "
                               f"(this lmforge reads version {version}){hint}")
    return obj


def json_lines(lines, path) -> Iterator[tuple[int, object]]:
    """(line number, record) of each non-blank JSON line; a bad line is an error naming path:line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{lineno} is not valid JSON: {e}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) when not distributed."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local_rank, world


def is_main_process() -> bool:
    return dist_info()[0] == 0


def new_figure(figsize: tuple[float, float] = (7, 4.2)):
    """A matplotlib (figure, axes) drawn off-screen: plots work without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, png_path, *, legend: bool = True) -> Path:
    """Grid, legend, tight layout; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
