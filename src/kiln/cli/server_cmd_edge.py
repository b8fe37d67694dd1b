"""The edge flags (and the gRPC, OTLP and busy-poll ones) shared by `kiln serve` and
`kiln server start|run`.

One flag per `edge:` key of `KILN_HOME/server.yaml` (kiln.protocols.edge.EdgeLimits):
`kiln server start|run` saves what it is given under `edge:`, `kiln serve` uses
them for its run only. A bad value stops the command with the flag's name and
what it accepts, before anything starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.protocols.edge import EdgeLimits

# edge: key -> its flag
EDGE_FLAGS: dict[str, str] = {
    "header_timeout_s": "--header-timeout-s",
    "body_idle_timeout_s": "--body-idle-timeout-s",
    "keepalive_timeout_s": "--keepalive-timeout-s",
    "max_connections": "--max-connections",
    "max_header_bytes": "--max-header-bytes",
}

_PANEL = "Edge limits (per port, before any API or key is known)"

HeaderTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--header-timeout-s",
        help="Seconds a request line and headers may take to arrive (default 10); else 408.",
        rich_help_panel=_PANEL,
    ),
]
BodyIdleTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--body-idle-timeout-s",
        help="Seconds a request body may stop arriving before it is cut (default 30).",
        rich_help_panel=_PANEL,
    ),
]
KeepaliveTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--keepalive-timeout-s",
        help="Seconds an idle keep-alive connection stays open (default 5).",
        rich_help_panel=_PANEL,
    ),
]
MaxConnectionsOption = Annotated[
    int | None,
    typer.Option(
        "--max-connections",
        help="Open connections per port (default 1000); over it, the longest-idle one makes "
        "room, else the newcomer gets 503 with Retry-After: 1.",
        rich_help_panel=_PANEL,
    ),
]
MaxHeaderBytesOption = Annotated[
    int | None,
    typer.Option(
        "--max-header-bytes",
        help="Largest request line plus headers, in bytes (default 65536, at least 1024); "
        "larger gets 431.",
        rich_help_panel=_PANEL,
    ),
]


class EdgeFlagError(ValueError):
    """An edge flag has a value the edge cannot use; the message names the flag."""


def given_edge(params: Mapping[str, Any]) -> dict[str, Any]:
    """The edge flags among a command's parameters that were given (not None)."""
    return {key: params[key] for key in EDGE_FLAGS if params.get(key) is not None}


def check_edge(given: Mapping[str, Any]) -> None:
    """Each given value on its own, so the error names the flag that is wrong."""
    for key, value in given.items():
        try:
            EdgeLimits.from_mapping({key: value})
        except (TypeError, ValueError) as exc:
            message = str(exc).replace(f"edge.{key}", EDGE_FLAGS[key])
            raise EdgeFlagError(message) from None


def edge_limits(given: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> EdgeLimits:
    """The limits to run with: flags given now over the saved `edge:` over the defaults."""
    check_edge(given)
    return EdgeLimits.from_mapping({**(saved or {}), **given})


# ----- the gRPC port (kiln.protocols.grpc) ---------------------------------------------
GRPC_DEFAULT_PORT = 8083
_GRPC_PANEL = "gRPC (Open Inference Protocol V2 and TorchServe; the grpc extra)"

GrpcPortOption = Annotated[
    int | None,
    typer.Option(
        "--grpc-port",
        envvar="KILN_GRPC_PORT",
        help="gRPC port (default: $KILN_GRPC_PORT, else 8083); 0 picks a free one. Needs the "
        "grpc extra: without it an unasked port is skipped with a note, an asked one is an "
        "error.",
        rich_help_panel=_GRPC_PANEL,
    ),
]
GrpcCertOption = Annotated[
    Path | None,
    typer.Option(
        "--grpc-tls-cert",
        help="PEM certificate (chain) for TLS on the gRPC port; with --grpc-tls-key.",
        rich_help_panel=_GRPC_PANEL,
    ),
]
GrpcKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--grpc-tls-key",
        help="PEM private key of --grpc-tls-cert.",
        rich_help_panel=_GRPC_PANEL,
    ),
]


def check_grpc_tls(cert: Path | str | None, key: Path | str | None) -> tuple[Path, Path] | None:
    """Both TLS files or neither, each readable; the message names the flag."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise EdgeFlagError("--grpc-tls-cert and --grpc-tls-key go together: give both")
    paths = (Path(cert).expanduser().resolve(), Path(key).expanduser().resolve())
    for flag, path in zip(("--grpc-tls-cert", "--grpc-tls-key"), paths, strict=True):
        if not path.is_file():
            raise EdgeFlagError(f"{flag} names {path}, which is not a file")
    return paths


# ----- traces (kiln.serving.tracing) ---------------------------------------------------
_TRACE_PANEL = "Traces (OpenTelemetry over OTLP; the otel extra)"

OtlpEndpointOption = Annotated[
    str | None,
    typer.Option(
        "--otlp-endpoint",
        help="Send OpenTelemetry traces to this OTLP collector, e.g. http://127.0.0.1:4318 "
        "(default: the OTEL_EXPORTER_OTLP_* variables; none: tracing off).",
        rich_help_panel=_TRACE_PANEL,
    ),
]
OtlpProtocolOption = Annotated[
    str | None,
    typer.Option(
        "--otlp-protocol",
        help="http/protobuf (default, port 4318) or grpc (port 4317).",
        rich_help_panel=_TRACE_PANEL,
    ),
]


def check_otlp(endpoint: str | None, protocol: str | None) -> None:
    """Refuse a bad --otlp-endpoint/--otlp-protocol before anything starts or is saved;
    the message names the flag (the settings' rules are serving/tracing.py's)."""
    from kiln.control.server_file import otlp_problem

    problem = otlp_problem(endpoint, protocol)
    if problem is not None:
        raise EdgeFlagError(problem)


# ----- busy-polling (kiln.serving.polling) ---------------------------------------------
# ServerOptions.busy_poll_us's default; the CLI states it in its help and server.yaml's.
BUSY_POLL_DEFAULT_US = 500
BUSY_POLL_MAX_US = 100_000
BUSY_POLL_ACCEPTS = f"an int from 0 to {BUSY_POLL_MAX_US} (microseconds; 0: polling off)"

BusyPollOption = Annotated[
    int | None,
    typer.Option(
        "--busy-poll-us",
        help=f"How long the server and its workers poll for an imminent answer before they "
        f"sleep, in microseconds (default {BUSY_POLL_DEFAULT_US}; 0: off). Polling costs CPU "
        f"while a request is in flight and saves the wake-up of a sleeping process "
        f"(docs/performance.md).",
    ),
]


def busy_poll_problem(value: object) -> str | None:
    """Why `value` cannot be the busy-poll limit (what it must be), or None when it can.

    A bound because a window past 0.1 s would spin a CPU through whole requests, where
    sleeping costs tens of microseconds; an int since the limit is counted in them."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be {BUSY_POLL_ACCEPTS}, not {value!r}"
    if not 0 <= value <= BUSY_POLL_MAX_US:
        return f"must be {BUSY_POLL_ACCEPTS}, not {value}"
    return None


def check_busy_poll(value: int | None) -> int:
    """The --busy-poll-us given (its default when None); a bad one names the flag."""
    if value is None:
        return BUSY_POLL_DEFAULT_US
    problem = busy_poll_problem(value)
    if problem is not None:
        raise EdgeFlagError(f"--busy-poll-us {problem}")
    return value
