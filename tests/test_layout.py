"""The package's import graph has no cycles.

Edges are every `import` of an lmforge module (at the top of a file or inside a function: a lazy
import still makes the two modules depend on each other) and every string naming an lmforge module
(loading by name, e.g. the family registry's built-in table, is an import static tools cannot see)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"

# Known cycles still to be removed, each with its reason; the test fails if one disappears (so the
# entry gets deleted) or a new one appears.
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]
            graph[m].update(n for n in names if n in modules and n != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycles():
    found = set(cycles(import_graph()))
    assert found <= KNOWN_CYCLES, f"new import cycles: {[sorted(c) for c in found - KNOWN_CYCLES]}"
    assert found == KNOWN_CYCLES, f"cycles gone (delete them from KNOWN_CYCLES): {KNOWN_CYCLES - found}"


def test_the_families_and_the_transforms_import_downward():
    graph = import_graph()
    # A family module imports the protocol, never the registry that loads it by name.
    for family in ("transformer", "lstm", "ngram"):
        assert "lmforge.models.registry" not in graph[f"lmforge.models.{family}"]
    # Quantization is a transform of a built model: it knows nothing of checkpoints.
    assert not {m for m in graph["lmforge.quantize"] if m.startswith("lmforge.train")}
    assert not {m for m in graph["lmforge.posttrain.lora"] if m.startswith("lmforge.train")}


def test_command_modules_import_only_the_shared_cli_module():
    """lmforge.cli's command modules share lmforge.cli.common and never import one another."""
    graph = import_graph()
    commands = [m for m in graph if m.startswith("lmforge.cli.") and m not in ("lmforge.cli.common",
                                                                              "lmforge.cli.__main__")]
    assert len(commands) >= 8
    for m in commands:
        cli_deps = {d for d in graph[m] if d.startswith("lmforge.cli")}
        assert cli_deps <= {"lmforge.cli.common"}, f"{m} imports {sorted(cli_deps - {'lmforge.cli.common'})}"
    # and nothing below the command line imports it (`python -m lmforge` is the command line)
    for m, deps in graph.items():
        if not m.startswith("lmforge.cli") and m != "lmforge.__main__":
            assert not {d for d in deps if d.startswith("lmforge.cli")}, f"{m} imports the command line"


def test_long_modules_say_why():
    """A module over ~500 lines says in its docstring why it is one file ("This file is long because")."""
    silent = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 520:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "This file is long because" not in doc:
                silent.append(f"{path.relative_to(PACKAGE.parent)} ({text.count(chr(10))} lines)")
    assert not silent, f"long modules without a reason in their docstring: {silent}"


def test_the_command_line_builds_without_torch():
    """Every option is derived from declared settings, yet building the parser (`lmforge --help`)
    loads neither torch nor a model: the settings live in modules without heavy imports."""
    import subprocess
    import sys

    code = ("import sys; from lmforge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'tokenizers', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_python_dash_m_lmforge_is_the_command_line():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "speedrun" in res.stdout and "pretrain" in res.stdout
