"""Run model-written Python inside an operating-system sandbox (Linux namespaces + seccomp + rlimits).

`run_sandboxed(code, limits)` starts lmforge/inference/sandbox_child.py with the base interpreter
(not the project's virtual environment) in its own session, feeds it the snippet, reads its
stdout and stderr in chunks up to a byte cap, and kills the whole process group when the cap or
the wall-clock timeout is passed. The child builds the sandbox around itself before the snippet
runs (see that file for the steps); when any layer cannot be built it refuses and this raises
SandboxUnavailable: model-written code never runs unsandboxed. The threat model is in
docs/posttraining.md ("Tools").
"""
from __future__ import annotations

import functools
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError

CHILD = Path(__file__).with_name("sandbox_child.py")
# The child's first bytes on stdout once the sandbox stands (sandbox_child.READY; that module is
# not imported here: it needs Linux-only modules, and this one must import everywhere to refuse).
READY = b"\0lmforge-sandbox-ready\n"
CHUNK = 1 << 16


class SandboxUnavailable(LmforgeError):
    """The sandbox cannot be built on this machine, so the snippet was not run. Unlike a failing
    snippet (whose error goes back to the model) this stops the caller."""


@dataclass
class PythonLimits:
    timeout: float = 5.0  # wall-clock seconds, interpreter start included
    cpu_seconds: int = 5  # RLIMIT_CPU
    memory_mb: int = 512  # address space (RLIMIT_AS)
    file_mb: int = 16  # largest file the snippet may write (RLIMIT_FSIZE)
    folder_mb: int = 64  # size of the snippet's working folder (a tmpfs inside the sandbox)
    open_files: int = 64
    max_output: int = 2000  # characters of output returned to the model
    max_output_bytes: int = 1 << 20  # bytes read from the snippet before it is stopped


@dataclass
class SandboxResult:
    stdout: bytes
    stderr: bytes
    returncode: int | None
    timed_out: bool = False
    output_cut: bool = False  # more than max_output_bytes: the snippet was stopped


def _interpreter() -> str:
    """The base installation's interpreter: the sandbox exposes that installation, not the venv
    (which lives in the project folder)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the sandboxed child (same group)
    except ProcessLookupError:
        pass


def run_sandboxed(code: str, limits: PythonLimits) -> SandboxResult:
    if sys.platform != "linux":
        raise SandboxUnavailable(f"python tool: the sandbox needs Linux (namespaces and seccomp), this is "
                                 f"{sys.platform}; refusing to run model-written code unsandboxed")
    with tempfile.TemporaryDirectory(prefix="lmforge-py-") as tmp:
        # `tmp` is only a mount point: inside the sandbox it holds the new root, and the snippet's
        # working folder (a tmpfs) appears at the path `tmp` itself.
        config = {"root": tmp, "work": tmp, "cpu_seconds": int(limits.cpu_seconds),
                  "memory_mb": int(limits.memory_mb), "file_mb": int(limits.file_mb),
                  "folder_mb": int(limits.folder_mb), "open_files": int(limits.open_files)}
        proc = subprocess.Popen([_interpreter(), "-I", "-S", str(CHILD), json.dumps(config)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=tmp,
                                start_new_session=True)
        try:
            return _communicate(proc, code.encode("utf-8", "surrogatepass"), limits)
        finally:
            if proc.returncode is None:  # interrupted (KeyboardInterrupt...): nothing of it outlives the call
                _kill_group(proc)
                proc.wait()


def _communicate(proc: subprocess.Popen, code: bytes, limits: PythonLimits) -> SandboxResult:
    deadline = time.monotonic() + limits.timeout
    try:
        proc.stdin.write(code)  # the child reads all of it before doing anything else
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    cap = limits.max_output_bytes + len(READY)
    timed_out = output_cut = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                buffers[key.fd] += chunk
            if sum(map(len, buffers.values())) > cap:
                output_cut = True
                break
        if timed_out or output_cut:
            _kill_group(proc)
            # Read (and drop) until every writer is gone: EOF on both pipes means the sandboxed
            # child has exited too, not only the launcher we can wait for.
            end = time.monotonic() + 5
            while selector.get_map() and time.monotonic() < end:
                for key, _ in selector.select(end - time.monotonic()):
                    if not os.read(key.fd, CHUNK):
                        selector.unregister(key.fd)
    try:
        returncode = proc.wait(max(deadline - time.monotonic(), 0.05))
    except subprocess.TimeoutExpired:  # closed its output but kept running
        _kill_group(proc)
        returncode, timed_out = proc.wait(), True
    proc.stdout.close()
    proc.stderr.close()
    stdout, stderr = bytes(buffers[out_fd]), bytes(buffers[err_fd])
    if not stdout.startswith(READY):
        if timed_out and READY.startswith(stdout):  # still starting when the time ran out
            return SandboxResult(b"", stderr, returncode, timed_out=True)
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1].removeprefix("sandbox: ") if lines else f"the launcher exited with status {returncode}"
        raise SandboxUnavailable(f"python tool: cannot sandbox the snippet, so it was not run: {reason}")
    return SandboxResult(stdout[len(READY):], stderr, returncode, timed_out, output_cut)


@functools.cache
def sandbox_problem() -> str | None:
    """None when the sandbox can be built on this machine, else the one-line reason it cannot
    (probed once per process by running an empty snippet)."""
    try:
        run_sandboxed("pass", PythonLimits())
    except SandboxUnavailable as e:
        return str(e)
    return None


__all__ = ["PythonLimits", "SandboxResult", "SandboxUnavailable", "run_sandboxed", "sandbox_problem"]
