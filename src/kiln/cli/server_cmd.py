"""`kiln server start|stop|status|run`: the durable platform on this machine.

`run` is the server in the foreground (what a service manager or a container
runs). `start` launches `run` as a background process in its own session,
output to `KILN_HOME/logs/server.log`, and returns once the server answers on
its management port (or prints the log's tail if it died trying). `stop` sends
SIGTERM, which drains requests in flight, and SIGKILLs after a grace period.
How the flags, server.yaml and the defaults combine is `server_settings.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.common import _alive, console, err_console, kiln_home
from kiln.cli.server_backend import (
    BackendOption,
    RayAddressOption,
    RayHttpPortOption,
    StoreOption,
)
from kiln.cli.server_cmd_edge import (
    BodyIdleTimeoutOption,
    BusyPollOption,
    GrpcCertOption,
    GrpcKeyOption,
    GrpcPortOption,
    HeaderTimeoutOption,
    KeepaliveTimeoutOption,
    MaxConnectionsOption,
    MaxHeaderBytesOption,
    OtlpEndpointOption,
    OtlpProtocolOption,
)
from kiln.cli.server_settings import merge_settings, server_flags, server_options

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 45.0


def _server_json(home: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads((home / "server.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def running_info(home: Path) -> dict[str, Any] | None:
    info = _server_json(home)
    return info if info and _alive(info.get("pid")) else None


def run_foreground(options: Any) -> int:
    """`kiln server run`: serve every deployment in the foreground."""
    from kiln.cli.serve_cmd import _run_loop
    from kiln.control.server import InferenceServer, RunningServer, ServerError

    server = InferenceServer(None, options)

    def on_ready(running: RunningServer) -> None:
        console.print(
            f"Kiln server is running (pid {os.getpid()}): inference {running.url}, "
            f"management {running.management_url}, metrics {running.metrics_url}, "
            f"gRPC {_grpc_line(running.grpc_address, running.grpc_tls)}; "
            f"{len(running.apis)} API(s) restored. State: {escape(str(options.home))}",
            highlight=False,
            soft_wrap=True,
        )

    try:
        _run_loop(server.run(on_ready=on_ready))
    except ServerError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 1
    console.print("Kiln server stopped.")
    return 0


def _grpc_line(address: str | None, tls: bool) -> str:
    if address is None:
        return "off"
    return f"{address}{' (TLS)' if tls else ''}"


def start(home: Path, args: list[str]) -> int:
    """Launch `kiln server run ARGS` in the background and wait until it answers."""
    existing = running_info(home)
    if existing is not None:
        console.print(
            f"A Kiln server is already running (pid {existing['pid']}): management "
            f"{existing.get('management_url')}. `kiln server stop` stops it.",
            highlight=False,
        )
        return 0
    log_dir = home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "server.log"
    command = [sys.executable, "-m", "kiln.cli.main", "server", "run", "--home", str(home), *args]
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "KILN_HOME": str(home)},
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    with console.status("Starting the Kiln server (restoring deployed APIs) ..."):
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err_console.print(
                    f"[bold red]Error:[/] the server exited with code {process.returncode} "
                    f"while starting. The end of {escape(str(log_path))}:",
                    highlight=False,
                )
                err_console.print(_tail(log_path), markup=False, highlight=False)
                return 1
            info = _server_json(home)
            if info and info.get("pid") == process.pid and _answers(info):
                _print_started(info, log_path)
                return 0
            time.sleep(0.1)
    err_console.print(
        f"[bold red]Error:[/] the server did not answer within {START_TIMEOUT_S:.0f}s; it is "
        f"still starting or stuck (pid {process.pid}). See {escape(str(log_path))}.",
        highlight=False,
    )
    return 1


def _answers(info: dict[str, Any]) -> bool:
    try:
        response = httpx.get(f"{info['management_url']}/server", timeout=2)
        return response.status_code in (200, 401)  # 401: up, with API keys on
    except (httpx.HTTPError, KeyError, TypeError):
        return False


def _print_started(info: dict[str, Any], log_path: Path) -> None:
    console.print(
        f"Kiln server started (pid {info['pid']}).\n"
        f"  inference   {info['url']}\n"
        f"  management  {info['management_url']}   (the CLI talks here; API docs at /docs)\n"
        f"  metrics     {info['metrics_url']}\n"
        f"  gRPC        {_grpc_line(*_grpc_of(info))}\n"
        f"  log         {log_path}\n"
        + (
            f"  API keys    on; the admin key is in {info['admin_key_file']} (the kiln CLI on "
            f"this machine uses it)\n"
            if info.get("auth")
            else "  API keys    off (--no-auth)\n"
        )
        + "Next: kiln deploy DIR",
        highlight=False,
    )


def _grpc_of(info: dict[str, Any]) -> tuple[str | None, bool]:
    grpc = info.get("grpc") or {}
    return grpc.get("address"), bool(grpc.get("tls"))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(home: Path) -> int:
    info = running_info(home)
    if info is None:
        console.print(f"No Kiln server is running with its state in {home}.", highlight=False)
        return 0
    pid = info["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with console.status(f"Stopping the Kiln server (pid {pid}): draining requests ..."):
        while time.monotonic() < deadline:
            if not _alive(pid):
                console.print("Kiln server stopped.")
                return 0
            time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    console.print(
        f"The server did not stop within {STOP_TIMEOUT_S:.0f}s and was killed; its workers "
        f"exit with it. Deployed APIs come back at the next `kiln server start`."
    )
    return 0


def status(home: Path, output: str) -> int:
    info = running_info(home)
    if info is None:
        if output == "json":
            console.print_json(orjson.dumps({"running": False, "home": str(home)}).decode())
        else:
            console.print(
                f"No Kiln server is running with its state in {home}. Start one with "
                f"`kiln server start`.",
                highlight=False,
            )
        return 1
    from kiln.cli.client import _local_key

    key = _local_key(info)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        detail = httpx.get(f"{info['management_url']}/server", timeout=5, headers=headers).json()
    except (httpx.HTTPError, ValueError):
        detail = {}
    merged = {"running": True, **info, **detail}
    if output == "json":
        console.print_json(orjson.dumps(merged).decode())
        return 0
    table = Table(show_header=False, show_edge=False)
    uptime = detail.get("uptime_s")
    rows = [
        ("status", "[green]running[/]"),
        ("pid", str(info["pid"])),
        ("version", str(detail.get("version", "?"))),
        ("uptime", f"{uptime:.0f}s" if isinstance(uptime, int | float) else "?"),
        ("inference", str(info.get("url"))),
        ("management", str(info.get("management_url"))),
        ("metrics", str(info.get("metrics_url"))),
        ("gRPC", _grpc_line(*_grpc_of(info))),
        ("APIs", str(detail.get("apis", "?"))),
        ("backend", str(detail.get("backend", "?"))),
        ("state", str(home)),
        ("workers", escape(str(info.get("sandbox", "?")))),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)
    return 0


def default_home(home: Path | None) -> Path:
    return (home or kiln_home()).expanduser().resolve()


# ---- the `kiln server` commands ------------------------------------------------------


server_app = typer.Typer(
    help="The durable Kiln platform on this machine: start, stop, status, run.",
    no_args_is_help=True,
)

HomeOption = Annotated[
    Path | None, typer.Option(help="State folder (default: KILN_HOME, else ~/.kiln).")
]
SAVED = " Saved in <home>/server.yaml for later starts."
HostOption = Annotated[
    str | None, typer.Option(help="Interface to listen on (default 127.0.0.1)." + SAVED)
]
PortOption = Annotated[
    int | None, typer.Option(help="Inference port (default 8080); 0 picks a free one." + SAVED)
]
MgmtOption = Annotated[
    int | None,
    typer.Option(help="Management port (default 8081); 0 picks a free one." + SAVED),
]
MetricsOption = Annotated[
    int | None, typer.Option(help="Metrics port (default 8082); 0 picks a free one." + SAVED)
]


AuthOption = Annotated[
    bool | None,
    typer.Option(
        "--auth/--no-auth",
        help="Require API keys on every route but health (default: on). The admin key is "
        "written to <home>/admin.key (mode 0600) at the first start.",
    ),
]


UnsafeOption = Annotated[
    bool | None,
    typer.Option(
        "--unsafe-no-sandbox/--sandbox",
        help="Run users' code without the sandbox (only when every user is trusted: their "
        "handlers could then read the admin key, the state database and other users' files).",
    ),
]
PassEnvOption = Annotated[
    list[str] | None,
    typer.Option(
        "--pass-env",
        help="Server environment variables the admin's kiln.yaml may read as ${VAR}, as a "
        "glob (repeatable): --pass-env 'AWS_*'. Users' deployments never see them.",
    ),
]

WebhookAllowOption = Annotated[
    list[str] | None,
    typer.Option(
        "--webhook-allow",
        help="A network (CIDR) AsyncAPI webhooks may call although it is loopback, "
        "link-local or private (repeatable): --webhook-allow 10.0.0.0/8. Refused otherwise, "
        "since tenants choose the URLs." + SAVED,
    ),
]


@server_app.command("run")
def run_cmd(
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    management_port: MgmtOption = None,
    metrics_port: MetricsOption = None,
    auth: AuthOption = None,
    unsafe_no_sandbox: UnsafeOption = None,
    pass_env: PassEnvOption = None,
    webhook_allow: WebhookAllowOption = None,
    grpc_port: GrpcPortOption = None,
    grpc_tls_cert: GrpcCertOption = None,
    grpc_tls_key: GrpcKeyOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    otlp_protocol: OtlpProtocolOption = None,
    header_timeout_s: HeaderTimeoutOption = None,
    body_idle_timeout_s: BodyIdleTimeoutOption = None,
    keepalive_timeout_s: KeepaliveTimeoutOption = None,
    max_connections: MaxConnectionsOption = None,
    max_header_bytes: MaxHeaderBytesOption = None,
    backend: BackendOption = None,
    ray_address: RayAddressOption = None,
    ray_http_port: RayHttpPortOption = None,
    store: StoreOption = None,
    busy_poll_us: BusyPollOption = None,
) -> None:
    """Run the server in the foreground (Ctrl-C stops it; deployed APIs come back next time)."""
    state = default_home(home)
    settings = merge_settings(state, server_flags(locals()))
    raise typer.Exit(run_foreground(server_options(state, settings)))


@server_app.command("start")
def start_cmd(
    home: HomeOption = None,
    host: HostOption = None,
    port: PortOption = None,
    management_port: MgmtOption = None,
    metrics_port: MetricsOption = None,
    auth: AuthOption = None,
    unsafe_no_sandbox: UnsafeOption = None,
    pass_env: PassEnvOption = None,
    webhook_allow: WebhookAllowOption = None,
    grpc_port: GrpcPortOption = None,
    grpc_tls_cert: GrpcCertOption = None,
    grpc_tls_key: GrpcKeyOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    otlp_protocol: OtlpProtocolOption = None,
    header_timeout_s: HeaderTimeoutOption = None,
    body_idle_timeout_s: BodyIdleTimeoutOption = None,
    keepalive_timeout_s: KeepaliveTimeoutOption = None,
    max_connections: MaxConnectionsOption = None,
    max_header_bytes: MaxHeaderBytesOption = None,
    backend: BackendOption = None,
    ray_address: RayAddressOption = None,
    ray_http_port: RayHttpPortOption = None,
    store: StoreOption = None,
    busy_poll_us: BusyPollOption = None,
) -> None:
    """Start the server in the background and wait until it answers."""
    state = default_home(home)
    if running_info(state) is not None:  # say so, and change nothing saved
        raise typer.Exit(start(state, []))
    settings = merge_settings(state, server_flags(locals()))
    server_options(state, settings)  # refuse bad options before the background process starts
    raise typer.Exit(start(state, []))  # `kiln server run` reads the saved server.yaml


@server_app.command("stop")
def stop_cmd(home: HomeOption = None) -> None:
    """Stop the background server: requests in flight finish, workers exit."""
    raise typer.Exit(stop(default_home(home)))


@server_app.command("status")
def status_cmd(
    home: HomeOption = None,
    output: Annotated[str, typer.Option("-o", "--output", help="pretty or json.")] = "pretty",
) -> None:
    """Is the server running, on which ports, with how many APIs (exit code 1 if not running)."""
    raise typer.Exit(status(default_home(home), output))
