"""The rules of the house that code review alone would let slip."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "kiln"
FRAMEWORKS = ("onnxruntime", "tensorflow", "torch", "sklearn", "ray")


def imports_of(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for file in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(file.relative_to(SRC))] = names
    return found


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
