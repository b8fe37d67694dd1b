"""What a project asks to have installed, and the key its environment is stored under.

A project lists its packages in `requirements.txt` at its root, and Hub-layout
projects (code under `src/`) in `src/requirements.txt`; both are read when both
exist. The key hashes the requirements' text (files they include with `-r`/`-c`
too), Kiln's version and the interpreter, so that every revision and API whose
requirements read the same shares one environment, and a new Kiln or Python
builds a fresh one instead of reusing packages compiled for another.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REQUIREMENT_FILES = ("requirements.txt", "src/requirements.txt")
KEY_LENGTH = 24  # hex characters of the SHA-256: short folder names, no practical collisions
_INCLUDE_FLAGS = ("-r", "--requirement", "-c", "--constraint")
_MAX_INCLUDE_DEPTH = 8


@dataclass(frozen=True)
class Requirements:
    """A project's requirement files and the environment key they give."""

    files: tuple[Path, ...]
    text: str  # every file's text, includes expanded: exactly what the key covers
    key: str

    names: str  # the files as the user knows them: "requirements.txt", "src/requirements.txt"


def interpreter_tag() -> str:
    """The interpreter an environment is built for: packages with C code are built per tag."""
    version = ".".join(str(v) for v in sys.version_info[:3])
    return f"{sys.implementation.name}-{version}-{sysconfig.get_platform()}-{platform.machine()}"


def kiln_version() -> str:
    from kiln import __version__

    return __version__


def project_requirements(root: Path) -> Requirements | None:
    """The project's requirements, or None when it declares none (no file, or only comments)."""
    root = root.absolute()  # uv runs in another folder
    files = tuple(root / name for name in REQUIREMENT_FILES if (root / name).is_file())
    if not files:
        return None
    texts = [_expanded(path, 0) for path in files]
    if not any(_has_requirement(t) for t in texts):
        return None
    text = "\n".join(texts)
    digest = hashlib.sha256()
    for part in ("kiln-env/1", kiln_version(), interpreter_tag(), text):
        digest.update(part.encode())
        digest.update(b"\0")
    names = " and ".join(f.relative_to(root).as_posix() for f in files)
    return Requirements(files, text, digest.hexdigest()[:KEY_LENGTH], names)


def _expanded(path: Path, depth: int) -> str:
    """The file's text with every `-r`/`-c` include appended (they change what gets installed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"# unreadable {path.name}: {exc.strerror}\n"
    parts = [text]
    if depth < _MAX_INCLUDE_DEPTH:
        for line in text.splitlines():
            target = _include_target(line)
            if target is not None:
                parts.append(f"# include {target}\n" + _expanded(path.parent / target, depth + 1))
    return "\n".join(parts)


def _include_target(line: str) -> str | None:
    line = line.split(" #", 1)[0].strip()
    for flag in _INCLUDE_FLAGS:
        if line.startswith(flag + "="):
            return line[len(flag) + 1 :].strip() or None
        if line.startswith(flag + " "):
            return line[len(flag) :].strip() or None
    return None


def _has_requirement(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())
