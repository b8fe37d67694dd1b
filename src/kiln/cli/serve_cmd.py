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
from kiln.cli.server_cmd_edge import EdgeFlagError, edge_limits
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
) -> int:
    """Serve `project` until Ctrl-C or SIGTERM; returns the exit code.

    `edge`: the edge flags given (--max-connections ...); used for this run, never saved.
    """
    try:
        limits = edge_limits(edge or {})
    except EdgeFlagError as exc:
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

    def on_ready(running: RunningServer) -> None:
        states = {(s.name, s.version): (s.state, s.error) for s in running.apis}
        console.print(api_table([s.api for s in running.apis], running.url, states))
        console.print(
            f"\nKiln is serving on [bold]{running.url}[/] (inference port {running.port}, "
            f"management {running.management_url or 'off'}, "
            f"metrics {running.metrics_url or 'off'}). "
            f"Logs: {escape(str(state_home / 'logs'))}. Press Ctrl-C to stop.",
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
        first = next((s for s in running.apis if s.state == "ready"), None)
        if first is not None:
            console.print(
                f"Try: curl -X POST {running.url}{first.api.endpoint} "
                f"-H 'Content-Type: application/json' -d @sample.json",
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
