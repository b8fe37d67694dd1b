"""The listening side of Kiln's HTTP layer: accept, expire idle connections, shut down gracefully.

It offers what `control/server.py` uses of a `uvicorn.Server` (`serve(sockets=...)`
and `should_exit`), so the inference port can run on either (`KILN_HTTP`).
Housekeeping runs on one timer for all connections instead of a timer per
request: every 0.1 s it checks for shutdown, every 0.5 s it sweeps the
connections for the edge limits (`edge.py`: head deadline, body idle time,
keep-alive idle time), every second it refreshes the `date` header. The
connection cap is checked when a connection is accepted (`admit`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from email.utils import formatdate
from typing import Any

from kiln.protocols.edge import EVICT_AFTER_S, EdgeLimits
from kiln.protocols.fast_http import FastHttpProtocol
from kiln.protocols.fast_http_exchange import Outbox

TICK_S = 0.1
SWEEP_TICKS = 5  # edge deadlines are checked every 0.5 s: a limit holds to within that
BACKLOG = 2048


def date_line() -> bytes:
    return b"date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"


class FastHttpServer:
    """Serves an ASGI app (HTTP only, no lifespan) with `FastHttpProtocol`."""

    def __init__(self, app: Any, grace_s: float = 30.0, limits: EdgeLimits | None = None) -> None:
        self.app = app
        self.grace_s = grace_s
        self.limits = limits or EdgeLimits()
        self.cap = int(self.limits.max_connections)  # lowered to the fd limit by serve()
        self.refused = 0  # connections answered 503 at the cap
        self.evicted = 0  # waiting connections closed to make room at the cap
        self.should_exit = False
        self.connections: set[FastHttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # requests whose app still runs
        self.date_line = date_line()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.outbox: Outbox = None  # type: ignore[assignment]  # complete answers written together
        self._servers: list[asyncio.AbstractServer] = []

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Serve on already bound sockets until `should_exit`, then drain and close."""
        self.loop = asyncio.get_running_loop()
        self.outbox = Outbox(self.loop)
        self.cap = self.limits.connection_cap()
        for sock in sockets:
            server = await self.loop.create_server(
                lambda: FastHttpProtocol(self), sock=sock, backlog=BACKLOG
            )
            self._servers.append(server)
        ticks = 0
        while not self.should_exit:
            await asyncio.sleep(TICK_S)
            ticks += 1
            if ticks % SWEEP_TICKS == 0:
                self.sweep()
                if ticks % 10 == 0:
                    self.date_line = date_line()
        await self.shutdown()

    def sweep(self) -> None:
        """Close connections past an edge deadline (head, body silence, keep-alive idle)."""
        now = self.loop.time()
        for conn in list(self.connections):
            conn.expire(now)

    def admit(self, conn: FastHttpProtocol) -> bool:
        """Room for one more connection? At the cap, the longest-waiting idle one makes room.

        A connection that has waited over a second for a head (idle keep-alive,
        or a client dribbling its head: slowloris) is closed for the new one; a
        flood of slow connections then cannot hold the port. When every
        connection is busy or new, the newcomer is refused (503).
        """
        if len(self.connections) < self.cap:
            return True
        cutoff = conn.last_active - EVICT_AFTER_S
        victim = None
        for other in self.connections:
            if other.idle_since <= cutoff and other.head_since <= cutoff and other.waiting():
                if victim is None or max(other.idle_since, other.head_since) < max(
                    victim.idle_since, victim.head_since
                ):
                    victim = other
        if victim is None:
            self.refused += 1
            return False
        self.evicted += 1
        self.connections.discard(victim)
        victim.transport.close()
        return True

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
