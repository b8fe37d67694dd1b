"""API keys at the HTTP edge: which header carries the key, which routes stay open.

The checks themselves (is the key valid, may it make one more call) belong to
the control plane (`control/accounts.py`, `control/quotas.py`), handed to the
HTTP apps as an `authority` object, so protocols never import the control
plane. This module only reads the key from the request and removes it so nothing
downstream (user code, debug output, logs) ever sees it. The principal it returns
is handed on explicitly: to the data plane's `Call` on the inference port
(serving/data_plane.py, which also admits and meters), in `scope["state"]` on the
management and metrics ports.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import Forbidden, KilnError

# Health routes stay open and name no API (ShellTorch lesson 2).
OPEN_PATHS = frozenset({"/ping", "/healthz", "/v2/health/live", "/v2/health/ready"})
CREDENTIAL_HEADERS = ("x-api-key", "authorization")


def presented_key(headers: dict[str, str]) -> str | None:
    """The key from `x-api-key` (Hub) or `Authorization: Bearer` (TorchServe, KServe)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(authority: Any, request: Any, scope: str) -> Any:
    """The request's principal (401/403 otherwise); drops the key headers."""
    key = presented_key(request.headers)
    for name in CREDENTIAL_HEADERS:
        request.headers.pop(name, None)
    principal = authority.accounts.authenticate(key)
    if scope not in principal.scopes and "manage" not in principal.scopes:
        raise Forbidden(
            f"API key {principal.key_id} may not {scope} (its scopes: "
            f"{', '.join(sorted(principal.scopes))}); use a key with the {scope} scope"
        )
    return principal


class ManagementGate:
    """ASGI middleware for the management and metrics ports: every route needs a `manage` key.

    Open: the API's own description (`/docs`, `/openapi.json`, `OPTIONS /`,
    `/api-description`), which names no API. The principal is handed to the routes
    in `scope["state"]["principal"]`; they ask the registry for its view explicitly.
    """

    OPEN = frozenset({"/docs", "/openapi.json", "/api-description"})

    def __init__(self, app: Any, authority: Any) -> None:
        self.app = app
        self.authority = authority

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self.OPEN
            or (scope["path"] == "/" and scope["method"] == "OPTIONS")
        ):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request = _Headers(headers)
        try:
            principal = authenticate(self.authority, request, "manage")
        except KilnError as exc:  # 401 or 403
            from kiln.protocols.errors import error_headers, torchserve_error

            status = exc.status
            body = torchserve_error(exc, "")
            extra = error_headers(exc)
            await _send_json(send, status, body, extra)
            return
        if scope["path"].startswith("/models") and scope["method"] in ("POST", "DELETE"):
            if not principal.is_admin:
                # TorchServe's register/unregister act on the server's model store: admin only.
                from kiln.protocols.errors import torchserve_error

                err = Forbidden("registering and unregistering models is for the admin")
                await _send_json(send, 403, torchserve_error(err, ""), {})
                return
        scope = {
            **scope,
            "headers": [
                (k, v) for k, v in scope["headers"] if k.decode("latin-1") not in CREDENTIAL_HEADERS
            ],
        }
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class _Headers:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


async def _send_json(send: Any, status: int, body: Any, headers: dict[str, str]) -> None:
    import orjson

    payload = orjson.dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
