"""The HTTP edge's limits: how long a client may take, how many may be connected, how big a head.

These are server options (`kiln serve` / `kiln server start|run` flags such as
`--max-connections`, and server.yaml's `edge:`), never kiln.yaml:
they protect the process from its clients before any API, key or quota is
known. Kiln's HTTP layer (`fast_http*.py`, the inference port) enforces them
itself; `guard_uvicorn` puts the same limits on a uvicorn port (management,
metrics) before the app, and so before the API key, sees a request.

Defaults (docs/config.md, "Edge limits"): nginx waits 60 s for a head and
between body reads, uvicorn keeps an idle connection 5 s; Kiln's answers are
model calls, so its clients are programs, and 10 s for a head and 30 s of
silence in a body are generous for them while bounding what a slow client
(slowloris) can hold.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FD_RESERVE = (
    256  # descriptors kept for workers, logs, the store, when sizing the cap to the fd limit
)
EVICT_AFTER_S = 1.0  # at the cap, a connection idle or in its head this long may make room


@dataclass(frozen=True)
class EdgeLimits:
    """Per-port limits on clients, enforced before a request reaches the app.

    - `header_timeout_s`: a request's line and headers must arrive within this,
      counted from the connection's start (first request) or the head's first
      byte (later ones); else 408 and close (a silent connection just closes).
    - `body_idle_timeout_s`: a body that stops arriving for this long is cut:
      408 if nothing was answered yet, and the connection closes.
    - `keepalive_timeout_s`: an idle keep-alive connection closes after this.
    - `max_connections`: open connections on the port. A new one over the cap
      takes the place of the oldest connection that has waited at least 1 s
      for a head (idle keep-alive or a slow head); if none, it is answered
      `503` with `Retry-After: 1` and closed at once.
    - `max_header_bytes`: request line plus headers; larger is 431 and close.
    """

    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1000
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"edge.{f.name} must be a positive number, not {value!r}")
        if self.max_connections != int(self.max_connections):
            raise ValueError(
                f"edge.max_connections must be a whole number, not {self.max_connections!r}"
            )
        if self.max_header_bytes < 1024:
            raise ValueError(
                f"edge.max_header_bytes must be at least 1024, not {self.max_header_bytes!r}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> EdgeLimits:
        """From a server option block (`edge: {...}`): unknown keys fail, missing ones default."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown edge setting(s): {', '.join(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)

    def connection_cap(self) -> int:
        """`max_connections`, lowered to fit the descriptor limit (raised first if allowed).

        Running out of descriptors is worse than the cap: accept() fails and
        the loop stops accepting for a while, for every client.
        """
        want = int(self.max_connections) + FD_RESERVE
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY and soft < want:
                new = want if hard == resource.RLIM_INFINITY else min(want, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
        except (OSError, ValueError):  # pragma: no cover - platform without the limit
            return int(self.max_connections)
        if soft == resource.RLIM_INFINITY:
            return int(self.max_connections)
        return max(1, min(int(self.max_connections), soft - FD_RESERVE))


def error_body(kind: str, message: str) -> bytes:
    return b'{"error":{"type":"%s","message":"%s"}}' % (kind.encode(), message.encode())
