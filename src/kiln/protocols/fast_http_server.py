"""The listening side of Kiln's HTTP layer: accept, expire idle connections, shut down gracefully.

It offers what `control/server.py` uses of a `uvicorn.Server` (`serve(sockets=...)`
and `should_exit`), so the inference port can run on either (`KILN_HTTP`).
Housekeeping runs on one timer for all connections instead of a timer per
request: every 0.1 s it checks for shutdown, every second it refreshes the
`date` header and closes keep-alive connections idle for longer than
`keep_alive_s` (uvicorn's default, 5 s).
"""

from __future__ import annotations

import asyncio
import socket
import time
from email.utils import formatdate
from typing import Any

from kiln.protocols.fast_http import FastHttpProtocol

TICK_S = 0.1
KEEP_ALIVE_S = 5.0
BACKLOG = 2048


def date_line() -> bytes:
    return b"date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"


class FastHttpServer:
    """Serves an ASGI app (HTTP only, no lifespan) with `FastHttpProtocol`."""

    def __init__(self, app: Any, grace_s: float = 30.0, keep_alive_s: float = KEEP_ALIVE_S) -> None:
        self.app = app
        self.grace_s = grace_s
        self.keep_alive_s = keep_alive_s
        self.should_exit = False
        self.connections: set[FastHttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # requests whose app still runs
        self.date_line = date_line()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._servers: list[asyncio.AbstractServer] = []

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Serve on already bound sockets until `should_exit`, then drain and close."""
        self.loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await self.loop.create_server(
                lambda: FastHttpProtocol(self), sock=sock, backlog=BACKLOG
            )
            self._servers.append(server)
        ticks = 0
        while not self.should_exit:
            await asyncio.sleep(TICK_S)
            ticks += 1
            if ticks % 10 == 0:
                self.date_line = date_line()
                self._expire_idle()
        await self.shutdown()

    def _expire_idle(self) -> None:
        """Close keep-alive connections with nothing in flight and no bytes for a while."""
        cutoff = self.loop.time() - self.keep_alive_s
        for conn in list(self.connections):
            if conn.running is None and not conn.pending and conn.last_active < cutoff:
                conn.transport.close()

    async def shutdown(self) -> None:
        """Stop accepting; finish requests in flight up to the grace period; close the rest.

        Idle keep-alive connections close at once; busy ones answer with
        `connection: close` and close after it. What still runs when the grace
        period ends is cancelled (its client gets a 500 or a cut connection).
        """
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + self.grace_s
        while (self.connections or self.tasks) and self.loop.time() < deadline:
            await asyncio.sleep(TICK_S / 2)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for conn in list(self.connections):
            conn.transport.close()
