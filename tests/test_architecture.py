"""The rules of the house that code review alone would let slip."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "kiln"
DOC = ROOT / "docs" / "architecture.md"
FRAMEWORKS = ("onnxruntime", "tensorflow", "torch", "sklearn", "ray")


def imports_of(folder: Path) -> dict[str, set[str]]:
    """file (relative to src/kiln) -> every module it imports, at any depth, absolute names."""
    found: dict[str, set[str]] = {}
    for file in folder.rglob("*.py"):
        found[str(file.relative_to(SRC))] = {imp.target for imp in kiln_imports(file, every=True)}
    return found


# ----- the import graph between packages (docs/architecture.md, "Import graph") ---------


class Import:
    """One import statement's target, where it is and when it runs."""

    def __init__(self, file: Path, line: int, target: str, when: str) -> None:
        self.file, self.line, self.target, self.when = file, line, target, when

    def __repr__(self) -> str:
        where = self.file.relative_to(SRC) if self.file.is_relative_to(SRC) else self.file
        return f"{where}:{self.line} {self.target} ({self.when})"


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def kiln_imports(file: Path, *, every: bool = False, module: str | None = None) -> list[Import]:
    """Every import in `file`: module level ("eager"), under `if TYPE_CHECKING:`
    ("typing") and inside functions ("lazy"); all of them count against the graph.

    `from pkg import mod` names the submodule, not `pkg` (unless a name is not a
    module); relative imports are made absolute. Only kiln's modules, unless `every`.
    """
    own = module or _module_name(file)
    found: list[Import] = []

    def add(line: int, target: str, when: str) -> None:
        if every or target == "kiln" or target.startswith("kiln."):
            found.append(Import(file, line, target, when))

    def visit(node: ast.AST, when: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = when
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = "lazy"
            elif isinstance(child, ast.If) and when == "eager":
                test = child.test
                name = getattr(test, "id", None) or getattr(test, "attr", None)
                if name == "TYPE_CHECKING":
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), "typing")
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), when)
                    continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(child.lineno, alias.name, inner)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = own.split(".")
                    if file.name != "__init__.py":
                        package = package[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join(package + ([child.module] if child.module else []))
                subs = [f"{base}.{a.name}" for a in child.names if _is_module(f"{base}.{a.name}")]
                for sub in subs:
                    add(child.lineno, sub, inner)
                if len(subs) < len(child.names):
                    add(child.lineno, base, inner)
            else:
                visit(child, inner)

    visit(ast.parse(file.read_text()), "eager")
    return found


def package_of(module: str) -> str:
    """The graph's node for a kiln module: `kiln` (the package's __init__), a top-level
    module or package (`errors`, `serving`), or `control.store` (the state store)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "kiln"
    if parts[1:3] == ["control", "store"]:
        return "control.store"
    if parts[1:3] == ["backends", "ray"]:
        return "backends.ray"
    return parts[1]


def documented_graph() -> dict[str, set[str]]:
    """docs/architecture.md's "Import graph" list: `- `node` -> `a`, `b`` per line."""
    text = DOC.read_text()
    section = text.split("\n## Import graph\n", 1)[1].split("\n## ", 1)[0]
    graph: dict[str, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"^- `([\w.]+)` -> (.+)$", line.strip())
        if m:
            graph[m.group(1)] = set(re.findall(r"`([\w.]+)`", m.group(2)))
    return graph


# Imports that break the graph today, in files other changes own; each names its fix.
# Remove an entry when the import is gone (test_graph_exceptions_are_still_needed says so).
TEMPORARY_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _violations() -> tuple[list[Import], set[tuple[str, str]]]:
    graph = documented_graph()
    bad: list[Import] = []
    excused: set[tuple[str, str]] = set()
    for file in sorted(SRC.rglob("*.py")):
        if "templates" in file.relative_to(SRC).parts:
            continue  # project templates for `kiln init`: user code, not Kiln
        source = package_of(_module_name(file))
        for imp in kiln_imports(file):
            target = package_of(imp.target)
            if target == source or target in graph.get(source, set()):
                continue
            key = (str(file.relative_to(SRC)), target)
            if key in TEMPORARY_EXCEPTIONS:
                excused.add(key)
            else:
                bad.append(imp)
    return bad, excused


def test_the_documented_graph_names_every_package_and_has_no_cycle() -> None:
    graph = documented_graph()
    present = {package_of(_module_name(f)) for f in SRC.rglob("*.py")}
    assert present - set(graph) == set(), "add these to docs/architecture.md, Import graph"
    assert set(graph) - present == set(), "the graph names packages that do not exist"
    for node, allowed in graph.items():
        assert allowed <= set(graph), f"{node} -> unknown {allowed - set(graph)}"
    # Depth-first search: a node met again while still on the path closes a cycle.
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"the graph has a cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])


def test_every_import_follows_the_documented_graph() -> None:
    bad, _ = _violations()
    assert not bad, "imports the graph in docs/architecture.md does not allow:\n" + "\n".join(
        f"  {imp!r} -> {package_of(imp.target)}" for imp in bad
    )


def test_graph_exceptions_are_still_needed() -> None:
    _, excused = _violations()
    stale = set(TEMPORARY_EXCEPTIONS) - excused
    assert not stale, f"these imports are gone: remove their exceptions {sorted(stale)}"


def test_the_graph_check_sees_lazy_typing_and_relative_imports(tmp_path: Path) -> None:
    # The scanner itself: a lazy import, a TYPE_CHECKING one and a relative one all count.
    file = tmp_path / "probe.py"
    file.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import schema\n"
        "if TYPE_CHECKING:\n    from kiln.serving.types import Part\n"
        "def f():\n    from kiln.cli import client\n"
    )
    found = {(i.target, i.when) for i in kiln_imports(file, module="kiln.control.store.probe")}
    assert found == {
        ("kiln.control.store.schema", "eager"),
        ("kiln.serving.types", "typing"),
        ("kiln.cli.client", "lazy"),
    }
    assert [package_of(t) for t, _ in sorted(found)] == ["cli", "control.store", "serving"]


