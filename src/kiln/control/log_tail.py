"""Streaming a log file to an HTTP client: its last lines, then new ones as they land.

Shared by `GET /apis/{name}/logs` and a job's logs; `flush` pushes the
server's buffered records out first, `ended` stops following once the thing
being logged is gone (a finished job).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

POLL_S = 0.25


async def tail_lines(
    path: Path,
    tail: int,
    follow: bool,
    request: Any,
    *,
    flush: Callable[[], None] | None = None,
    ended: Callable[[], bool] | None = None,
) -> AsyncIterator[bytes]:
    if flush is not None:
        flush()
    position = 0
    if path.exists():
        data = await asyncio.to_thread(path.read_bytes)
        lines = data.splitlines(keepends=True)
        for line in lines[-tail:] if tail > 0 else []:
            yield line
        position = len(data)
    while follow:
        if await request.is_disconnected():
            return
        done = ended() if ended is not None else False
        await asyncio.sleep(POLL_S)
        if flush is not None:
            flush()
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < position:  # rotated or truncated
            position = 0
        if size > position:
            with path.open("rb") as f:
                f.seek(position)
                chunk = f.read(size - position)
            cut = chunk.rfind(b"\n") + 1
            if cut:
                yield chunk[:cut]
                position += cut
        elif done:
            return
        else:
            yield b""  # lets the server notice a client that went away
