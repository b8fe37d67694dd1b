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
    root: Path = Path(".")
    lines: tuple[tuple[Path, str], ...] = ()  # (file, line) of every file read, includes too
    outside: tuple[str, ...] = ()  # includes that point out of the project (never read)

    def problems(self, restricted: bool) -> list[str]:
        """What this server refuses to install from these files.

        Always: files or folders outside the project (a requirements file must not read
        the server's files, e.g. `-r ~/.kiln/admin.key`, whose text uv's error would
        echo), and editable installs. `restricted` (a user's deploy on a shared
        server): also index and find-links options and URL requirements, since the
        server would fetch them for the user; the server's own index settings apply.
        """
        found = [f"-r/-c {target}: outside the project" for target in self.outside]
        root = self.root.resolve()
        for path, raw in self.lines:
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#") or _include_target(line) is not None:
                continue
            if line.startswith(("-e", "--editable")):
                found.append(f"{line}: editable installs are not supported")
                continue
            option = next((o for o in _SOURCE_FLAGS if line == o or line.startswith(o)), None)
            if option is not None and restricted:
                found.append(f"{line}: package sources are the server's choice on this server")
                continue
            for local in _local_paths(line, option):
                target = (path.parent / local).resolve()
                if not target.is_relative_to(root):
                    found.append(f"{line}: {local} is outside the project")
            if restricted and option is None and _is_url_requirement(line):
                found.append(f"{line}: URL requirements are not allowed on this server")
        return found


_SOURCE_FLAGS = (
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--no-index",
    "--trusted-host",
)


def _local_paths(line: str, option: str | None) -> list[str]:
    """The local files or folders a requirements line names (relative or absolute)."""
    if option in ("-f", "--find-links"):
        value = line[len(option) :].lstrip(" =")
        if value.startswith("file:"):
            return [value.removeprefix("file://").removeprefix("file:")]
        return [value] if value and "://" not in value else []
    if option is not None or line.startswith("-"):
        return []
    spec = line.split(" @ ", 1)[1].strip() if " @ " in line else line
    if spec.startswith("file:"):
        return [spec.removeprefix("file://").removeprefix("file:")]
    if spec.startswith((".", "/", "~")) or spec.endswith((".whl", ".tar.gz", ".zip")):
        return [spec.split(";", 1)[0].strip()] if "://" not in spec else []
    return []


def _is_url_requirement(line: str) -> bool:
    spec = line.split(" @ ", 1)[1] if " @ " in line else line
    return "://" in spec and not spec.strip().startswith("file:")


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
    lines: list[tuple[Path, str]] = []
    outside: list[str] = []
    texts = [_expanded(path, root.resolve(), 0, lines, outside) for path in files]
    if not any(_has_requirement(t) for t in texts):
        return None
    text = "\n".join(texts)
    digest = hashlib.sha256()
    for part in ("kiln-env/1", kiln_version(), interpreter_tag(), text):
        digest.update(part.encode())
        digest.update(b"\0")
    names = " and ".join(f.relative_to(root).as_posix() for f in files)
    return Requirements(
        files, text, digest.hexdigest()[:KEY_LENGTH], names, root, tuple(lines), tuple(outside)
    )


def _expanded(
    path: Path, root: Path, depth: int, lines: list[tuple[Path, str]], outside: list[str]
) -> str:
    """The file's text with every `-r`/`-c` include appended (they change what gets installed).

    An include that leaves the project is never read, only noted in `outside`.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"# unreadable {path.name}: {exc.strerror}\n"
    lines.extend((path, line) for line in text.splitlines())
    parts = [text]
    if depth < _MAX_INCLUDE_DEPTH:
        for line in text.splitlines():
            target = _include_target(line)
            if target is None:
                continue
            included = (path.parent / target).resolve()
            if not included.is_relative_to(root):
                outside.append(target)
                continue
            parts.append(
                f"# include {target}\n" + _expanded(included, root, depth + 1, lines, outside)
            )
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
