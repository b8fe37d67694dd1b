"""The server's footprint on the machine: its sockets, its home's lock and `server.json`.

Apart from `server.py` because none of it is about serving: binding (so port 0
resolves and a busy port fails before anything loads), refusing a second server
on the same KILN_HOME, and the file the CLI reads to find the running server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import orjson


class ServerError(Exception):
    """The server cannot start; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another port with "
            f"--port, or --port 0 for a free one"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)  # workers get their IPC socket and nothing else
    return sock


def write_server_json(paths: list[Path], info: dict[str, Any]) -> None:
    """Write `info` atomically to each path (temp file, then rename)."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
        tmp.replace(path)


def remove_server_json(paths: list[Path]) -> None:
    """Remove the files this process wrote (not a newer server's)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
            if orjson.loads(path.read_bytes()).get("pid") == os.getpid():
                path.unlink()


def kiln_version() -> str:
    import kiln

    return kiln.__version__


def lock_home(home: Path) -> Any:
    """Hold `<home>/server.lock` for the server's life: one server per KILN_HOME.

    A lock, not a pid file: the kernel drops it when the process dies, SIGKILL
    included, so a crashed server never blocks the next start.
    """
    import fcntl

    handle = (home / "server.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ServerError(
            f"another Kiln server is already running with its state in {home}; stop it "
            f"(kiln server stop), or give this one its own folder with --home or KILN_HOME"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
