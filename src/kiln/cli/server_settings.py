"""What `kiln server start|run` runs with: flags given now over KILN_HOME/server.yaml over defaults.

Apart from `server_cmd.py` because it is the one place the three sources meet
and are checked: every flag is validated before anything is saved (a bad edge
limit, TLS pair, OTLP endpoint, webhook network or busy-poll limit stops the
command with the flag named; a bad server.yaml, with the file and key named),
what was given is saved for later starts, and the result becomes the
`ServerOptions` the server runs with (refusing a non-loopback host without API
keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape

from kiln.cli.common import err_console
from kiln.cli.server_cmd_edge import (
    BUSY_POLL_DEFAULT_US,
    EDGE_FLAGS,
    GRPC_DEFAULT_PORT,
    EdgeFlagError,
    busy_poll_problem,
    check_busy_poll,
    check_edge,
    check_grpc_tls,
    check_otlp,
    given_edge,
)

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8080,
    "management_port": 8081,
    "metrics_port": 8082,
    "grpc_port": GRPC_DEFAULT_PORT,
    "grpc_tls_cert": None,
    "grpc_tls_key": None,
    "otlp_endpoint": None,
    "otlp_protocol": None,
    "auth": True,
    "unsafe_no_sandbox": False,
    "pass_env": [],
    "webhook_allow": [],
    "backend": "local",
    "ray_address": None,
    "ray_http_port": None,
    "store": None,
    "busy_poll_us": BUSY_POLL_DEFAULT_US,
}


def merge_settings(home: Path, given: dict[str, Any]) -> dict[str, Any]:
    """Flags given now over KILN_HOME/server.yaml over the defaults; saves flags given now.

    So `kiln server start` after a stop comes back on the same ports, with the
    same --pass-env patterns and edge limits. Edge flags (--max-connections ...)
    update the keys they name inside `edge:` and leave the others as saved.
    """
    from kiln.control.server_file import ServerFileError, load, path_of, save

    try:
        saved = load(home)
    except ServerFileError as exc:
        fail(str(exc))
    if "busy_poll_us" in saved:  # load checked the type; the range is the CLI's rule
        problem = busy_poll_problem(saved["busy_poll_us"])
        if problem is not None:
            fail(f"{path_of(home)}: 'busy_poll_us' {problem}")
    edge = given_edge(given)
    try:
        check_edge(edge)  # before anything is saved
    except EdgeFlagError as exc:
        fail(str(exc))
    try:  # before anything is saved: both TLS files or neither, readable
        tls = check_grpc_tls(
            given.get("grpc_tls_cert") or saved.get("grpc_tls_cert"),
            given.get("grpc_tls_key") or saved.get("grpc_tls_key"),
        )
    except EdgeFlagError as exc:
        fail(str(exc))
    try:  # before anything is saved: a URL and a protocol Kiln can export to
        check_otlp(
            given.get("otlp_endpoint") or saved.get("otlp_endpoint"),
            given.get("otlp_protocol") or saved.get("otlp_protocol"),
        )
    except EdgeFlagError as exc:
        fail(str(exc))
    try:  # before anything is saved: a limit the pollers can use
        check_busy_poll(given.get("busy_poll_us"))
    except EdgeFlagError as exc:
        fail(str(exc))
    if tls is not None and (given.get("grpc_tls_cert") or given.get("grpc_tls_key")):
        given = {**given, "grpc_tls_cert": str(tls[0]), "grpc_tls_key": str(tls[1])}
    if given.get("webhook_allow"):
        from kiln.control.webhooks import parse_allow

        try:
            parse_allow(given["webhook_allow"])  # before anything is saved
        except ValueError as exc:
            fail(str(exc))
    from kiln.cli.server_backend import BackendFlagError, check_backend

    try:  # before anything is saved: a backend that can start
        check_backend({**DEFAULTS, **saved, **{k: v for k, v in given.items() if v is not None}})
    except BackendFlagError as exc:
        fail(str(exc))
    now = {k: v for k, v in given.items() if k in DEFAULTS and v is not None}
    if edge:
        now["edge"] = {**saved.get("edge", {}), **edge}
    if now:
        save(home, {**saved, **now})
    # The gRPC port was asked for (a flag, $KILN_GRPC_PORT or server.yaml): without the
    # grpc extra that is an error; the default port alone is skipped with a note.
    asked = {"_grpc_required": "grpc_port" in now or "grpc_port" in saved}
    return {**DEFAULTS, **saved, **now, **asked}


def fail(message: str) -> NoReturn:
    """Stop the command with `message` and exit code 2 (a usage error), no traceback."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


def server_flags(given: dict[str, Any]) -> dict[str, Any]:
    """The server options among a command's parameters (None: not given)."""
    return {k: v for k, v in given.items() if k in DEFAULTS or k in EDGE_FLAGS}


def server_options(home: Path, settings: dict[str, Any]) -> Any:
    """The merged settings as the server's `ServerOptions`; a non-loopback host needs keys."""
    from kiln.cli.server_backend import make_backend, normalized_store
    from kiln.control.server import ServerOptions, is_loopback
    from kiln.protocols.edge import EdgeLimits

    host, auth = settings["host"], settings["auth"]
    if not is_loopback(host) and not auth:
        err_console.print(
            f"[bold red]Error:[/] refusing to listen on {escape(host)} with --no-auth: anyone "
            f"who can reach this machine could deploy and call models. Keep API keys on, or "
            f"listen on 127.0.0.1 behind your own gateway.",
            highlight=False,
        )
        raise typer.Exit(2)
    return ServerOptions(
        host=host,
        port=settings["port"],
        management_port=settings["management_port"],
        metrics_port=settings["metrics_port"],
        home=home,
        mode="server",
        quiet_logs=True,
        auth=auth,
        sandbox=not settings["unsafe_no_sandbox"],
        pass_env=list(settings["pass_env"]),
        webhook_allow=list(settings["webhook_allow"]),
        edge=EdgeLimits.from_mapping(settings.get("edge")),
        grpc_port=settings["grpc_port"],
        grpc_required=settings.get("_grpc_required", False),
        grpc_tls_cert=Path(settings["grpc_tls_cert"]) if settings["grpc_tls_cert"] else None,
        grpc_tls_key=Path(settings["grpc_tls_key"]) if settings["grpc_tls_key"] else None,
        otlp_endpoint=settings["otlp_endpoint"],
        otlp_protocol=settings["otlp_protocol"],
        store_url=normalized_store(settings.get("store")),
        backend=make_backend(settings),
        busy_poll_us=settings["busy_poll_us"],
    )
