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
    requirements = root / "requirements.txt"
    if requirements.is_file():
        lines = [
            line.strip()
            for line in requirements.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if lines:
            env["pip"] = {"packages": lines}
    return dict(env)
