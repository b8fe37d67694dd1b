"""`kiln serve`: the development server in the foreground."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.markup import escape

from kiln.cli.common import console, err_console, kiln_home
from kiln.cli.server_cmd_edge import (
    GRPC_DEFAULT_PORT,
    EdgeFlagError,
    check_busy_poll,
    check_grpc_tls,
    check_otlp,
    edge_limits,
)
from kiln.cli.tables import api_table
from kiln.control.server import InferenceServer, RunningServer, ServerError, ServerOptions


def _run_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def run_serve(
    project: Any,
    host: str,
    port: int,
    home: Path | None,
    management_port: int | None = 8081,
    enable_model_api: bool = False,
    metrics_port: int | None = 8082,
    model_store: Path | None = None,
    auth: bool = False,
    sandbox: bool = False,
    edge: Mapping[str, Any] | None = None,
    admin_key: str | None = None,
    webhook_allow: list[str] | None = None,
    grpc_port: int | None = None,
    grpc_tls_cert: Path | None = None,
    grpc_tls_key: Path | None = None,
    otlp_endpoint: str | None = None,
    otlp_protocol: str | None = None,
    busy_poll_us: int | None = None,
) -> int:
    """Serve `project` until Ctrl-C or SIGTERM; returns the exit code.

    `edge`: the edge flags given (--max-connections ...); used for this run, never saved.
    `grpc_port`: None is the default port (8083), skipped with a note when the grpc extra
    is missing; a port given is required. `busy_poll_us`: None is the default limit.
    """
    try:
        limits = edge_limits(edge or {})
        tls = check_grpc_tls(grpc_tls_cert, grpc_tls_key)
        check_otlp(otlp_endpoint, otlp_protocol)
        poll_us = check_busy_poll(busy_poll_us)
    except EdgeFlagError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 2
    from kiln.control.webhooks import parse_allow

    try:
        parse_allow(webhook_allow or [])
    except ValueError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 2
    temporary = home is None
    state_home = Path(tempfile.mkdtemp(prefix="kiln-serve-")) if home is None else home
    pointers = [kiln_home() / "serve.json"] if temporary else []
    options = ServerOptions(
        host=host,
        port=port,
        management_port=management_port,
        metrics_port=metrics_port,
        model_store=model_store.resolve() if model_store else None,
        enable_model_api=enable_model_api,
        home=state_home,
        pointer_files=pointers,
        auth=auth,
        sandbox=sandbox,
        edge=limits,
        admin_key=admin_key,
        webhook_allow=list(webhook_allow or []),
        grpc_port=GRPC_DEFAULT_PORT if grpc_port is None else grpc_port,
        grpc_required=grpc_port is not None or tls is not None,
        grpc_tls_cert=tls[0] if tls else None,
        grpc_tls_key=tls[1] if tls else None,
        otlp_endpoint=otlp_endpoint,
        otlp_protocol=otlp_protocol,
        busy_poll_us=poll_us,
    )
    server = InferenceServer(project, options)

    def on_loading(count: int) -> None:
        running = server.running
        where = f" (listening on {running.url}: /healthz answers now)" if running else ""
        console.print(
            f"Loading {count} API(s) from {escape(str(project.config_file))}{where}; requests "
            f"wait for their API to load ...",
            highlight=False,
            soft_wrap=True,
        )

    logs = escape(str((state_home / "logs").resolve()))
    logs_note = (
        f"Logs: {logs} (temporary: removed when Kiln stops; --home DIR keeps them). "
        if temporary
        else f"Logs: {logs} (kept after Kiln stops). "
    )

    def on_ready(running: RunningServer) -> None:
        states = {(s.name, s.version): (s.state, s.error) for s in running.apis}
        console.print(api_table([s.api for s in running.apis], running.url, states))
        console.print(
            f"\nKiln is serving on [bold]{running.url}[/] (inference port {running.port}, "
            f"management {running.management_url or 'off'}, "
            f"metrics {running.metrics_url or 'off'}, gRPC {_grpc_line(running)}). "
            f"{logs_note}Press Ctrl-C to stop.",
            highlight=False,
            soft_wrap=True,
        )
        if server.admin_key_file is not None:
            console.print(
                f"API keys are on: every route but /ping, /healthz and /v2/health needs one. "
                f"The admin key is in {escape(str(server.admin_key_file))}; the kiln CLI on "
                f"this machine uses it (kiln keys create makes more).",
                highlight=False,
                soft_wrap=True,
            )
        elif admin_key is not None:
            console.print(
                "API keys are on: every route but /ping, /healthz and /v2/health needs one. "
                "The admin key is the one given in $KILN_API_KEY_FILE or $KILN_API_KEY.",
                highlight=False,
                soft_wrap=True,
            )
        first = next((s for s in running.apis if s.state == "ready"), None)
        if first is not None:
            console.print(
                try_line(running.url, first.api.endpoint, Path(project.root)),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    try:
        _run_loop(server.run(on_loading, on_ready))
    except ServerError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 1
    finally:
        if temporary:
            shutil.rmtree(state_home, ignore_errors=True)
    console.print("Kiln stopped: every request in flight was answered and all workers exited.")
    return 0


def _grpc_line(running: RunningServer) -> str:
    if running.grpc_address is None:
        return "off"
    return f"{running.grpc_address}{' (TLS)' if running.grpc_tls else ''}"


MIN_KEY_CHARS = 16


def given_admin_key() -> str | None:
    """The admin key chosen outside Kiln: the file named by $KILN_API_KEY_FILE (a mounted
    secret) first, else $KILN_API_KEY; None when neither is set (Kiln makes one).

    Why here: a container image starts `kiln serve --auth` and must know its key
    before anyone can read a generated file inside it."""
    import os

    from kiln.cli.common import fail

    path = os.environ.get("KILN_API_KEY_FILE")
    if path:
        try:
            key = Path(path).read_text().strip()
        except OSError as exc:
            fail(
                f"KILN_API_KEY_FILE names {path}, which cannot be read ({exc.strerror}); "
                f"mount the secret there or unset KILN_API_KEY_FILE",
                2,
            )
        where = f"the file {path} (KILN_API_KEY_FILE)"
    else:
        key = os.environ.get("KILN_API_KEY", "").strip()
        where = "KILN_API_KEY"
    if not path and not key:
        return None
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        fail(
            f"the admin key in {where} must be at least {MIN_KEY_CHARS} characters without "
            f"spaces; make one with `openssl rand -hex 24`",
            2,
        )
    return key


def try_line(url: str, endpoint: str, root: Path) -> str:
    """The banner's hint: a curl with the project's sample.json only when the project has
    one (by a path from the current folder); else the API's status, which always answers.

    A project without a sample (examples/torchserve-compat takes images) was told to send
    a file it does not have."""
    import os
    import shlex

    from kiln.cli.scaffold import stale_template_sample

    sample = root / "sample.json"
    if sample.is_file() and not stale_template_sample(root):
        return (
            f"Try: curl -X POST {url}{endpoint} -H 'Content-Type: application/json' "
            f"-d @{shlex.quote(os.path.relpath(sample))}"
        )
    why = (
        "sample.json is still kiln init's iris example, which the handler no longer takes"
        if sample.is_file()
        else "the project has no sample.json to send"
    )
    return f"Try: curl {url}{endpoint}   (the API's status and signature; {why})"
