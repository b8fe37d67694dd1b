"""The Open Inference Protocol (KServe V2) REST routes, for Triton and KServe clients.

Every API is a V2 "model" under its name, and each of its `version:` entries
is a model version. Routes (all under `/v2`):

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    liveness; readiness of every loaded API
    GET  /v2/models                            {"models": [names]} (KServe)
    GET  /v2/models/{m}[/versions/{v}]         model metadata from the API's signature
    GET  /v2/models/{m}[/versions/{v}]/ready   200 when ready, else 503
    POST /v2/models/{m}[/versions/{v}]/infer   inference, JSON or binary tensor data
    POST /v2/repository/index                  every version and its state (Triton)
    POST /v2/repository/models/{m}/load|unload start or stop all versions' workers

With API keys on, the repository routes need a `manage` key (`scope_of`).

A JSON-only request (no binary data asked for, no `timeout`) goes to the worker
as its raw body (`kind="v2json"`): the worker parses it, holds it against the
signature (a bad tensor is a 400 naming it) and answers with the finished
response body, which is sent as it is, so the server never touches the JSON.
Other requests are held against the signature here, before they are queued;
their tensors reach the worker as typed arrays (`kind="tensors"`) and come
back typed (`want_tensors`). Errors are `{"error": "message"}`. The tensor
encodings are in `kiln.serving.v2_tensors` and `kiln.serving.v2_response`.
"""

from __future__ import annotations

import asyncio
import re
import time
import weakref
from typing import Any

import orjson

from kiln import __version__
from kiln.errors import (
    InferenceError,
    InvalidInput,
    KilnError,
    MethodNotAllowed,
    NotFound,
)
from kiln.protocols.errors import kserve_error
from kiln.protocols.http import Request, Send, send_bytes, send_json
from kiln.protocols.v2_codec import (
    check_signature,
    decode_inputs,
    decompress,
    encode_infer_response,
    parse_infer_body,
)
from kiln.serving.availability import unavailable
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ApiGroup, ServedApi
from kiln.serving.types import InferenceRequest

EXTENSIONS = ["binary_tensor_data", "model_repository"]
_SYSTEM = "kiln"
_PLATFORMS = {
    "onnx": "onnx_onnxv1",
    "tensorflow": "tensorflow_savedmodel",
    "torch": "pytorch_torchscript",
    "python": "python",
    "sklearn": "sklearn",
}
_STATES = {
    "ready": "READY",
    "loading": "LOADING",
    "restarting": "LOADING",
    "unloaded": "UNAVAILABLE",
    "failed": "UNAVAILABLE",
    "stopped": "UNLOADING",
    "scaled to zero": "READY",
}
# An API scaled to zero takes requests (the first one starts a worker), so it is ready.
_READY = ("ready", "scaled to zero")
_FORWARDED_HEADERS = ("user-agent", "x-request-id")
_SMALL_BODY = 64 * 1024  # repository requests carry a few parameters at most


def _method_not_allowed(allowed: str, request: Request) -> MethodNotAllowed:
    err = MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}")
    err.allow = (allowed,)  # type: ignore[attr-defined]
    return err


def _version_key(version: str | None) -> tuple[Any, ...]:
    if version is None:
        return ()
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-]", version))


