"""The server's installed distributions, as the constraints every environment is built under.

Pinning each installed package to its version means a project can only add
packages: a `torch` or `numpy` requirement is satisfied by the server's own copy
(never downloaded, never a CUDA build replacing a CPU one), and a requirement
that needs another version of an installed package fails at deploy with uv's
explanation instead of shadowing the server's copy inside a worker.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

_SEPARATORS = re.compile(r"[-_.]+")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!_-]*$")  # PEP 440-looking; others cannot be pinned


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return _SEPARATORS.sub("-", name).lower()


def _name_and_version(dist: importlib.metadata.Distribution) -> tuple[str | None, str]:
    """From the `.dist-info` folder's name when it has one (reading every METADATA file
    costs ~0.4 s in a large environment); from the metadata otherwise."""
    folder = getattr(dist, "_path", None)
    if isinstance(folder, Path) and folder.suffix == ".dist-info" and "-" in folder.stem:
        name, version = folder.stem.split("-", 1)
        if _VERSION.match(version):
            return name, version
    return (dist.metadata["Name"] if dist.metadata else None), dist.version or ""


def _site_stamp() -> tuple[tuple[str, int], ...]:
    """The import path's folders with their modification times: an install changes one."""
    stamp = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            stamp.append((entry, os.stat(entry or ".").st_mtime_ns))
    return tuple(stamp)


_cache: tuple[tuple[tuple[str, int], ...], dict[str, str]] | None = None


def installed_versions() -> dict[str, str]:
    """Normalized name -> version of every distribution the server can import (first wins).

    Remembered until a folder on sys.path changes (a package installed or removed).
    """
    global _cache
    stamp = _site_stamp()
    if _cache is not None and _cache[0] == stamp:
        return dict(_cache[1])
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name, version = _name_and_version(dist)
        if not name:
            continue
        key = normalize(name)
        if key not in found and _VERSION.match(version):
            found[key] = version
    _cache = (stamp, found)
    return dict(found)


def write_constraints(path: Path) -> Path:
    """A constraints file pinning every installed distribution to its installed version."""
    lines = [f"{name}=={version}" for name, version in sorted(installed_versions().items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
