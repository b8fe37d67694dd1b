"""`kiln validate --load`: load each API in a real worker and say what would fail.

A valid kiln.yaml can still describe a project that never serves: a handler with
a SyntaxError, an import that is not installed, a TensorFlow model with two
signatures and no `signature_key`. Those surface only when a worker loads the
model, so this starts the very worker `kiln serve` starts (`kiln.serving.worker`
through `serving.replica.Replica`, unsandboxed, with the developer's environment
as `kiln serve` gives it), waits for its answer, and stops it. Nothing is copied
from the worker: what loads here loads there, and its error is the same text.

A Batch API with a runtime block loads through that same worker (a job's
workers build the same pipeline); a `PythonPredictor` class is not loaded,
because its constructor takes each job's `config`, which only a job submission
gives.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `File "/abs/path/handler.py", line 12, in load`: a traceback frame the worker printed.
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')
DEFAULT_TIMEOUT_S = 120.0


@dataclass
class LoadReport:
    """What loading one API said: `loaded` True/False, or None when it was not tried."""

    name: str
    kind: str  # "API" or "Batch API"
    loaded: bool | None
    detail: str  # "loads in 0.4 s", the error and what to fix, or why it was not loaded


def _worker_for(api: Any, root: Path) -> tuple[Any, Any]:
    """The WorkerSpec and launch factory `kiln serve` (no --sandbox) would give `api`."""
    from kiln.environments import site_dirs_for
    from kiln.sandbox.policy import SandboxPolicy
    from kiln.serving.placement import worker_env, worker_spec_for

    spec = worker_spec_for(api)
    spec.site_dirs = site_dirs_for(root)
    spec.expose_errors = True  # the developer's own machine: the whole error
    policy = SandboxPolicy(enabled=False, inherit_env=True)
    env = {**worker_env(spec, inherit=True), **dict(getattr(api, "worker_env", {}) or {})}

    def launch(argv: list[str], pass_fds: tuple[int, ...]) -> Any:
        return policy.launch(argv, env, cwd=str(root), pass_fds=pass_fds, name=f"{api.name}-0")

    return spec, launch


def where_in_project(lines: list[str], root: Path) -> str | None:
    """The last traceback frame inside the project, as "handler.py, line 12" (None if none).

    The worker prints the traceback of a failed load; its deepest frame in the user's
    own files is where the fix goes (frames in Kiln or in libraries are not)."""
    found = None
    top = str(root.resolve())
    for line in lines:
        match = _FRAME.search(line)
        if match is None:
            continue
        path = os.path.realpath(match["file"])
        if path.startswith(top + os.sep) and "site-packages" not in path:
            found = f"{os.path.relpath(path, top)}, line {match['line']}"
    return found


def what_to_fix(error: str) -> str:
    """One sentence on the next step for a load error's kind."""
    if error.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "fix the code at that line"
    if error.startswith(("ModuleNotFoundError", "ImportError")):
        return (
            "install the missing package (add it to the project's requirements.txt, which "
            "kiln serve and kiln deploy install) or fix the import"
        )
    if "did not load within" in error:
        return "make the load faster or raise serving.startup_timeout_s in kiln.yaml"
    if "signature" in error.lower():
        return "set signature_key in the API's runtime block of kiln.yaml"
    return "fix what the error names, then run `kiln validate --load` again"


async def _load_one(api: Any, kind: str, root: Path, timeout: float) -> LoadReport:
    from kiln.serving.replica import LoadFailed, Replica

    spec, launch = _worker_for(api, root)
    output: deque[str] = deque(maxlen=200)
    replica = Replica(spec, launch=launch, log_line=output.append)
    started = asyncio.get_running_loop().time()
    try:
        await replica.start(timeout)
    except LoadFailed as exc:
        error = str(exc)
        lines = list(output)
        where = where_in_project(lines, root)
        if where and where.split(",")[0] not in error:
            error = f"{error} (at {where})"
        detail = f"{error}\n    what to do: {what_to_fix(error)}"
        return LoadReport(label(api), kind, False, detail)
    except OSError as exc:
        return LoadReport(label(api), kind, False, f"the worker could not start: {exc}")
    seconds = asyncio.get_running_loop().time() - started
    await replica.stop(grace=5.0)
    return LoadReport(label(api), kind, True, f"loads ({seconds:.1f} s)")


async def load_project_apis(project: Any, parallel: int = 2) -> list[LoadReport]:
    """Load every API (each version) and Batch API of `project`, `parallel` at a time."""
    root = Path(project.root)
    gate = asyncio.Semaphore(max(1, parallel))

    async def one(api: Any, kind: str) -> LoadReport:
        if kind == "Batch API" and api.runtime == "predictor":
            return LoadReport(
                label(api),
                kind,
                None,
                "not loaded: a PythonPredictor's constructor takes each job's config; "
                "it loads when a job starts (kiln jobs submit)",
            )
        serving = getattr(api, "serving", None)
        timeout = float(getattr(serving, "startup_timeout_s", DEFAULT_TIMEOUT_S))
        async with gate:
            return await _load_one(api, kind, root, timeout)

    jobs = [one(api, "API") for api in project.apis]
    jobs += [one(api, "Batch API") for api in project.batch_apis]
    return list(await asyncio.gather(*jobs))


def label(api: Any) -> str:
    version = getattr(api, "version", None)
    return f"{api.name} (version {version})" if version else api.name
