"""Cortex's include/exclude patterns for file sources.

``**`` matches across folders, ``*`` and ``?`` within one path part, ``[abc]`` a
class. A path is kept when there are no includes or any include matches, then
dropped when any exclude matches. For convenience a pattern without a ``/`` is
also tried against the file name alone, so ``*.jpg`` works like ``**.jpg``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=256)
def compile_glob(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _matches(pattern: str, path: str, relative: str) -> bool:
    rx = compile_glob(pattern)
    if rx.match(path) or rx.match(relative):
        return True
    return "/" not in pattern and bool(rx.match(path.rsplit("/", 1)[-1]))


def keep(path: str, relative: str, includes: Sequence[str], excludes: Sequence[str]) -> bool:
    """Cortex's rule: any include (or none given), and no exclude."""
    if includes and not any(_matches(p, path, relative) for p in includes):
        return False
    return not any(_matches(p, path, relative) for p in excludes)
