"""Tools (calculator, sandboxed python) and the tool-using generation loop."""
import ast
import os
import random
import sys
import time

import pytest
from conftest import REPO

from lmforge.chat import render_messages
from lmforge.common import LmforgeError
from lmforge.inference.engine import Completion
from lmforge.inference.tools import PythonLimits, calculator, generate_with_tools, run_python, run_tool
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


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """run_python's temp folders go under this test's own folder, so the test can tell its processes
    (their command lines name the folder) and the folder's parent is a place it can watch."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_python_tool_runs_code_in_a_temp_folder_with_an_empty_environment(sandbox):
    assert run_python("print('strawberry'.count('r'))") == "3"
    out = run_python("import os, sys; print(os.getcwd()); print(sorted(os.environ)); print(sys.flags.isolated)")
    cwd, env, isolated = out.splitlines()
    assert os.path.basename(cwd).startswith("lmforge-py-") and not os.path.exists(cwd)  # removed afterwards
    assert env in ("[]", "['LC_CTYPE']") and isolated == "1"
    assert run_python("open('f.txt', 'w').write('hi'); print(open('f.txt').read())") == "hi"
    assert "ZeroDivisionError" in run_python("1/0")
    # threads, the standard library's C extensions and ctypes itself still work
    assert run_python("import threading, json, decimal, ctypes, sqlite3\n"
                      "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()") == "thread"


# Ways of starting a process from Python. Each prints "started-<way>" if a new process ran.
START_PROCESS = {
    "subprocess": "import subprocess, sys\n"
                  "subprocess.run([sys.executable, '-c', 'print(\"started-subprocess\")'])",
    "os.system": "import os, sys\n"
                 "if os.system(sys.executable + ' -c \"print(123)\" && echo started-os.system'):\n"
                 "    raise OSError('os.system failed')",
    "os.fork": "import os\nif os.fork() == 0:\n    print('started-os.fork', flush=True)\n    os._exit(0)\nos.wait()",
    "os.posix_spawn": "import os, sys\n"
                      "os.waitpid(os.posix_spawn(sys.executable, [sys.executable, '-c', "
                      "'print(\"started-os.posix_spawn\")'], {}), 0)",
    "multiprocessing": "import multiprocessing as mp\n"
                       "p = mp.get_context('fork').Process(target=print, args=('started-multiprocessing',))\n"
                       "p.start(); p.join()",
    # the audit hook of the old tool was this process's own state: replace what it relies on
    "audit bypass": "import subprocess, sys\nsys.audit = lambda *args: None\n"
                    "subprocess.run([sys.executable, '-c', 'print(\"started-audit bypass\")'])",
    "_posixsubprocess": """
import importlib, os, sys
ps = importlib.import_module('_posixsubprocess')
r, w = os.pipe()
args = [sys.executable.encode(), b'-c', b'print("started-_posixsubprocess")']
common = ([sys.executable.encode()], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False)
try:
    pid = ps.fork_exec(args, *common, -1, None, None, None, -1, None, False)  # Python 3.11+
except TypeError:
    pid = ps.fork_exec(args, *common, None, None, None, -1, None)  # 3.10
