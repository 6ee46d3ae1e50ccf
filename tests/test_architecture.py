"""The package's shape: no import cycles, no private names across modules, short
functions, and a CLI that answers --help/--version without torch.

    .venv/bin/python -m pytest tests/test_architecture.py -q

The first three read the source with ``ast`` (nothing is imported).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "bsfind"
# Functions longer than this (docstring included) must say why at their top.
MAX_FUNCTION_LINES = 80
LONG_REASON = "Long because:"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(name, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path) -> set[str]:
    """The bsfind modules ``name`` imports at run time (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, path)
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                       for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_is_really_walked() -> None:
    # Guards the test above against vacuity: known edges are found.
    assert "bsfind.pipeline" in _imports("bsfind.api", MODULES["bsfind.api"])
    assert "bsfind.noise.probe" in _imports("bsfind.distributed", MODULES["bsfind.distributed"])


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def test_no_module_uses_another_modules_private_names() -> None:
    problems = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}  # local name -> bsfind module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = _resolve(node, name, path)
                if not module.startswith("bsfind"):
                    continue
                for a in node.names:
                    if _private(a.name):
                        problems.append(f"{path.name}:{node.lineno} imports {module}.{a.name}")
                    if f"{module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("bsfind") and any(_private(p) for p in
                                                           a.name.split(".")):
                        problems.append(f"{path.name}:{node.lineno} imports {a.name}")
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                problems.append(f"{path.name}:{node.lineno} uses "
                                f"{aliases[node.value.id]}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_no_par_is_none_branches() -> None:
    hits = [f"{p}:{i}" for p in MODULES.values()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if "par is None" in line]
    assert not hits


def test_long_functions_say_why() -> None:
    too_long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and LONG_REASON not in doc:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                    f"({length} lines)")
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines without "
                          f"'{LONG_REASON}' in their docstring:\n" + "\n".join(too_long))


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["recommend", "--help"],
                                  ["check", "--help"]])
def test_cli_answers_without_importing_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['bsfind', *{args!r}]\n"
        "from bsfind.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bsfind" in proc.stdout
    heavy = proc.stdout.strip().splitlines()[-1]
    assert "torch" not in heavy, heavy


def test_import_bsfind_does_not_import_torch() -> None:
    code = ("import sys, bsfind\n"
            "assert bsfind.__version__\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    # ... and the public names still load on first use.
    import bsfind

    assert callable(bsfind.recommend) and callable(bsfind.load_spec)
    with pytest.raises(AttributeError):
        bsfind.no_such_name  # noqa: B018