class OpenInferenceV2:
    """The `/v2` routes of the inference port."""

    protocol = "v2"
    owns = ("v2",)  # see KServeV1.owns

    def __init__(self, plane: DataPlane, log: Any) -> None:
        self.plane = plane
        self.log = log
        # The last signature seen per API version: a worker that is restarting has none
        # to report, but requests may still be checked while they wait for it.
        self._signatures: weakref.WeakKeyDictionary[ServedApi, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )
        # The `/v2/models/{m}/infer` handler per model name (names come from the registry).
        self._infer_handlers: dict[str, Any] = {}

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        path = request.path.rstrip("/")
        if path != "/v2" and not path.startswith("/v2/"):
            return None
        parts = path[3:].split("/")[1:]
        api = _SYSTEM
        groups = call.view.groups
        # Only a known name becomes a log name: it names a file.
        if len(parts) >= 2 and parts[0] == "models" and parts[1] in groups:
            api = parts[1]
        elif len(parts) == 4 and parts[:2] == ["repository", "models"]:
            api = parts[2] if parts[2] in groups else _SYSTEM
        if api != _SYSTEM and parts[0] == "models" and parts[-1] == "infer":
            # The hot path goes straight to `_infer`, one coroutine less per request.
            if len(parts) == 3:
                infer = self._infer_handlers.get(api)
                if infer is None:
                    infer = self._infer_handlers[api] = self._infer_handler(api, None)
                return infer, api
            if len(parts) == 5 and parts[2] == "versions":
                return self._infer_handler(parts[1], parts[3]), api

        async def handler(req: Request, send: Send, call: Call) -> int:
            return await self.dispatch(req, send, call, parts)

        return handler, api

    @staticmethod
    def scope_of(request: Request) -> str:
        """The repository extension (index, load, unload) manages models: a `manage` key."""
        return "manage" if request.path.rstrip("/").startswith("/v2/repository") else "invoke"

    def _infer_handler(self, name: str, version: str | None) -> Any:
        async def infer(req: Request, send: Send, call: Call) -> int:
            if req.method != "POST":
                raise _method_not_allowed("POST", req)
            return await self._infer(req, send, call, name, version)

        return infer

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return kserve_error(err, request_id)

    async def dispatch(self, request: Request, send: Send, call: Call, parts: list[str]) -> int:
        match parts:
            case []:
                self._only(request, "GET")
                body = {"name": "kiln", "version": __version__, "extensions": EXTENSIONS}
                return await self._json(request, send, 200, body)
            case ["health", "live"]:
                self._only(request, "GET")
                return await self._json(request, send, 200, {"live": True})
            case ["health", "ready"]:
                self._only(request, "GET")
                ready = self._server_ready()
                return await self._json(request, send, 200 if ready else 503, {"ready": ready})
            case ["models"]:
                self._only(request, "GET")
                models = list(call.view.groups)
                return await self._json(request, send, 200, {"models": models})
            case ["models", name] | ["models", name, "versions", _]:
                self._only(request, "GET")
                version = parts[3] if len(parts) == 4 else None
                return await self._metadata(request, send, call, name, version)
            case ["models", name, "ready"] | ["models", name, "versions", _, "ready"]:
                self._only(request, "GET")
                version = parts[3] if len(parts) == 5 else None
                return await self._model_ready(request, send, call, name, version)
            case ["models", name, "infer"] | ["models", name, "versions", _, "infer"]:
                self._only(request, "POST")
                version = parts[3] if len(parts) == 5 else None
                return await self._infer(request, send, call, name, version)
            case ["repository", "index"]:
                self._only(request, "POST")
                return await self._index(request, send, call)
            case ["repository", "models", name, ("load" | "unload") as action]:
                self._only(request, "POST")
                return await self._load_or_unload(request, send, call, name, action)
        raise NotFound(
            f"no V2 route at {request.path}; the routes are /v2, /v2/health/live, "
            f"/v2/health/ready, /v2/models, /v2/models/{{model}}[/versions/{{version}}]"
            f"[/ready|/infer] and /v2/repository/..."
        )

    # ----- helpers -----------------------------------------------------------------
    @staticmethod
    def _only(request: Request, method: str) -> None:
        if request.method != method:
            raise _method_not_allowed(method, request)

    @staticmethod
    async def _json(request: Request, send: Send, status: int, body: Any) -> int:
        await send_json(send, status, body, request.request_id)
        return status

    @staticmethod
    def _group(call: Call, name: str) -> ApiGroup:
        group = call.view.groups.get(name)
        if group is None:
            raise NotFound(f"no model named '{name}'; GET /v2/models lists the models")
        return group

    def _served(
        self, call: Call, name: str, version: str | None, request: Request | None = None
    ) -> ServedApi:
        """The version a route means; with `request` (inference), the traffic split's."""
        group = self._group(call, name)
        if version is not None and version not in group.versions:
            known = sorted((str(v) for v in group.versions if v is not None), key=_version_key)
            listed = ", ".join(known) if known else f"none; use /v2/models/{name}"
            raise NotFound(f"model '{name}' has no version '{version}' (versions: {listed})")
        if request is not None:
            return self.plane.pick(call, group, version, request.headers)
        return group.get(version)

    def _signature(self, served: ServedApi) -> dict[str, Any]:
        signature = served.signature
        if signature:
            self._signatures[served] = signature
            return signature
        return self._signatures.get(served, {})

    async def _loaded_signature(self, served: ServedApi) -> dict[str, Any]:
        """The signature, waiting for the first load; 503 when the API cannot serve."""
        self._refuse_unavailable(served)
        signature = self._signature(served)
        if not signature:
            await served.wait_ready(served.api.serving.startup_timeout_s)
            signature = self._signature(served)
        return signature

    @staticmethod
    def _refuse_unavailable(served: ServedApi) -> None:
        """503 at once for an API that cannot answer until someone acts."""
        error = unavailable(
            served,
            noun="model",
            load_hint=f"POST /v2/repository/models/{served.name}/load to load it",
        )
        if error is not None:
            raise error

    def _server_ready(self) -> bool:
        # An API unloaded on purpose (repository unload) does not make the server unready.
        return all(s.state in _READY for s in self.plane.registry.all() if s.state != "unloaded")

    # ----- metadata and health -----------------------------------------------------
    async def _metadata(
        self, request: Request, send: Send, call: Call, name: str, version: str | None
    ) -> int:
        served = self._served(call, name, version)
        signature = await self._loaded_signature(served)
        versions = sorted(
            (v for v in call.view.groups[name].versions if v is not None), key=_version_key
        )
        body = {
            "name": name,
            "versions": versions,
            "platform": _PLATFORMS.get(served.api.runtime, served.api.runtime),
            "inputs": [_tensor_metadata(s) for s in signature.get("inputs") or []],
            "outputs": [_tensor_metadata(s) for s in signature.get("outputs") or []],
        }
        return await self._json(request, send, 200, body)

    async def _model_ready(
        self, request: Request, send: Send, call: Call, name: str, version: str | None
    ) -> int:
        served = self._served(call, name, version)
        ready = served.state in _READY
        return await self._json(
            request, send, 200 if ready else 503, {"name": name, "ready": ready}
        )

    # ----- inference ---------------------------------------------------------------
    async def _infer(
        self, request: Request, send: Send, call: Call, name: str, version: str | None
    ) -> int:
        served = self._served(call, name, version, request)
        self.plane.admit(call, served.name)
        limit = served.api.serving.max_request_bytes
        raw = await request.body(limit)
        encoding = request.headers.get("content-encoding")
        if encoding:
            raw = decompress(raw, encoding, limit)
        headers = request.headers
        header_length = headers.get("inference-header-content-length")
        if header_length is None and b"binary_data" not in raw and b"timeout" not in raw:
            return await self._infer_in_worker(request, send, call, served, raw)
        body = parse_infer_body(raw, header_length)
        self._refuse_unavailable(served)
        signature = served.signature
        if signature:
            if self._signatures.get(served) is not signature:
                self._signatures[served] = signature
        else:
            signature = await self._loaded_signature(served)
        check_signature(body, signature)
        forwarded = {k: headers[k] for k in _FORWARDED_HEADERS if k in headers}
        inference = InferenceRequest(
            api=served.name,
            version=served.version,
            request_id=request.request_id,
            body=b"",
            protocol="v2",
            headers=forwarded,
            deadline=(
                _deadline(body.parameters, served.api.serving.response_timeout_s)
                if body.parameters
                else None
            ),
            kind="tensors",
            tensors=decode_inputs(body),
            want_tensors=True,
            outputs=body.outputs,
        )
        response = await self.plane.predict(call, served, inference)
        if response.tensors is None:
            raise InferenceError(f"model '{name}' answered without output tensors")
        head: dict[str, Any] = {"model_name": served.name}
        if served.version is not None:
            head["model_version"] = served.version
        head["id"] = body.id if body.id is not None else request.request_id
        payload, binary_at = encode_infer_response(head, response.tensors, body.wants_binary)
        if binary_at is None:
            await send_bytes(send, 200, payload, "application/json", request.request_id)
        else:
            extra = {"Inference-Header-Content-Length": str(binary_at)}
            await send_bytes(
                send, 200, payload, "application/octet-stream", request.request_id, extra
            )
        return 200

    async def _infer_in_worker(
        self, request: Request, send: Send, call: Call, served: ServedApi, raw: bytes
    ) -> int:
        """A JSON-only request: the worker parses, checks and answers it (`kind="v2json"`).

        The server is the one process every request crosses, so it only forwards
        bytes; requests with binary data, binary outputs or a `timeout` take `_infer`.
        """
        self._refuse_unavailable(served)
        headers = request.headers
        inference = InferenceRequest(
            api=served.name,
            version=served.version,
            request_id=request.request_id,
            body=raw,
            protocol="v2",
            headers={k: headers[k] for k in _FORWARDED_HEADERS if k in headers},
            kind="v2json",
            want_tensors=True,
        )
        response = await self.plane.predict(call, served, inference)
        await send_bytes(
            send,
            200,
            response.body,
            response.content_type,
            request.request_id,
            response.headers or None,
        )
        return 200

    # ----- repository extension ----------------------------------------------------
    async def _index(self, request: Request, send: Send, call: Call) -> int:
        options = _small_json(await request.body(_SMALL_BODY))
        only_ready = options.get("ready") is True
        entries = []
        for group in call.view.groups.values():
            for served in sorted(group.versions.values(), key=lambda s: _version_key(s.version)):
                state = served.state
                if only_ready and state not in _READY:
                    continue
                entry: dict[str, Any] = {"name": group.name}
                if served.version is not None:
                    entry["version"] = served.version
                entry["state"] = _STATES.get(state, state.upper())
                if state == "unloaded":
                    entry["reason"] = "unloaded"
                elif state == "scaled to zero":
                    entry["reason"] = "scaled to zero: the next request starts a worker"
                elif state == "failed":
                    entry["reason"] = self.plane.shown_error(call, served) or "failed to load"
                entries.append(entry)
        return await self._json(request, send, 200, entries)

    async def _load_or_unload(
        self, request: Request, send: Send, call: Call, name: str, action: str
    ) -> int:
        group = self._group(call, name)
        options = _small_json(await request.body(_SMALL_BODY))
        params = options.get("parameters") or {}
        if action == "load" and isinstance(params, dict):
            if "config" in params or any(str(k).startswith("file:") for k in params):
                raise InvalidInput(
                    "loading a model with a new config or files is not supported here: "
                    "change kiln.yaml and deploy it again"
                )
        versions = list(group.versions.values())
        if action == "unload":
            await asyncio.gather(*(served.unload() for served in versions))
            return await self._json(request, send, 200, {"name": name, "unload": True})
        await asyncio.gather(*(served.load() for served in versions))
        for served in versions:
            self._refuse_unavailable(served)
        return await self._json(request, send, 200, {"name": name, "load": True})


def _tensor_metadata(spec: dict[str, Any]) -> dict[str, Any]:
    shape = spec.get("shape")
    return {
        "name": spec.get("name"),
        "datatype": spec.get("datatype") or "BYTES",
        "shape": [-1 if d is None or d < 0 else d for d in shape] if shape else [-1],
    }


def _small_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the request body must be a JSON object")
    return value


def _deadline(parameters: dict[str, Any], response_timeout_s: float) -> float | None:
    """Triton's `timeout` parameter (microseconds), never past the API's response timeout."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise InvalidInput("the parameter timeout must be a positive integer (microseconds)")
    return time.monotonic() + min(timeout / 1e6, response_timeout_s)
