"""The environment step of a deploy: the project's requirements.txt, installed before it loads.

Every path that starts workers from a project folder goes through here first:
a rollout (deploy, rollback, refresh), a restore after a restart, and the folder
`kiln serve DIR` serves in place. The build runs in a thread (uv can take a
while; the event loop keeps serving), reports progress in the rollout that
`kiln deploy` polls, and a failure ends the rollout as an `error` with uv's
message while the previous revision keeps serving. Workers then get the
environment's folders as `WorkerSpec.site_dirs` (see `site_dirs_for`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from kiln.control.ownership import user_of
from kiln.environments import BuildFailed, Environment, project_requirements, server_environments
from kiln.environments import site_dirs_for as site_dirs_for

log = logging.getLogger("kiln.environments")


def describe(env: Environment) -> str:
    """One line for the deploy's output: which environment, built or reused, how long."""
    what = "built" if env.built else "reused"
    count = len(env.packages)
    added = f"{count} package{'s' if count != 1 else ''} installed" if count else "nothing to add"
    return f"Python environment {env.key[:12]} {what} in {env.seconds:.2f}s ({added})"


def _failure(root: Path, exc: BuildFailed) -> str:
    requirements = project_requirements(root)
    names = requirements.names if requirements is not None else "requirements.txt"
    return f"{names} could not be installed: {exc.message.rstrip('.')}"


async def prepare_environment(manager: Any, rollout: Any, project: Any) -> bool:
    """Build or find `project`'s environment for `rollout`; False if the rollout failed here."""

    def progress(message: str) -> None:  # called from the build thread
        rollout.message = message
        log.info("%s: %s", rollout.deployment, message)

    restricted = user_of(rollout.deployment) is not None  # a user's deploy: wheels only
    try:
        env = await asyncio.to_thread(
            server_environments().ensure, project.root, progress, restricted=restricted
        )
    except BuildFailed as exc:
        message = _failure(project.root, exc)
        rollout.status, rollout.error, rollout.finished = "error", message, time.time()
        rollout.message = None
        await asyncio.to_thread(
            manager.store.set_revision_status,
            rollout.deployment,
            rollout.revision,
            "error",
            message,
        )
        for api in rollout.apis:
            manager._record_error(api, message)
        manager._log(rollout, message + "; the previous revision keeps serving")
        return False
    if env is not None:
        rollout.message = describe(env)
        manager._log(rollout, rollout.message)
    return True


async def restore_environment(manager: Any, deployment: str, folder: Path) -> bool:
    """Before a restart restores a revision: its environment (rebuilt if it was pruned)."""
    restricted = user_of(deployment) is not None
    try:
        await asyncio.to_thread(server_environments().ensure, folder, restricted=restricted)
    except BuildFailed as exc:
        manager._record_error(deployment, _failure(folder, exc))
        return False
    return True


async def prepare_served_folder(project: Any) -> None:
    """`kiln serve DIR`: the folder's environment, built before anything loads.

    Raises the server's start error (a clean message, no traceback) when it cannot be built.
    """
    from kiln.control.host import ServerError

    if project is None:
        return

    def progress(message: str) -> None:
        print(f"{message} ...", file=sys.stderr, flush=True)

    try:
        env = await asyncio.to_thread(server_environments().ensure, project.root, progress)
    except BuildFailed as exc:
        raise ServerError(_failure(project.root, exc)) from None
    if env is not None and env.built:
        print(describe(env), file=sys.stderr, flush=True)
