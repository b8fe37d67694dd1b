"""The server's ports once bound: gRPC bound with the others, the app each port serves,
and what is announced about them (`RunningServer` for `on_ready`, `server.json` for the CLI).

Apart from `server.py` because it is the wiring between the registry and the
machine, not the server's lifecycle: which app answers on which port (the
inference app, the management app with the control-plane REST routes, the key
gate and the console in front, the metrics app), the gRPC port over the
inference app's own data plane (one admission, metering and error mapping for
both transports), and the addresses a caller is told. Sockets themselves are
`listeners.py` and `host.py`. `server` is the `InferenceServer` and `options` its
`ServerOptions`, typed `Any`: naming them would import `server.py` back, a cycle.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from kiln.control.host import ServerError, kiln_version
from kiln.control.listeners import SHUTDOWN_GRACE_S, Ports, _Uvicorn, inference_server, side_server
from kiln.protocols.app import InferenceApp
from kiln.serving.router import ServedApi


@dataclass
class RunningServer:
    """What `on_ready` learns once the server is listening."""

    url: str
    host: str
    port: int
    apis: list[ServedApi]
    management_url: str | None = None
    management_port: int | None = None
    metrics_url: str | None = None
    metrics_port: int | None = None
    grpc_port: int | None = None  # None: no gRPC port
    grpc_tls: bool = False

    @property
    def grpc_address(self) -> str | None:
        """`host:port` of the gRPC port (what a gRPC client dials), None when off."""
        if self.grpc_port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"


@dataclass
class Listening:
    """The HTTP servers on the ports, and the coroutines that serve until `request_stop`."""

    inference: Any  # _Uvicorn or FastHttpServer (KILN_HTTP)
    management: _Uvicorn | None
    metrics: _Uvicorn | None
    serving: list[Awaitable[None]]

    def request_stop(self) -> None:
        for server in (self.inference, self.management, self.metrics):
            if server is not None:
                server.should_exit = True


def bind_grpc(options: Any, log: Any, metrics: Any) -> Any:
    """Bind the gRPC port with the others (None: off, or the extra is missing and the
    port was not asked for, which is said once on stderr)."""
    if options.grpc_port is None:
        return None
    from kiln.protocols import grpc as kiln_grpc

    if not kiln_grpc.available():
        if options.grpc_required:
            raise ServerError(kiln_grpc.missing_message())
        print(f"gRPC: off; {kiln_grpc.missing_message()}", file=sys.stderr, flush=True)
        return None
    from kiln.protocols.grpc.server import GrpcBindError, GrpcServer

    grpc_server = GrpcServer(log, metrics)
    try:
        grpc_server.bind(
            options.host, options.grpc_port, options.grpc_tls_cert, options.grpc_tls_key
        )
    except GrpcBindError as exc:
        raise ServerError(f"{exc}; choose another with --grpc-port (0: a free one)") from None
    except OSError as exc:  # the certificate or key cannot be read
        raise ServerError(
            f"cannot read the gRPC TLS certificate or key: {exc}; check "
            f"--grpc-tls-cert and --grpc-tls-key"
        ) from None
    return grpc_server


def serve_ports(server: Any, ports: Ports, grpc: Any) -> Listening:
    """The HTTP servers of the three ports (and gRPC's), ready to serve until `should_exit`."""
    edge = server.options.edge
    app = InferenceApp(
        server.registry, server.log, metrics=server.metrics, auth=server.quotas, jobs=server.jobs
    )
    inference = inference_server(app, edge)
    serving = [inference.serve(sockets=[ports.inference])]
    management: _Uvicorn | None = None
    metrics_server: _Uvicorn | None = None
    management_for_grpc: Any = None
    if ports.management is not None:
        from kiln.control.rest import control_routes
        from kiln.protocols.management import build_management_app

        management_app: Any = build_management_app(
            server.registry, server.log, server, extra_routes=control_routes(server)
        )
        if server.quotas is not None:
            from kiln.protocols.auth import ManagementGate

            management_app = ManagementGate(management_app, server.quotas)
        management_for_grpc = management_app
        management_app = _with_console(server, management_app)
        management = side_server(management_app, edge)
        serving.append(management.serve(sockets=[ports.management]))
    if ports.metrics is not None:
        from kiln.control.metrics import metrics_app

        metrics: Any = metrics_app(server.metrics)
        if server.quotas is not None:  # API keys on: a scrape needs a `manage` key
            from kiln.protocols.auth import ManagementGate

            metrics = ManagementGate(metrics, server.quotas)
        metrics_server = side_server(metrics, edge, grace=None)
        serving.append(metrics_server.serve(sockets=[ports.metrics]))
    if grpc is not None:  # the same data plane: one admission, metering, mapping
        grpc.attach(app.plane, management_for_grpc)
        serving.append(grpc.serve(SHUTDOWN_GRACE_S))
    return Listening(inference, management, metrics_server, serving)


def _with_console(server: Any, management_app: Any) -> Any:
    """`/console` in front of the (gated) management app, reading and changing through it."""
    from kiln.console.front import ConsoleFront, Rest
    from kiln.console.pages import console_app

    console = console_app(Rest(management_app), server.quotas, server.store, server.options.host)
    return ConsoleFront(management_app, console)


def running_server(ports: Ports, grpc: Any, apis: list[ServedApi]) -> RunningServer:
    """The bound ports' addresses (port 0 resolved), as `on_ready` and server.json give them."""
    host, port = ports.inference.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    running = RunningServer(f"http://{url_host}:{port}", host, port, apis)
    if ports.management is not None:
        running.management_port = ports.management.getsockname()[1]
        running.management_url = f"http://{url_host}:{running.management_port}"
    if ports.metrics is not None:
        running.metrics_port = ports.metrics.getsockname()[1]
        running.metrics_url = f"http://{url_host}:{running.metrics_port}/metrics"
    if grpc is not None:
        running.grpc_port, running.grpc_tls = grpc.port, grpc.tls
    return running


def server_json(server: Any, running: RunningServer) -> dict[str, Any]:
    """What `server.json` says: where each port is, and how the server runs (the CLI reads it)."""
    options = server.options
    return {
        "pid": os.getpid(),
        "url": running.url,
        "host": running.host,
        "ports": {
            "inference": running.port,
            "management": running.management_port,
            "metrics": running.metrics_port,
        },
        # Its own key, not under "ports" (whose three keys clients compare as a whole).
        "grpc": (
            None
            if running.grpc_port is None
            else {
                "port": running.grpc_port,
                "address": running.grpc_address,
                "tls": running.grpc_tls,
            }
        ),
        "management_url": running.management_url,
        "metrics_url": running.metrics_url,
        "project": str(server.project.root) if server.project is not None else None,
        "home": str(options.home),
        "mode": options.mode,
        "auth": options.auth,
        "sandbox": server.sandbox_message,
        "admin_key_file": str(server.admin_key_file) if server.admin_key_file else None,
        "version": kiln_version(),
        "started": time.time(),
    }
