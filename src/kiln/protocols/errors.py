"""One exception tree, rendered in each protocol's own error shape."""

from __future__ import annotations

from typing import Any

from kiln.errors import KilnError, MethodNotAllowed, Unauthorized


def error_headers(err: KilnError) -> dict[str, str]:
    headers: dict[str, str] = dict(getattr(err, "headers", None) or {})
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="kiln"'
    allow = getattr(err, "allow", None)
    if isinstance(err, MethodNotAllowed) and allow:
        headers["Allow"] = ", ".join(allow)
    return headers


def native_error(err: KilnError, request_id: str) -> dict[str, Any]:
    return {"error": {"type": err.type, "message": err.message}, "request_id": request_id}


def torchserve_error(err: KilnError, request_id: str) -> dict[str, Any]:
    return {"code": err.status, "type": err.type, "message": err.message}


def kserve_error(err: KilnError, request_id: str) -> dict[str, Any]:
    return {"error": err.message}
