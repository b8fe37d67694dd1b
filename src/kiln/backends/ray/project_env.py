"""A project folder as a Ray runtime_env: how a revision's files and requirements reach
every node (the API revisions' Serve applications and the job workers' actors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def project_runtime_env(root: Path) -> dict[str, Any]:
    """The application's runtime_env: the project folder uploaded to the cluster (GCS), and
    requirements.txt's lines as `pip` (installed on each node, inheriting Kiln's packages)."""
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    env = upload_working_dir_if_needed({"working_dir": str(root)}, include_gitignore=False)
    packages = pip_packages(root)
    if packages:
        env["pip"] = {"packages": packages}
    return dict(env)


def pip_packages(root: Path) -> list[str]:
    """requirements.txt's requirement lines (comments and blank lines dropped)."""
    requirements = root / "requirements.txt"
    if not requirements.is_file():
        return []
    lines = (line.split(" #", 1)[0].strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