# Imports that close a cycle between two modules of one package, in files other changes
# own; each names its fix. (file, the module it imports) -> why it must go.
CYCLE_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_cycles() -> tuple[list[list[str]], set[tuple[str, str]]]:
    """Strongly connected groups of modules (every import counts), less the exceptions."""
    graph: dict[str, set[str]] = {}
    excused: set[tuple[str, str]] = set()
    for file in SRC.rglob("*.py"):
        if "templates" in file.relative_to(SRC).parts:
            continue
        name = _module_name(file)
        edges = graph.setdefault(name, set())
        for imp in kiln_imports(file):
            if name.startswith(imp.target + "."):
                continue  # a module's own packages run first anyway: no cycle through them
            key = (str(file.relative_to(SRC)), imp.target)
            if key in CYCLE_EXCEPTIONS:
                excused.add(key)
                continue
            edges.add(imp.target)
    # Tarjan's algorithm, iteratively (no recursion limit to meet).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups, excused


def test_no_two_modules_import_each_other() -> None:
    groups, _ = _module_cycles()
    assert not groups, f"modules that import each other (directly or around a loop): {groups}"


def test_cycle_exceptions_are_still_needed() -> None:
    _, excused = _module_cycles()
    stale = set(CYCLE_EXCEPTIONS) - excused
    assert not stale, f"these imports are gone: remove their exceptions {sorted(stale)}"


@pytest.mark.parametrize("room", ["serving", "runtimes", "handlers", "config", "storage"])
def test_inner_rooms_know_nothing_about_http(room: str) -> None:
    for file, names in imports_of(SRC / room).items():
        bad = {n for n in names if n.split(".")[0] in ("starlette", "uvicorn", "fastapi")}
        bad |= {n for n in names if n.startswith("kiln.protocols") or n.startswith("kiln.cli")}
        assert not bad, f"{room}/{file} imports {bad}: keep protocols -> serving <- runtimes"


def test_frameworks_are_imported_only_inside_their_own_runtime_module() -> None:
    for file, names in imports_of(SRC).items():
        for name in names:
            top = name.split(".")[0]
            if top in FRAMEWORKS:
                if top == "ray" and file.startswith("backends/ray/"):
                    continue  # the Ray backend (never imported by kiln or its CLI at start)
                own = f"runtimes/{'onnx' if top == 'onnxruntime' else top}.py"
                assert file == own, f"{file} imports {top}; only {own} may"


def test_importing_kiln_and_its_cli_pulls_in_no_framework() -> None:
    code = (
        "import sys, kiln, kiln.cli.main, kiln.config, kiln.protocols.app;"
        f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_is_unpickled() -> None:
    for file in SRC.rglob("*.py"):
        text = file.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, file


def test_batch_room_reaches_only_the_store_of_the_control_plane() -> None:
    # Batch workers and the job manager use the state store, never HTTP, protocols or the CLI.
    for file, names in imports_of(SRC / "batch").items():
        bad = {n for n in names if n.split(".")[0] in ("starlette", "uvicorn", "fastapi")}
        bad |= {n for n in names if n.startswith(("kiln.protocols", "kiln.cli"))}
        bad |= {
            n
            for n in names
            if n.startswith("kiln.control") and not n.startswith("kiln.control.store")
        }
        assert not bad, f"batch/{file} imports {bad}"


def test_protocols_never_import_the_control_plane_or_batch() -> None:
    # The job manager (like the registry) is handed to the adapters, never imported.
    for file, names in imports_of(SRC / "protocols").items():
        bad = {n for n in names if n.startswith(("kiln.control", "kiln.batch"))}
        assert not bad, f"protocols/{file} imports {bad}"