os.waitpid(pid, 0)
""",
    "ctypes fork": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\npid = libc.fork()\n"
                   "if pid == 0:\n    os.write(1, b'started-ctypes fork\\n'); os._exit(0)\n"
                   "if pid < 0: raise OSError(ctypes.get_errno(), 'fork failed')\nos.waitpid(pid, 0)",
    "ctypes execve": "import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                     "argv = (ctypes.c_char_p * 4)(sys.executable.encode(), b'-c',\n"
                     "                             b'print(\"started-ctypes execve\")', None)\n"
                     "libc.execv(sys.executable.encode(), argv)\nraise OSError(ctypes.get_errno(), 'execv failed')",
}


def test_python_tool_cannot_start_processes(sandbox):
    started = {}
    for way, code in START_PROCESS.items():
        out = run_python(code)
        if "started-" in out:
            started[way] = out
        else:  # it failed, and it failed because the system refused, not because the test is wrong
            assert "Error" in out, (way, out)
    assert not started, f"processes started by: {sorted(started)}"


def test_python_tool_cannot_write_outside_its_folder(sandbox, private_tmp):
    import sysconfig

    outside = private_tmp / "outside"  # a folder the snippet's user could write to, not its own
    outside.mkdir()
    stdlib_target = os.path.join(sysconfig.get_paths()["stdlib"], "lmforge-sandbox-test.txt")
    ways = {
        "open": f"open({str(outside / 'open')!r}, 'w').write('x')",
        "os.open with dir_fd": f"import os\nfd = os.open({str(outside)!r}, os.O_RDONLY)\n"
                               "os.write(os.open('dir_fd', os.O_CREAT | os.O_WRONLY, dir_fd=fd), b'x')",
        "pathlib": f"import pathlib\npathlib.Path({str(outside / 'pathlib')!r}).write_text('x')",
        "shutil": f"import shutil\nopen('mine', 'w').write('x')\nshutil.copy('mine', {str(outside / 'shutil')!r})",
        "guard replaced": "import sys\nsys.modules['__main__']._inside = lambda path: True\n"
                          f"open({str(outside / 'guard replaced')!r}, 'w').write('x')",
        "parent folder": "open('../parent folder', 'w').write('x')",
        "symlink": f"import os\nos.symlink({str(outside / 'symlink')!r}, 'link')\nopen('link', 'w').write('x')",
        "rename": f"import os\nopen('mine', 'w').write('x')\nos.rename('mine', {str(outside / 'rename')!r})",
        "ctypes open": f"import ctypes, os\nfd = ctypes.CDLL(None).open({str(outside / 'ctypes open')!r}.encode(), "
                       "os.O_CREAT | os.O_WRONLY, 0o644)\nif fd < 0: raise OSError('open failed')",
        "python installation": f"open({stdlib_target!r}, 'w').write('x')",
    }
    written = []
    try:
        for way, code in ways.items():
            out = run_python(code)
            # anything new in the test's folder (the sandbox folders themselves are gone by now)
            new = sorted(set(os.listdir(private_tmp)) - {"outside"}) + sorted(os.listdir(outside))
            new += ["the Python installation"] if os.path.exists(stdlib_target) else []
            if new:
                written.append(f"{way}: {new}")
            else:  # it failed, and because the system refused, not because the test is wrong
                assert "Error" in out, (way, out)
            for name in os.listdir(outside):
                os.unlink(outside / name)
    finally:
        if os.path.exists(stdlib_target):
            os.unlink(stdlib_target)
    assert not written, f"written outside the snippet's folder by: {written}"


def test_python_tool_cannot_read_outside_python_and_its_folder(sandbox, private_tmp):
    secret = f"secret-{random.Random().getrandbits(64):x}"
    (private_tmp / "secret.txt").write_text(secret)
    target = str(private_tmp / "secret.txt")
    home = os.path.expanduser("~")

    def head(path):  # the first characters of a readable text file, else None
        try:
            text = open(path).read(200).strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if len(text) >= 4 else None
    home_file = next((p for p in sorted(os.path.join(home, f) for f in os.listdir(home)) if head(p)), None)
    # path -> text that must not come out of the sandbox: a file next to its folder, the project,
    # /etc, the user's home
    contents = {target: secret}
    contents.update({p: head(p) for p in (str(REPO / "pyproject.toml"), "/etc/hostname", home_file) if p and head(p)})
    read_ways = {
        "open": "print(open(PATH).read())",
        "os.open": "import os\nprint(os.read(os.open(PATH, os.O_RDONLY), 1 << 16).decode())",
        "pathlib": "import pathlib\nprint(pathlib.Path(PATH).read_text())",
        "shutil": "import shutil\nshutil.copy(PATH, 'copy')\nprint(open('copy').read())",
        "io.FileIO": "import io\nprint(io.FileIO(PATH).read().decode())",
        "symlink": "import os\nos.symlink(PATH, 'link')\nprint(open('link').read())",
        "ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nbuf = ctypes.create_string_buffer(1 << 16)\n"
                  "fd = libc.open(PATH.encode(), 0)\nif fd < 0: raise OSError('open failed')\n"
                  "libc.read(fd, buf, len(buf))\nprint(buf.value.decode())",
    }
    leaked = []
    for path, content in contents.items():
        for way, code in read_ways.items():
            out = run_python(f"PATH = {path!r}\n" + code)
            if content in out:
                leaked.append(f"{path} by {way}")
    # relative to the snippet's folder, and by listing folders
    out = run_python("print(open('../secret.txt').read())")
    leaked += ["../secret.txt"] if secret in out else []
    out = run_python(f"import os\nprint(os.listdir({str(private_tmp)!r}), os.listdir('..'))")
    leaked += ["listing"] if "secret.txt" in out else []
    # the home folder shows nothing but the way to the Python installation (when it lies inside)
    listing = run_python(f"import os\nprint(sorted(os.listdir({home!r})))")
    if "Error" not in listing:
        python = os.path.realpath(sys.base_prefix)
        leaked += [f"~/{name}" for name in ast.literal_eval(listing)
                   if not python.startswith(os.path.join(home, name) + os.sep)]
    assert not leaked, f"read outside the sandbox: {leaked}"


def test_python_tool_has_no_network(sandbox):
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    ways = {
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "_socket": f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                   f"s.connect(('127.0.0.1', {port}))",
        "urllib": f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
        "asyncio": f"import asyncio\nasyncio.run(asyncio.open_connection('127.0.0.1', {port}))",
        "ctypes": "import ctypes, socket, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
                  "if fd < 0: raise OSError('socket failed')\n"
                  f"addr = struct.pack('=HH4s8x', 2, socket.htons({port}), socket.inet_aton('127.0.0.1'))\n"
                  "if libc.connect(fd, addr, 16) < 0: raise OSError('connect failed')",
        "child process": "import subprocess, sys\nsys.audit = lambda *args: None\n"
                         "subprocess.run([sys.executable, '-c',\n"
                         f"                'import socket; socket.create_connection((\"127.0.0.1\", {port}))'])",
    }
    try:
        outs = {way: run_python(code) for way, code in ways.items()}
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert not connections, f"{len(connections)} connection(s) reached the test's listener; outputs: {outs}"
    for way, out in outs.items():
        assert "Error" in out, (way, out)


def test_python_tool_memory_limit_holds(sandbox):
    limits = PythonLimits(memory_mb=256, timeout=20)
    ways = {
        "bytearray": "x = bytearray(1 << 30)",
        "raise the limit": "import resource\n"
                           "resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
                           "x = bytearray(1 << 30)",
        "mmap": "import mmap\nm = mmap.mmap(-1, 1 << 30)\nm[::4096] = b'x' * (1 << 18)",
        "threads": "import threading\nheld = []\n"
                   "ts = [threading.Thread(target=lambda: held.append(bytearray(100 << 20))) for _ in range(4)]\n"
                   "[t.start() for t in ts]; [t.join() for t in ts]\nassert len(held) == 4, 'a thread failed'",
        # memory files are not part of the address space
        "memfd": "import os\nfds = []\nfor _ in range(48):\n    fd = os.memfd_create('x')\n"
                 "    for _ in range(16):\n        os.write(fd, b'x' * ((1 << 20) - 1))\n    fds.append(fd)",
    }
    held = {}
    for way, code in ways.items():
        out = run_python(code + "\nprint('held')", limits)
        if "held" in out.splitlines():
            held[way] = out
    assert not held, f"more than 256 MB held by: {sorted(held)}"


def test_python_tool_cpu_limit_holds(sandbox):
    limits = PythonLimits(cpu_seconds=1, timeout=30)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 2.5: pass\n"
    ways = {
        "loop": burn,
        "ignore SIGXCPU, raise the limit": "import resource, signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                                           "try:\n    resource.setrlimit(resource.RLIMIT_CPU, (100, 100))\n"
                                           "except (ValueError, OSError):\n    pass\n" + burn,
        "threads": "import threading, time\n"
                   "def spin():\n    while time.process_time() < 2.5: pass\n"  # the whole process's CPU time
                   "ts = [threading.Thread(target=spin) for _ in range(2)]\n"
                   "[t.start() for t in ts]; [t.join() for t in ts]\n"
                   "print('cpu', time.process_time())\n",
        # several processes, each under the limit, together over it
        "processes": "import subprocess, sys, resource\nsys.audit = lambda *args: None\n"
                     "code = 'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.8: pass'\n"
                     "ps = [subprocess.Popen([sys.executable, '-c', code]) for _ in range(3)]\n[p.wait() for p in ps]\n"
                     "print('cpu', resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime)\n",
    }
    over, outs = {}, {}
    for way, code in ways.items():
        t0 = time.monotonic()
        out = outs[way] = run_python(code + "\nprint('survived')", limits)
        cpu = [float(line.split()[1]) for line in out.splitlines() if line.startswith("cpu ")]
        if "survived" in out or (cpu and cpu[0] > 1.5):
            over[way] = out
        else:
            # stopped by the limit (or refused outright, like the processes), in reasonable time
            assert ("CPU-time limit" in out or "Error" in out) and time.monotonic() - t0 < 20, (way, out)
    assert not over, f"more than 1 s of CPU time used by: {over}"
    assert outs["loop"] == "error: CPU-time limit of 1 s exceeded"


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _with_peak_rss_growth(fn):
    """fn()'s result, and how far this process's resident memory rose above its start while fn ran (MB)."""
    import threading

    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    return result, max(peak[0], _rss_mb()) - before


def test_python_tool_output_is_capped_and_the_caller_stays_small(sandbox):
    ways = {
        "print": "while True: print('x' * 1000)",
        "os.write": "import os\nwhile True: os.write(1, b'y' * 65536)",
        "stderr": "import sys\nwhile True: sys.stderr.write('z' * 1000)",
        "both": "import sys\nwhile True:\n    print('a' * 500)\n    print('b' * 500, file=sys.stderr)",
    }
    for way, code in ways.items():
        t0 = time.monotonic()
        out, growth = _with_peak_rss_growth(lambda code=code: run_python(code, PythonLimits(timeout=8)))
        elapsed = time.monotonic() - t0
        assert elapsed < 4, f"{way}: took {elapsed:.1f} s: the output cap did not stop it"
        assert growth < 40, f"{way}: the caller grew by {growth:.0f} MB"
        assert "bytes of output: stopped" in out and len(out) < 2200, (way, out[-200:])


def _live_processes_naming(text: str) -> list[str]:
    """Processes (zombies excepted) whose command line contains `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append(f"{pid} {cmdline[:100]}")
    return found


def test_python_tool_leaves_nothing_running_after_a_timeout(sandbox, private_tmp):
    spawn_and_sleep = ("import os, sys, time\n"
                       "try:\n{spawn}\nexcept Exception as e:\n    print('blocked', e)\ntime.sleep(60)\n")
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(60)', os.getcwd()]"
    ways = {
        "sleep": "import time\ntime.sleep(60)",
        "subprocess": spawn_and_sleep.format(spawn=f"    import subprocess\n    subprocess.Popen({sleeper})"),
        "audit bypass": spawn_and_sleep.format(spawn="    import subprocess\n    sys.audit = lambda *a: None\n"
                                                     f"    subprocess.Popen({sleeper}, start_new_session=True)"),
        "fork": spawn_and_sleep.format(spawn="    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)"),
        "thread": "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()",
        "closed output": "import os, time\nos.close(1); os.close(2)\ntime.sleep(60)",
        "ignore signals": "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                          "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(60)",
    }
    left = {}
    try:
        for way, code in ways.items():
            t0 = time.monotonic()
            out = run_python(code, PythonLimits(timeout=1.0))
            assert out == "error: timed out after 1 s" and time.monotonic() - t0 < 4, (way, out)
            if _live_processes_naming(str(private_tmp)):
                left[way] = _live_processes_naming(str(private_tmp))
    finally:
        for line in sum(left.values(), []):  # don't leave a failing run's processes behind either
            try:
                os.kill(int(line.split()[0]), 9)
            except OSError:
                pass
    assert not left, f"still running after the call returned: {left}"


def test_python_tool_is_fast_enough_for_rollouts(sandbox):
    run_python("print(1)")  # first call: page cache
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        assert run_python("print(1)") == "1"
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    print(f"run_python('print(1)'): mean {mean * 1000:.0f} ms over 10 calls")
    assert mean < 0.5, f"mean {mean:.2f} s per trivial snippet"


def test_python_tool_refuses_where_there_is_no_sandbox(monkeypatch):
    """No sandbox, no run: one clear error (the CLI prints it as `error: ...`), never the snippet."""
    from lmforge.inference import sandbox, sandbox_child
    from lmforge.inference.sandbox import SandboxUnavailable

    assert sandbox.READY == sandbox_child.READY  # the handshake both sides rely on
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(SandboxUnavailable, match="needs Linux.*refusing to run model-written code unsandboxed"):
        run_python("print(1)")
    with pytest.raises(SandboxUnavailable):  # not turned into a result the model would read
        run_tool({"name": "python", "arguments": {"code": "print(1)"}})


@pytest.mark.parametrize("denied, reason", [
    ("unshare", "cannot create namespaces (unshare: Operation not permitted); user namespaces may be disabled"),
    ("mount", "cannot build the sandbox's file system (mount /: Operation not permitted); a security policy"),
])
def test_python_tool_refuses_when_the_kernel_denies_a_layer(sandbox, tmp_path, denied, reason):
    """A real missing layer: the CLI runs under a seccomp filter that denies one system call, as on
    machines with user namespaces disabled (unshare) or restricted by AppArmor (mount). It answers
    with one error line, and the snippet never runs."""
    import platform
    import subprocess

    from lmforge.inference import sandbox_child as child

    table = child.SYSCALLS[platform.machine()]
    marker = tmp_path / "ran"
    script = f"""
import ctypes, struct, sys
from lmforge.inference import sandbox_child as c
prog = [(c.LD_ABS, 0, 0, 4), (c.JEQ, 1, 0, {table['audit_arch']}), (c.RET, 0, 0, c.RET_ALLOW),
        (c.LD_ABS, 0, 0, 0), (c.JEQ, 0, 1, {table['deny'][denied]}), (c.RET, 0, 0, c.RET_ERRNO | c.EPERM),
        (c.RET, 0, 0, c.RET_ALLOW)]
code = b"".join(struct.pack("HBBI", *i) for i in prog)
buf = ctypes.create_string_buffer(code, len(code))
fprog = c.SockFprog(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None)
assert libc.prctl(c.PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0) == 0
assert libc.prctl(c.PR_SET_SECCOMP, ctypes.c_ulong(c.SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0) == 0
from lmforge.cli import main
sys.exit(main(["tool", "python", "open({str(marker)!r}, 'w').write('ran')"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: python tool: cannot sandbox the snippet, so it was not run: " + reason)
    assert not marker.exists()


def test_python_tool_limits_time_and_memory(sandbox):
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
        self.model = type("M", (), {"config": model_config, "context_limit": model_config.block_size})()

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
    from lmforge.models.transformer import get_config

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
    from lmforge.models.transformer import get_config

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

    from lmforge.inference.engine import Engine
    from lmforge.models.transformer import GPT, get_config

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
        self.model = type("M", (), {"config": model_config, "context_limit": model_config.block_size})()

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
    from lmforge.inference.tools import generate_with_tools_batch
    from lmforge.models.transformer import get_config

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


def test_a_tool_subset_answers_other_calls_as_unknown_without_running_them(monkeypatch):
    import lmforge.inference.tools as tools

    monkeypatch.setattr(tools, "run_python", lambda code, *a, **k: pytest.fail("python ran"))
    only_calculator = tools.select_tools(["calculator"])
    assert list(only_calculator) == ["calculator"] and list(tools.select_tools(None)) == list(tools.TOOLS)
    assert tools.run_tool({"name": "python", "arguments": {"code": "print(1)"}}, only_calculator) == \
        "error: unknown tool 'python' (available: calculator)"
    assert tools.run_tool({"name": "calculator", "arguments": {"expression": "6*7"}}, only_calculator) == "42"
    with pytest.raises(LmforgeError, match="unknown tool.*'nope'"):
        tools.select_tools(["nope"])
