"""TorchServe's gRPC services: `InferenceAPIsService` and `ManagementAPIsService`.

Inference (TorchServe's port 7070): Ping (open, like `/ping`), Predictions,
StreamPredictions (a streaming handler's items, else its one answer) and
StreamPredictions2 (many requests on one stream; an error is a response with
`status`, and the stream goes on). A request's `input` map becomes the body:
one entry is the raw body (decoded as a REST body without a Content-Type is:
JSON for tensor APIs, else bytes), several are multipart parts in map order.
Everything goes through the data plane (`rpc.Guard`).

Management (TorchServe's port 7071): each RPC is answered by the management
REST route it stands for (`GET/PUT/POST/DELETE /models...`), called in process
on the management app with the caller's key, so the same gate (a `manage`
key; register and unregister for the admin only, and only with
`--enable-model-api`) and the same handlers decide. `msg` is that route's JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from kiln.errors import KilnError, NotFound, Unavailable
from kiln.protocols.grpc.messages import TS_INFERENCE_SERVICE, TS_MANAGEMENT_SERVICE, message
from kiln.protocols.grpc.rpc import Guard, RpcMeta, check_size, read_metadata, status_code
from kiln.protocols.in_process import call_asgi
from kiln.protocols.torchserve import declares_streaming, resolve
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ServedApi
from kiln.serving.types import InferenceRequest, Part

_I = "org.pytorch.serve.grpc.inference."
_MG = "org.pytorch.serve.grpc.management."
_FORWARDED = ("user-agent", "x-request-id")


class TorchServeInferenceGrpc:
    def __init__(self, plane: DataPlane, log: Any, metrics: Any = None) -> None:
        self.plane = plane
        self.guard = Guard(plane, log, metrics, "grpc-torchserve", TS_INFERENCE_SERVICE)
        self.response = message(_I + "PredictionResponse")

    async def Ping(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        async def body(call: Call, meta: RpcMeta) -> Any:
            apis = self.plane.registry.all()
            healthy = all(s.healthy() and s.state != "loading" for s in apis)
            if not healthy:
                raise Unavailable("Unhealthy: an API is still loading or has failed")
            health = orjson.dumps({"status": "Healthy"}).decode()
            return message(_I + "TorchServeHealthResponse")(health=health)

        return await self.guard.unary(context, "Ping", None, body)

    def _request(self, call: Call, meta: RpcMeta, request: Any) -> tuple[ServedApi, Any]:
        served = resolve(call.view, request.model_name, request.model_version or None)
        if not request.model_version:
            served = self.plane.resolve(call, served.name, None, meta.headers)  # traffic split
        call.api = served.name
        self.plane.admit(call, served.name)
        check_size(request, served)
        inputs = dict(request.input)
        inference = InferenceRequest(
            api=served.name,
            version=served.version,
            request_id=meta.request_id,
            body=b"",
            content_type="",
            protocol="torchserve",
            headers={k: meta.headers[k] for k in _FORWARDED if k in meta.headers},
            kind="raw",
        )
        if len(inputs) == 1:
            inference.body = next(iter(inputs.values()))
        elif inputs:
            inference.kind = "parts"
            inference.parts = [Part(name=k, data=v) for k, v in inputs.items()]
        return served, inference

    async def _answer(self, call: Call, served: ServedApi, inference: Any) -> bytes:
        response = await self.plane.predict(call, served, inference)
        if response.status >= 400:  # the handler chose an error status
            raise KilnError(response.body.decode(errors="replace"), status=response.status)
        return response.body

    async def Predictions(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            served, inference = self._request(call, meta, request)
            return self.response(prediction=await self._answer(call, served, inference))

        return await self.guard.unary(context, "Predictions", "invoke", body)

    async def _items(self, call: Call, meta: RpcMeta, request: Any) -> AsyncIterator[bytes]:
        served, inference = self._request(call, meta, request)
        if declares_streaming(served.api):
            async for data, _content_type in self.plane.stream(call, served, inference):
                yield data
        else:
            yield await self._answer(call, served, inference)

    async def StreamPredictions(  # noqa: N802
        self, request: Any, context: Any
    ) -> AsyncIterator[Any]:
        meta = read_metadata(context, f"/{self.guard.service}/StreamPredictions")
        started = time.perf_counter()
        call = self.plane.call(None)
        status = 200
        failure: KilnError | None = None
        try:
            call = self.guard.open(meta, "invoke")
            async for data in self._items(call, meta, request):
                yield self.response(prediction=data)
        except KilnError as raised:
            failure = self.plane.public_error(call, raised)
            status = failure.status
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.guard.done(call, "StreamPredictions", status, started, meta)
        if failure is not None:
            await context.abort(status_code(failure.status), failure.message)

    async def StreamPredictions2(  # noqa: N802
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        meta = read_metadata(context)
        try:
            first = self.guard.open(meta, "invoke")
        except KilnError as exc:
            await context.abort(status_code(exc.status), exc.message)
            return
        async for request in requests:
            started = time.perf_counter()
            call = self.plane.call(first.caller)
            status = 200
            sequence = request.sequenceId if request.HasField("sequenceId") else None
            try:
                async for data in self._items(call, meta, request):
                    yield self.response(prediction=data, sequenceId=sequence)
            except KilnError as raised:
                err = self.plane.public_error(call, raised)
                status = err.status
                error = message("google.rpc.Status")(
                    code=status_code(err.status).value[0], message=err.message
                )
                yield self.response(sequenceId=sequence, status=error)
            except asyncio.CancelledError:
                status = 499
                raise
            finally:
                self.guard.done(call, "StreamPredictions2", status, started, meta)


class TorchServeManagementGrpc:
    """Each RPC answered by its management REST route, in process, with the caller's key."""

    def __init__(self, plane: DataPlane, log: Any, management_app: Any) -> None:
        self.app = management_app  # the (gated) management ASGI app; None: no management port
        self.guard = Guard(plane, log, None, "grpc-management", TS_MANAGEMENT_SERVICE)
        self.response = message(_MG + "ManagementResponse")

    async def _rest(self, context: Any, rpc: str, method: str, path: str, query: dict) -> Any:
        async def body(call: Call, meta: RpcMeta) -> Any:
            if self.app is None:
                raise NotFound(
                    "the management API is off on this server (no management port); start it "
                    "with a --management-port to use ManagementAPIsService"
                )
            key_headers = [
                (name.encode(), meta.headers[name].encode())
                for name in ("x-api-key", "authorization")
                if name in meta.headers
            ]  # only the key travels
            status, payload = await call_asgi(
                self.app, method, path, query=query, headers=key_headers
            )
            if status >= 400:
                try:
                    text = orjson.loads(payload).get("message") or payload.decode()
                except (orjson.JSONDecodeError, AttributeError):
                    text = payload.decode(errors="replace")
                raise KilnError(text, status=status)
            return self.response(msg=payload.decode(errors="replace"))

        # The REST gate checks the key (manage scope, admin for register/unregister).
        return await self.guard.unary(context, rpc, None, body)

    @staticmethod
    def _model_path(name: str, version: str, tail: str = "") -> str:
        path = f"/models/{quote(name, safe='')}"
        if version:
            path += f"/{quote(version, safe='')}"
        return path + tail

    async def DescribeModel(self, request: Any, context: Any) -> Any:  # noqa: N802
        query = {"customized": "true"} if request.customized else {}
        path = self._model_path(request.model_name, request.model_version)
        return await self._rest(context, "DescribeModel", "GET", path, query)

    async def ListModels(self, request: Any, context: Any) -> Any:  # noqa: N802
        query = {}
        if request.limit:
            query["limit"] = str(request.limit)
        if request.next_page_token:
            query["next_page_token"] = str(request.next_page_token)
        return await self._rest(context, "ListModels", "GET", "/models", query)

    async def RegisterModel(self, request: Any, context: Any) -> Any:  # noqa: N802
        query = {"url": request.url}
        for field in ("model_name", "handler", "runtime"):
            if getattr(request, field):
                query[field] = getattr(request, field)
        for field in (
            "batch_size", "initial_workers", "max_batch_delay", "response_timeout"
        ):  # fmt: skip
            if getattr(request, field):
                query[field] = str(getattr(request, field))
        if request.synchronous:
            query["synchronous"] = "true"
        return await self._rest(context, "RegisterModel", "POST", "/models", query)

    async def ScaleWorker(self, request: Any, context: Any) -> Any:  # noqa: N802
        query = {"min_worker": str(request.min_worker)}
        if request.max_worker:
            query["max_worker"] = str(request.max_worker)
        if request.synchronous:
            query["synchronous"] = "true"
        path = self._model_path(request.model_name, request.model_version)
        return await self._rest(context, "ScaleWorker", "PUT", path, query)

    async def SetDefault(self, request: Any, context: Any) -> Any:  # noqa: N802
        path = self._model_path(request.model_name, request.model_version, "/set-default")
        return await self._rest(context, "SetDefault", "PUT", path, {})

    async def UnregisterModel(self, request: Any, context: Any) -> Any:  # noqa: N802
        path = self._model_path(request.model_name, request.model_version)
        return await self._rest(context, "UnregisterModel", "DELETE", path, {})
