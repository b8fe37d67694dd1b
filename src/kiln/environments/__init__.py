"""Per-project Python environments: a deploy's requirements.txt, installed once and shared.

A project's `requirements.txt` (and `src/requirements.txt` for Hub-layout
projects) is installed when it is deployed or served, into an environment of its
own under KILN_HOME, keyed by the requirements' hash, Kiln's version and the
Python version, and shared by every revision and API with the same key. Only
what the server's own environment lacks is installed (the server's versions are
constraints), so a project naming numpy or torch builds in moments and never
downloads them. A worker gets the environment as `WorkerSpec.site_dirs`, folders
it appends to sys.path before importing user code; it needs nothing else of it.

    requirements.py     which files, and the key
    server_packages.py  the server's installed versions, as constraints
    installer.py        the uv calls (resolve what is missing, install only that)
    store.py            the folders, locks, leases, listing and pruning
"""

from __future__ import annotations

import threading

from kiln.environments.installer import BuildFailed
from kiln.environments.requirements import Requirements, project_requirements
from kiln.environments.store import Environment, Environments, envs_dir

__all__ = [
    "BuildFailed",
    "Environment",
    "Environments",
    "Requirements",
    "envs_dir",
    "project_requirements",
    "server_environments",
    "site_dirs_for",
]

_server: Environments | None = None
_server_lock = threading.Lock()


def server_environments() -> Environments:
    """This process's cache handle (one per process, so its leases live as long as it does)."""
    global _server
    with _server_lock:
        if _server is None or _server.root != envs_dir():
            _server = Environments()
        return _server


def site_dirs_for(project_root: object) -> list[str]:
    """The sys.path folders of a project's already built environment ([] if none or not built).

    Used where a worker spec is made (realtime APIs, batch job plans); building is the
    deploy's business (`Environments.ensure`), never done here.
    """
    from pathlib import Path

    env = server_environments().lookup(Path(str(project_root)))
    return env.site_dirs if env is not None else []
