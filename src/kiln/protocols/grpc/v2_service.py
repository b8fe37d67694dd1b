"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe V2) over gRPC.

What tritonclient's and KServe's gRPC clients call. Every RPC resolves, admits,
predicts, maps errors and meters through the data plane (`rpc.Guard`), and
reads models the way the REST adapter does (`protocols/v2.py`: the same
version lookup, signature wait and 503s), so both transports answer alike.
Open without a key, as their REST twins are: ServerLive, ServerReady. The
repository RPCs (index, load, unload) need a `manage` key; the rest an
`invoke` key.

ModelStreamInfer answers each request of the stream in order: a streaming
handler (`streaming: true` under `metadata:` or `config:`) with one response
per item it yields, each a BYTES output `output` of shape [1] holding the item
(JSON, text or bytes, as TorchServe streams it) and the parameter
`content_type`; any other model with one response per request. An error is a
response with `error_message`, and the stream goes on, as in Triton.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

from kiln import __version__
from kiln.errors import InferenceError, InvalidInput, KilnError, NotFound
from kiln.protocols.grpc import v2_tensors
from kiln.protocols.grpc.messages import V2_SERVICE, message
from kiln.protocols.grpc.rpc import Guard, RpcMeta, check_size, read_metadata
from kiln.protocols.torchserve import declares_streaming
from kiln.protocols.v2 import (
    _PLATFORMS,
    _READY,
    _STATES,
    EXTENSIONS,
    OpenInferenceV2,
    _tensor_metadata,
    _version_key,
)
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ServedApi
from kiln.serving.types import InferenceRequest, Tensor
from kiln.serving.v2_signature import check_signature

_M = "inference."
STREAM_OUTPUT = "output"


def _m(name: str) -> Any:
    return message(_M + name)


