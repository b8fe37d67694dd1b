"""Import names from other platforms, served to workers only when the user has none.

Code written for another platform imports that platform's package: a CellStrat Hub
project's `src/main.py` starts with `from hub import hub_handler`, a TorchServe
handler with `from ts.torch_handler.base_handler import BaseHandler`. Installing
packages under those names into users' environments would shadow real, unrelated
distributions (PyPI's `hub` is another project), so Kiln serves its stand-ins from
`shim_packages/<name>/` through a meta-path finder instead, and only for a name that
nothing else on the worker's path provides: the user's `python_path`, the API's
environment (requirements.txt), the server's site-packages and editable installs all
win over a shim. A folder that merely happens to be called `hub` (a namespace
package, no `__init__.py`) is not a real package and does not hide the shim.

`install()` runs once at worker startup (serving/worker.py), before user code is
imported. The server process never installs the finder.

Adding a shim for another platform (e.g. TorchServe's `ts`):

1. Create `shim_packages/<name>/__init__.py` (the folder name is the import name).
   Subpackages and modules go beside it as usual (`ts/torch_handler/base_handler.py`
   imports as `ts.torch_handler.base_handler`). Between a shim's own modules use
   relative imports (`from ..utils import x`): they resolve under `<name>` in workers
   and under `kiln.compat.shim_packages.<name>` for mypy, which cannot see `<name>`.
2. Reach Kiln with absolute imports of packages below `serving` in
   docs/architecture.md's import graph (`kiln`, `kiln.handlers`, `kiln.runtimes`,
   `kiln.errors`, ...): the worker imports this package, so a shim that imported
   `kiln.serving` would close a cycle. What only the worker knows reaches user code
   through the request context (handlers/context.py).
3. Nothing to register: every folder here with an `__init__.py` is a shim. Add a test
   that imports it in a real worker, and one where a real package of that name wins.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

SHIM_ROOT = Path(__file__).resolve().parent / "shim_packages"


def shim_names(root: Path = SHIM_ROOT) -> frozenset[str]:
    """The import names Kiln has a stand-in for: each folder of `root` with an `__init__.py`."""
    try:
        folders = list(root.iterdir())
    except OSError:
        return frozenset()
    return frozenset(
        f.name
        for f in folders
        if f.is_dir() and f.name.isidentifier() and (f / "__init__.py").is_file()
    )


class ShimFinder(importlib.abc.MetaPathFinder):
    """Serves `shim_packages/<name>` as the top-level package `<name>`, as a last resort.

    It sits first on `sys.meta_path` but asks every other finder before answering, so
    that a real package wins wherever it is installed, and an empty folder of the same
    name (which the path finder would turn into a useless namespace package) does not.
    Submodules of a shim are found by the ordinary path finder through the package's
    `__path__`, so only top-level names pass through here.
    """

    def __init__(self, root: Path = SHIM_ROOT) -> None:
        self.root = root
        self.names = shim_names(root)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if path is not None or fullname not in self.names:
            return None
        real = self._real_spec(fullname, target)
        if real is not None:
            return real
        folder = self.root / fullname
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )

    def _real_spec(
        self, fullname: str, target: ModuleType | None
    ) -> importlib.machinery.ModuleSpec | None:
        """The spec another finder gives `fullname`, unless it is only a namespace package."""
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, ShimFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, None, target)
            if spec is not None and spec.origin not in (None, "namespace"):
                return spec  # a real module or package: it wins
        return None


def install(root: Path = SHIM_ROOT) -> ShimFinder:
    """Put the shim finder on `sys.meta_path` (once); returns the finder in place."""
    for finder in sys.meta_path:
        if isinstance(finder, ShimFinder):
            return finder
    finder = ShimFinder(root)
    sys.meta_path.insert(0, finder)
    return finder
