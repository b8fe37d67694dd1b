"""Shared CLI pieces: where state lives, how to find the running server, output."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import orjson
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def kiln_home() -> Path:
    return Path(os.environ.get("KILN_HOME", Path.home() / ".kiln")).expanduser()


def find_server_info() -> dict | None:
    """The running local server's server.json (pid, url, ports, home), if one is alive."""
    home = kiln_home()
    for name in ("server.json", "serve.json"):
        try:
            info = orjson.loads((home / name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if _alive(info.get("pid")):
            return info
    return None


SERVER_KINDS = {"server.json": "kiln server", "serve.json": "kiln serve"}


def running_servers() -> list[tuple[str, dict]]:
    """Every live local server in KILN_HOME, as ("kiln server" | "kiln serve", its info):
    a `kiln serve` during development may run beside the durable `kiln server`."""
    found = []
    for name, kind in SERVER_KINDS.items():
        try:
            info = orjson.loads((kiln_home() / name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(info, dict) and _alive(info.get("pid")):
            # `kiln serve --home H` writes H/server.json too: its mode tells the kind.
            mode = info.get("mode")
            found.append((f"kiln {mode}" if mode in ("serve", "server") else kind, info))
    return found


def find_server_url() -> str | None:
    """The local server's inference URL: KILN_URL, else server.json, else a `kiln serve` one."""
    if os.environ.get("KILN_URL"):
        return os.environ["KILN_URL"].rstrip("/")
    home = kiln_home()
    for name in ("server.json", "serve.json"):
        path = home / name
        try:
            info = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if _alive(info.get("pid")):
            return str(info["url"]).rstrip("/")
    return None


def _alive(pid: object) -> bool:
    """Whether `pid` is a running process (a zombie, exited but not reaped, counts as gone)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class CliError(Exception):
    """A problem the CLI reports in one sentence (what happened, what to do)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def run_cli(action: Callable[[], int | None]) -> None:
    """Run a command body: a CliError becomes one clear message and its exit code."""
    import typer
    from rich.markup import escape

    try:
        code = action()
    except CliError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.code) from None
    raise typer.Exit(code or 0)


def fail(message: str, code: int = 1) -> None:
    import typer

    err_console.print(f"[bold red]Error:[/] {message}", highlight=False)
    raise typer.Exit(code)