class OpenInferenceGrpc:
    """The V2 servicer: one method per RPC, named as the service names them."""

    def __init__(self, plane: DataPlane, log: Any, metrics: Any = None) -> None:
        self.plane = plane
        self.guard = Guard(plane, log, metrics, "grpc-v2", V2_SERVICE)
        # The REST adapter's model lookup, signature cache and 503 rules, shared.
        self.rest = OpenInferenceV2(plane, log)
        self.infer_response = _m("ModelInferResponse")
        self.stream_response = _m("ModelStreamInferResponse")

    # ----- health and metadata ---------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        async def body(call: Call, meta: RpcMeta) -> Any:
            return _m("ServerLiveResponse")(live=True)

        return await self.guard.unary(context, "ServerLive", None, body)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            return _m("ServerReadyResponse")(ready=self.rest._server_ready())

        return await self.guard.unary(context, "ServerReady", None, body)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            return _m("ServerMetadataResponse")(
                name="kiln", version=__version__, extensions=EXTENSIONS
            )

        return await self.guard.unary(context, "ServerMetadata", "invoke", body)

    def _served(
        self, call: Call, name: str, version: str, infer: bool = False, meta: RpcMeta | None = None
    ) -> ServedApi:
        """The version a request means, with REST's 404s; for inference without a
        version, the one the data plane picks (`DataPlane.resolve`: a traffic split)."""
        served = self.rest._served(call, name, version or None)
        if infer and not version:
            # the metadata is read for a traffic_sticky_header, as REST reads headers
            served = self.plane.resolve(call, name, None, None if meta is None else meta.headers)
        call.api = served.name
        return served

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            # An unknown model or version is not ready (Triton's answer), not an error.
            try:
                served = self._served(call, request.name, request.version)
            except NotFound:
                return _m("ModelReadyResponse")(ready=False)
            return _m("ModelReadyResponse")(ready=served.state in _READY)

        return await self.guard.unary(context, "ModelReady", "invoke", body)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            served = self._served(call, request.name, request.version)
            signature = await self.rest._loaded_signature(served)
            versions = sorted(
                (v for v in call.view.groups[request.name].versions if v is not None),
                key=_version_key,
            )
            return _m("ModelMetadataResponse")(
                name=request.name,
                versions=versions,
                platform=_PLATFORMS.get(served.api.runtime, served.api.runtime),
                inputs=[_tensor_metadata(s) for s in signature.get("inputs") or []],
                outputs=[_tensor_metadata(s) for s in signature.get("outputs") or []],
            )

        return await self.guard.unary(context, "ModelMetadata", "invoke", body)

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        """What Kiln can state of Triton's model configuration: tensors, batching, runtime."""

        async def body(call: Call, meta: RpcMeta) -> Any:
            served = self._served(call, request.name, request.version)
            signature = await self.rest._loaded_signature(served)

            def tensors(kind: str) -> list[dict[str, Any]]:
                out = []
                for spec in signature.get(kind) or []:
                    info = _tensor_metadata(spec)
                    datatype = "STRING" if info["datatype"] == "BYTES" else info["datatype"]
                    out.append(
                        {
                            "name": info["name"],
                            "data_type": f"TYPE_{datatype}",
                            "dims": info["shape"],
                        }
                    )
                return out

            config = _m("ModelConfig")(
                name=request.name,
                platform=_PLATFORMS.get(served.api.runtime, served.api.runtime),
                backend=served.api.runtime,
                max_batch_size=served.max_batch_size if served.max_batch_size > 1 else 0,
                input=tensors("inputs"),
                output=tensors("outputs"),
            )
            return _m("ModelConfigResponse")(config=config)

        return await self.guard.unary(context, "ModelConfig", "invoke", body)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Requests counted per version (Kiln keeps no per-stage durations here)."""

        async def body(call: Call, meta: RpcMeta) -> Any:
            if request.name:
                groups = [self.rest._group(call, request.name)]
            else:
                groups = list(call.view.groups.values())
            stats = []
            for group in groups:
                for served in group.versions.values():
                    if request.version and served.version != request.version:
                        continue
                    stats.append(
                        {
                            "name": group.name,
                            "version": served.version or "",
                            "inference_count": served.stats.get("requests", 0),
                            "execution_count": served.stats.get("batches", 0),
                        }
                    )
            return _m("ModelStatisticsResponse")(model_stats=stats)

        return await self.guard.unary(context, "ModelStatistics", "invoke", body)

    # ----- inference -------------------------------------------------------------------
    async def _predict(
        self, call: Call, meta: RpcMeta, request: Any, time_remaining: float | None
    ) -> Any:
        """One ModelInferRequest through the data plane; its ModelInferResponse."""
        served = self._served(call, request.model_name, request.model_version, True, meta)
        inference = await self._inference(call, meta, served, request, time_remaining, True)
        response = await self.plane.predict(call, served, inference)
        if response.tensors is None:
            raise InferenceError(f"model '{request.model_name}' answered without output tensors")
        answer = self.infer_response(
            model_name=request.model_name,
            model_version=served.version or "",
            id=request.id,
        )
        return v2_tensors.fill_response(answer, response.tensors)

    async def _inference(
        self,
        call: Call,
        meta: RpcMeta,
        served: ServedApi,
        request: Any,
        time_remaining: float | None,
        want_tensors: bool,
    ) -> InferenceRequest:
        """Admit a ModelInferRequest, check its size, its tensors against the loaded
        signature and the API's state (REST V2's rules), and make it Kiln's request."""
        self.plane.admit(call, served.name)
        check_size(request, served)
        body = v2_tensors.parse_request(request)
        self.rest._refuse_unavailable(served)
        signature = await self.rest._loaded_signature(served)
        check_signature(body, signature)
        return InferenceRequest(
            api=served.name,
            version=served.version,
            request_id=meta.request_id,
            body=b"",
            protocol="v2",
            headers=_forwarded(meta),
            deadline=(
                v2_tensors.deadline(body, time_remaining, served.api.serving.response_timeout_s)
                if want_tensors
                else None
            ),
            kind="tensors",
            tensors=v2_tensors.decode(body),
            want_tensors=want_tensors,
            outputs=body.outputs if want_tensors else None,
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            return await self._predict(call, meta, request, context.time_remaining())

        return await self.guard.unary(context, "ModelInfer", "invoke", body)

    async def ModelStreamInfer(  # noqa: N802
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Each request in order: its responses, or one with `error_message`."""
        meta = read_metadata(context)
        guard = self.guard
        try:
            first = guard.open(meta, "invoke")  # the stream's key, checked once
        except KilnError as exc:
            from kiln.protocols.grpc.rpc import status_code

            await context.abort(status_code(exc.status), exc.message)
            return
        async for request in requests:
            started = time.perf_counter()
            call = self.plane.call(first.caller)
            status = 200
            try:
                served = self._served(call, request.model_name, request.model_version, True, meta)
                if declares_streaming(served.api):
                    async for item in self._stream_items(call, meta, served, request):
                        yield item
                else:
                    answer = await self._predict(call, meta, request, None)
                    yield self.stream_response(infer_response=answer)
            except KilnError as raised:
                err = self.plane.public_error(call, raised)
                status = err.status
                yield self.stream_response(
                    error_message=err.message,
                    infer_response=self.infer_response(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            except asyncio.CancelledError:
                status = 499
                raise
            except Exception:  # a bug in Kiln itself: log it, never show it
                traceback.print_exc(file=sys.stderr)
                status = 500
                yield self.stream_response(
                    error_message="internal server error; the details are in the server log"
                )
            finally:
                guard.done(call, "ModelStreamInfer", status, started, meta)

    async def _stream_items(
        self, call: Call, meta: RpcMeta, served: ServedApi, request: Any
    ) -> AsyncIterator[Any]:
        """A streaming handler's items, each one response (a BYTES tensor `output`)."""
        inference = await self._inference(call, meta, served, request, None, False)
        async for data, content_type in self.plane.stream(call, served, inference):
            answer = self.infer_response(
                model_name=request.model_name, model_version=served.version or "", id=request.id
            )
            answer.parameters["content_type"].string_param = content_type
            v2_tensors.fill_response(answer, [Tensor(STREAM_OUTPUT, "BYTES", [1], [data])])
            yield self.stream_response(infer_response=answer)

    # ----- repository extension (a `manage` key) ----------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            models = []
            for group in call.view.groups.values():
                ordered = sorted(group.versions.values(), key=lambda s: _version_key(s.version))
                for served in ordered:
                    state = served.state
                    if request.ready and state not in _READY:
                        continue
                    reason = ""
                    if state == "unloaded":
                        reason = "unloaded"
                    elif state == "scaled to zero":
                        reason = "scaled to zero: the next request starts a worker"
                    elif state == "failed":
                        reason = self.plane.shown_error(call, served) or "failed to load"
                    models.append(
                        {
                            "name": group.name,
                            "version": served.version or "",
                            "state": _STATES.get(state, state.upper()),
                            "reason": reason,
                        }
                    )
            return _m("RepositoryIndexResponse")(models=models)

        return await self.guard.unary(context, "RepositoryIndex", "manage", body)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            group = self.rest._group(call, request.model_name)
            call.api = group.name
            keys = set(request.parameters)
            if "config" in keys or any(k.startswith("file:") for k in keys):
                raise InvalidInput(
                    "loading a model with a new config or files is not supported here: "
                    "change kiln.yaml and deploy it again"
                )
            versions = list(group.versions.values())
            await asyncio.gather(*(served.load() for served in versions))
            for served in versions:
                self.rest._refuse_unavailable(served)
            return _m("RepositoryModelLoadResponse")()

        return await self.guard.unary(context, "RepositoryModelLoad", "manage", body)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def body(call: Call, meta: RpcMeta) -> Any:
            group = self.rest._group(call, request.model_name)
            call.api = group.name
            await asyncio.gather(*(served.unload() for served in group.versions.values()))
            return _m("RepositoryModelUnloadResponse")()

        return await self.guard.unary(context, "RepositoryModelUnload", "manage", body)


_FORWARDED = ("user-agent", "x-request-id")


def _forwarded(meta: RpcMeta) -> dict[str, str]:
    return {k: meta.headers[k] for k in _FORWARDED if k in meta.headers}
