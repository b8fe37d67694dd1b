"""Import the Python files and modules kiln.yaml names (`file.py:Name`, `pkg.mod:Name`).

Handlers import the user's handler and hook files with these, and the torch
runtime imports the file defining an eager `nn.Module`; the helpers live here,
below both packages, so neither imports the other for them. Nothing of Kiln is
imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

_counter = 0


def import_file(path: str) -> ModuleType:
    """Import a .py file by path; its folder goes on sys.path so sibling imports work."""
    global _counter
    file = Path(path)
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    _counter += 1
    module_name = f"kiln_user_{file.stem}_{_counter}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def split_handler(handler: str) -> tuple[str, str | None]:
    """`file.py:Name` / `pkg.mod:Name` / `file.py` -> (target, name or None)."""
    if ":" in handler:
        target, name = handler.rsplit(":", 1)
        return target, name or None
    return handler, None


def import_target(target: str) -> ModuleType:
    if target.endswith(".py") or os.path.sep in target:
        return import_file(target)
    return importlib.import_module(target)
