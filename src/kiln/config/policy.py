"""What a kiln.yaml may reach: where ``${VAR}`` comes from, where paths may point,
and which names an ``env:`` mapping may set.

Three policies, chosen by whoever loads the config:

- ``LOCAL`` (``kiln serve DIR``, ``kiln validate``, the CLI before a deploy): the
  developer's own machine; ``${VAR}`` reads the process environment and paths may
  be absolute.
- ``ADMIN`` (a deployment of the server's admin): ``${VAR}`` reads the project's
  ``.env``, ``env:`` mappings and the server variables ``--pass-env`` allows;
  absolute local paths are allowed.
- ``USER`` (a deployment of any other user): ``${VAR}`` reads only the project's
  ``.env`` and ``env:`` mappings, and every local path must resolve inside the
  uploaded project after following links.

The caller builds the variables (:func:`server_variables`, :func:`expand_dotenv`)
and hands them to ``load_project(env=..., policy=...)``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kiln.config.errors import FieldProblem

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV: frozenset[str] = frozenset(
    {
        "PYTHONPATH",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
    }
)
RESERVED_ENV_PREFIX = "KILN_"


@dataclass(frozen=True)
class ConfigPolicy:
    """How strictly a kiln.yaml is read (see the module docstring)."""

    name: str
    confine_paths: bool
    """Every local path must resolve inside the project folder (after following links)."""
    unset_message: str
    """The problem for an unset ``${VAR}``; ``{name}`` is the variable."""
    unset_fix: str
    """How to fix it; ``{name}`` is the variable."""
    check_dotenv_names: bool = False
    """The project's ``.env`` may not set reserved names either (users' deployments)."""

    def unset(self, name: str) -> tuple[str, str]:
        return self.unset_message.format(name=name), self.unset_fix.format(name=name)


LOCAL = ConfigPolicy(
    "local",
    confine_paths=False,
    unset_message="environment variable {name} is not set (used as ${{{name}}})",
    unset_fix="export {name}=... before running kiln, or give a default: ${{{name}:-value}}",
)
ADMIN = ConfigPolicy(
    "admin",
    confine_paths=False,
    unset_message=(
        "variable {name} is not set (used as ${{{name}}}); a deployment reads variables from "
        "the project's .env and its env: mappings, and from the server's environment only "
        "for names that `kiln server start --pass-env` allows"
    ),
    unset_fix=(
        "add {name}=... to the project's .env or to an env: mapping, start the server with "
        "--pass-env '{name}', or give a default: ${{{name}:-value}}"
    ),
)
USER = ConfigPolicy(
    "user",
    confine_paths=True,
    unset_message=(
        "variable {name} is not set (used as ${{{name}}}); a user's kiln.yaml reads "
        "variables only from the project's .env and its env: mappings, never from the "
        "server's environment"
    ),
    unset_fix=(
        "add {name}=... to the project's .env (deployed with it) or to an env: mapping, "
        "or give a default: ${{{name}:-value}}"
    ),
    check_dotenv_names=True,
)


def env_name_problem(name: object) -> tuple[str, str] | None:
    """Why ``name`` cannot be set through ``env:`` or a user's ``.env`` (message, fix), or None."""
    if not isinstance(name, str) or not ENV_NAME.match(name):
        return (
            f"invalid variable name {name!r}",
            "use letters, digits and '_', not starting with a digit, e.g. MY_SETTING",
        )
    if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
        fix = {
            "PYTHONPATH": "list import folders in python_path instead",
        }.get(name, "ask for devices with compute.gpu instead")
        if name.startswith(RESERVED_ENV_PREFIX):
            fix = "choose another name; KILN_* variables are set by Kiln itself"
        return f"{name} is set by Kiln for every worker and cannot be overridden", fix
    return None


def check_env(value: object) -> dict[str, str]:
    """Validate an ``env:`` mapping (names and text values); raise FieldProblem."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldProblem(
            "env must be a mapping of variable names to values",
            "write env: followed by indented NAME: value lines",
        )
    out: dict[str, str] = {}
    for name, item in value.items():
        problem = env_name_problem(name)
        if problem is not None:
            raise FieldProblem(problem[0], problem[1], field=str(name))
        if isinstance(item, dict | list):
            raise FieldProblem(
                f"the value of {name} must be text, got a {type(item).__name__}",
                "write one value per variable; quote it if it contains ': ' or starts with '{'",
                field=str(name),
            )
        if isinstance(item, bool):
            item = "true" if item else "false"
        out[name] = "" if item is None else str(item)
    return out


def server_variables(environ: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """The server variables whose names match one of ``patterns`` (fnmatch globs,
    case-sensitive): what an admin's kiln.yaml may read as ``${VAR}``."""
    pats = [p for p in patterns if p]
    return {k: v for k, v in environ.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}


def expand_dotenv(raw: Mapping[str, str | None], base: Mapping[str, str]) -> dict[str, str]:
    """The values of a ``.env`` read without interpolation, with ``${VAR}`` expanded from
    the variables above them in the file and then ``base`` (never the process environment);
    an unknown variable becomes empty, as python-dotenv does."""
    from kiln.config.source import substitute_env

    out: dict[str, str] = {}
    for name, value in raw.items():
        if value is None:
            continue
        out[name], _ = substitute_env(value, {**base, **out}, unset="")
    return out
