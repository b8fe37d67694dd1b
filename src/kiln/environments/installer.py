"""The two uv calls that build an environment: decide what is missing, then install only that.

Why two steps instead of one `uv pip install --target`: a target folder is
empty as far as uv is concerned, so it would download numpy (or a CUDA build
of torch) again even though the server already has it. Instead:

1. `uv pip install --dry-run --python <server's interpreter>` resolves the
   requirements against the server's own site-packages, with every installed
   distribution pinned as a constraint (`name==version`). Whatever the server
   already satisfies is taken from there (its metadata is read locally, nothing
   is fetched), and a requirement that would need a different version of an
   installed package is a conflict, reported by uv. The dry run lists the
   packages that are missing.
2. `uv pip install --target <env>/site --no-deps` installs exactly those pins.

uv reads its usual settings from the server's environment (`UV_FIND_LINKS`,
`UV_OFFLINE`, `UV_NO_INDEX`, `UV_INDEX_URL`, `UV_CACHE_DIR`, ...), which is how
offline installs from a wheel folder work.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kiln.errors import KilnError

UV_TIMEOUT_S = 900.0
_PLAN_LINE = re.compile(r"^ ([+-]) (\S.*)$")
_FROM_URL = re.compile(r"^(\S+?)==\S+ \(from (.+)\)$")
# Options of a requirements file that say where packages come from; the install step
# needs them too, since it reads the pins from a file of its own.
_SOURCE_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--no-index")


# Never build an sdist: its setup code would run in the server process's context.
_WHEELS_ONLY = ["--only-binary", ":all:"]


class BuildFailed(KilnError):
    """The project's requirements could not be installed; the message is uv's."""

    type = "EnvironmentBuildFailed"
    status = 400


def uv_binary() -> str:
    """uv's executable, from the `uv` package Kiln depends on."""
    try:
        from uv import find_uv_bin
    except ImportError:  # pragma: no cover - uv is a dependency
        raise BuildFailed(
            "this project has a requirements.txt, and installing it needs uv: pip install uv"
        ) from None
    return find_uv_bin()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "UV_NO_PROGRESS": "1"}
    env.pop("VIRTUAL_ENV", None)  # the interpreter is always named with --python
    try:
        return subprocess.run(
            [uv_binary(), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=UV_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"uv did not finish within {UV_TIMEOUT_S:.0f}s") from None


def uv_message(stderr: str) -> str:
    """uv's error without its chatter (which interpreter it used, how long it took)."""
    keep = [
        line.rstrip()
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("Using Python", "Using CPython", "Resolved "))
    ]
    return "\n".join(keep[:30]) or "uv failed without a message"


def missing_packages(
    requirement_files: list[Path], constraints: Path, cwd: Path, wheels_only: bool = False
) -> list[str]:
    """The pins (`name==version`, or `name @ url`) the server lacks; [] if it has them all."""
    args = ["pip", "install", "--dry-run", "--python", sys.executable, "--break-system-packages"]
    args += _WHEELS_ONLY if wheels_only else []
    for path in requirement_files:
        args += ["-r", str(path)]
    done = _run([*args, "-c", str(constraints)], cwd)
    if done.returncode != 0:
        raise BuildFailed(uv_message(done.stderr) + _pinned_hint(done.stderr, constraints))
    pins: list[str] = []
    replaced: list[str] = []
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        match = _PLAN_LINE.match(line)
        if match is None:
            continue
        sign, spec = match.groups()
        url = _FROM_URL.match(spec)
        spec = f"{url.group(1)} @ {url.group(2)}" if url else spec
        (pins if sign == "+" else replaced).append(spec)
    if replaced:
        raise BuildFailed(
            "the requirements need other versions of packages the server has: "
            + ", ".join(f"{old} (installed)" for old in replaced)
            + "; require the server's versions, or install Kiln beside the versions you need"
        )
    return pins


def _pinned_hint(stderr: str, constraints: Path) -> str:
    """Say so when uv's conflict is with one of the server's pinned packages."""
    pins = constraints.read_text(encoding="utf-8").split()
    named = [pin for pin in pins if pin in stderr]
    if not named:
        return ""
    return (
        f"\n({', '.join(named[:3])} {'is' if len(named) == 1 else 'are'} installed in the "
        f"server's environment; a requirements.txt can add packages but not change the "
        f"server's versions)"
    )


def source_options(requirement_files: list[Path]) -> list[str]:
    """Index and find-links lines of the requirement files, with relative folders made absolute."""
    lines = []
    for path in requirement_files:
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.split(" #", 1)[0].strip()
            flag = next((o for o in _SOURCE_OPTIONS if line == o or line.startswith(o)), None)
            if flag is None:
                continue
            value = line[len(flag) :].lstrip(" =")
            if flag in ("-f", "--find-links") and value and "://" not in value:
                local = path.parent / value
                value = str(local.resolve()) if local.exists() else value
            lines.append(f"{flag} {value}".strip())
    return lines


def install(
    pins: list[str],
    options: list[str],
    target: Path,
    progress: Callable[[str], None],
    wheels_only: bool = False,
) -> None:
    """Install exactly `pins` (no dependencies: the dry run already chose them) into `target`."""
    pins_file = target.parent / "pins.txt"
    pins_file.write_text("\n".join([*options, *pins]) + "\n", encoding="utf-8")
    shown = ", ".join(pins[:5]) + (f" and {len(pins) - 5} more" if len(pins) > 5 else "")
    progress(f"installing {len(pins)} package{'s' if len(pins) != 1 else ''}: {shown}")
    done = _run(
        [
            "pip",
            "install",
            "--python",
            sys.executable,
            "--target",
            str(target),
            "--no-deps",
            "--compile-bytecode",  # workers may see the folder read-only: no .pyc written later
            *(_WHEELS_ONLY if wheels_only else []),
            "-r",
            str(pins_file),
        ],
        target.parent,
    )
    if done.returncode != 0:
        raise BuildFailed(uv_message(done.stderr))
