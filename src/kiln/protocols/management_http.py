"""HTTP plumbing of the management port, kept apart from what its routes do.

`management.py` holds the `Management` handlers (list, describe, scale,
register, unregister) and builds the Starlette app. This module holds what
those handlers and the app lean on but that is not management logic: parsing
query parameters, loading a registered project's APIs, the TorchServe-shaped
worker description, and the exception handlers that turn every error into
TorchServe's `{"code", "type", "message"}` (with `Allow` on 405s). It imports
nothing from `management.py`, so the import graph stays one-way.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from kiln.errors import InvalidInput, KilnError, MethodNotAllowed, NotFound
from kiln.protocols.errors import error_headers, torchserve_error

_WORKER_STATUS = {
    "ready": "READY",
    "loading": "LOADING",
    "restarting": "RESTARTING",
    "failed": "FAILED",
    "stopped": "UNLOADING",
}


def _load_apis(root: Path, url: str) -> list[Any]:
    from kiln.config import ConfigError, load_project

    try:
        project = load_project(root)
    except ConfigError as exc:
        raise InvalidInput(f"the kiln.yaml of '{url}' is not valid:\n{exc}") from None
    if not project.apis:
        raise InvalidInput(f"the kiln.yaml of '{url}' defines no `kind: api` entry")
    return list(project.apis)


def _worker(slot: Any) -> dict[str, Any]:
    replica = slot.replica
    started = None
    if slot.started_at:
        wall = time.time() - (time.monotonic() - slot.started_at)
        started = dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="milliseconds")
    memory = replica.memory_bytes() if replica is not None else None
    return {
        "id": str(slot.index),
        "startTime": started,
        "status": _WORKER_STATUS.get(slot.state, slot.state.upper()),
        "memoryUsage": memory or 0,
        "pid": replica.pid if replica is not None and replica.pid is not None else -1,
        "gpu": False,
        "gpuUsage": "N/A",
    }


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer, got '{raw}'") from None


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


# ----- errors ------------------------------------------------------------------------
def _kiln_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KilnError)
    headers = error_headers(exc)
    if isinstance(exc, MethodNotAllowed) and "Allow" not in headers:
        headers["Allow"] = ", ".join(_allowed(request))
    return JSONResponse(torchserve_error(exc, ""), status_code=exc.status, headers=headers)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err: KilnError
    if exc.status_code == 404:
        err = NotFound(
            f"no management route at {request.url.path}; OPTIONS / lists the management API"
        )
    elif exc.status_code == 405:
        allowed = _allowed(request)
        err = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allowed)}"
        )
        return JSONResponse(
            torchserve_error(err, ""), status_code=405, headers={"Allow": ", ".join(allowed)}
        )
    else:
        err = KilnError(str(exc.detail), status=exc.status_code)
    return JSONResponse(torchserve_error(err, ""), status_code=err.status)


def _unexpected(request: Request, exc: Exception) -> Response:
    err = KilnError("internal server error; the details are in the server log")
    return JSONResponse(torchserve_error(err, ""), status_code=500)


def _allowed(request: Request) -> list[str]:
    """The methods some route serves at this path (less the ones switched off)."""
    mgmt = request.app.state.management  # management.Management
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(route.methods or ())
    methods.discard("HEAD")
    if not mgmt.enabled and request.url.path.startswith("/models"):
        methods -= {"POST", "DELETE"}
    return sorted(methods)
