"""What a deployment's kiln.yaml may reach, by who deployed it.

A user's deployment (`<user>.<name>`, see ownership.py) reads `${VAR}` only from
its own `.env` and `env:` mappings and names files only inside its revision
(`kiln.config.policy.USER`). The admin's may also read the server variables whose
names match `kiln server start --pass-env` patterns, and name absolute paths
(`ADMIN`). A deploy onto `kiln serve` (one developer, no users) keeps reading the
whole environment. Workers never get the server's environment from here: they get
`api.worker_env` (the API's `env:` over the deployment's over the `.env`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config.policy import ADMIN, USER, ConfigPolicy, expand_dotenv, server_variables


@dataclass(frozen=True)
class ConfigScope:
    """How to load one deployment's kiln.yaml: `load_project(folder, **scope.kwargs())`."""

    policy: ConfigPolicy
    variables: dict[str, str]  # what `${VAR}` reads (under the file's own `env:` mappings)
    dotenv: dict[str, str]  # the project's `.env`, expanded: what its workers get

    def kwargs(self) -> dict[str, Any]:
        return {"policy": self.policy, "env": self.variables, "dotenv": self.dotenv}


def pass_env_patterns(server: Any) -> list[str]:
    """Globs of the server variables the admin's kiln.yaml may read (`server.pass_env`,
    set from `kiln server start --pass-env`); every variable under `kiln serve`."""
    options = getattr(server, "options", None)
    if getattr(options, "mode", None) == "serve":
        return ["*"]
    patterns = getattr(server, "pass_env", None)
    if patterns is None:
        patterns = getattr(options, "pass_env", None)
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def config_scope(folder: Path, user: str | None, server: Any) -> ConfigScope:
    """The policy and variables for a deployment in `folder` by `user` (None: the admin).

    The `.env` is read without python-dotenv's interpolation, which would read the
    server's environment: its `${VAR}` read the lines above and, for the admin, the
    allowed server variables; an unknown one is empty.
    """
    allowed = {} if user is not None else server_variables(os.environ, pass_env_patterns(server))
    dotenv = expand_dotenv(read_raw_dotenv(folder), allowed)
    return ConfigScope(USER if user is not None else ADMIN, {**allowed, **dotenv}, dotenv)


def read_raw_dotenv(root: Path) -> dict[str, str | None]:
    """The project's `.env` as written (no `${VAR}` expanded); {} without one."""
    path = root / ".env"
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return dict(dotenv_values(path, interpolate=False))
