"""The server's three ports: bound first, then served by their HTTP servers.

Apart from `server.py` because it is the seam between the machine and the
apps: which socket, which HTTP layer, which app, which edge limits. The ports
are bound before anything else (so `--port 0` resolves and a busy port fails
at once) and start answering before any API loads: liveness (`/healthz`,
`/v2/health/live`) must answer from the first instant, or a Kubernetes
liveness probe kills a server that is only loading its models.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import uvicorn

from kiln.control.host import ServerError, bind_socket

SHUTDOWN_GRACE_S = 30
DEFAULT_HTTP = "kiln"  # the inference port's HTTP layer unless KILN_HTTP says otherwise


class _Uvicorn(uvicorn.Server):
    """uvicorn, minus its signal handling: the Kiln server owns SIGINT/SIGTERM.

    On httptools (the management and metrics ports) its connections get the edge
    limits (protocols/edge.py: head deadline and size, body idle time, keep-alive,
    a connection cap) before the app, and so the API key check, sees a request.
    """

    def __init__(self, config: uvicorn.Config, edge: Any = None) -> None:
        if config.http == "httptools":
            from kiln.protocols.edge_uvicorn import guard_uvicorn

            guard_uvicorn(config, edge)  # edge: an EdgeLimits, None for the defaults
        super().__init__(config)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def inference_server(app: Any, edge: Any = None) -> Any:
    """The inference port's HTTP server: Kiln's own (`KILN_HTTP=kiln`) or uvicorn's.

    Kiln's writes each answer in one system call and skips uvicorn's generic
    per-request work (docs/performance.md); `KILN_HTTP=httptools` (or `h11`)
    keeps uvicorn for comparison. Both expose `serve(sockets=...)` and `should_exit`.
    """
    http = os.environ.get("KILN_HTTP", DEFAULT_HTTP)
    if http == "kiln":
        from kiln.protocols.fast_http_server import FastHttpServer

        return FastHttpServer(app, grace_s=SHUTDOWN_GRACE_S, limits=edge)
    config = uvicorn.Config(
        app,
        http=http,
        lifespan="off",
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # no X-Forwarded-* rewriting on the hot path
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return _Uvicorn(config, edge)


def side_server(app: Any, edge: Any, grace: int | None = SHUTDOWN_GRACE_S) -> _Uvicorn:
    """The management or metrics port: uvicorn on httptools, behind the edge limits."""
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace,
    )
    return _Uvicorn(config, edge)


@dataclass
class Ports:
    """The bound listening sockets (management and metrics: None when turned off)."""

    inference: socket.socket
    management: socket.socket | None = None
    metrics: socket.socket | None = None

    def close(self) -> None:
        for sock in (self.inference, self.management, self.metrics):
            if sock is not None:
                sock.close()


def bind_ports(host: str, port: int, management: int | None, metrics: int | None) -> Ports:
    """Bind all three ports or none; the error names the flag of the busy one."""
    ports = Ports(bind_socket(host, port))
    for name, number in (("management", management), ("metrics", metrics)):
        if number is None:
            continue
        try:
            setattr(ports, name, bind_socket(host, number))
        except ServerError as exc:
            ports.close()
            raise ServerError(str(exc).replace("--port", f"--{name}-port", 1)) from None
    return ports
