"""What every Kiln RPC shares: its metadata, its key, its error, its metering.

`read_metadata` is the one place an RPC's metadata is read (with tracing on, the
caller's `traceparent` starts the RPC's trace there, as protocols/http.py does
for HTTP). Keys are read and checked exactly
as on REST (`protocols/auth.py`: `x-api-key`, or `authorization: Bearer ...`),
then removed. `Guard.unary` runs one call: authenticate, run the body, turn a
`KilnError` into the caller's error (`DataPlane.public_error`) and its gRPC
status (`STATUS_CODES`, the one table), meter it (`DataPlane.finish`, with the
HTTP status REST would have answered, so usage reads the same), and count and
log it as the inference port does.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]  # no stubs: types-grpcio is not a dependency

from kiln.errors import KilnError
from kiln.protocols.auth import authenticate
from kiln.protocols.http import new_request_id
from kiln.serving import tracing
from kiln.serving.data_plane import Call, DataPlane

T = TypeVar("T")
_SYSTEM = "kiln"

# Kiln's error (by its HTTP status) -> the gRPC status code: the one table.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,  # InvalidInput
    401: grpc.StatusCode.UNAUTHENTICATED,  # Unauthorized
    403: grpc.StatusCode.PERMISSION_DENIED,  # Forbidden
    404: grpc.StatusCode.NOT_FOUND,  # NotFound (also another user's API)
    405: grpc.StatusCode.UNIMPLEMENTED,  # MethodNotAllowed (e.g. registration turned off)
    409: grpc.StatusCode.ALREADY_EXISTS,  # Conflict
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # PayloadTooLarge
    415: grpc.StatusCode.INVALID_ARGUMENT,  # UnsupportedMediaType
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # TooManyRequests (quota, rate limit)
    499: grpc.StatusCode.CANCELLED,  # the client went away
    500: grpc.StatusCode.INTERNAL,  # InferenceError, InternalError
    501: grpc.StatusCode.UNIMPLEMENTED,  # NotImplementedByApi
    503: grpc.StatusCode.UNAVAILABLE,  # Unavailable (loading, failed, queue full)
    504: grpc.StatusCode.DEADLINE_EXCEEDED,  # Timeout
}


def status_code(status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status; one outside the table by its class."""
    code = STATUS_CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.FAILED_PRECONDITION if status < 500 else grpc.StatusCode.INTERNAL


class RpcMeta:
    """One RPC's metadata as text headers (lower-case keys; `-bin` keys left out)."""

    __slots__ = ("headers", "request_id", "trace")

    def __init__(self, headers: dict[str, str], rpc_path: str | None = None) -> None:
        self.headers = headers
        self.request_id = headers.get("x-request-id") or new_request_id()
        # The RPC's trace (serving/tracing.py), started here from the caller's
        # `traceparent` when tracing is on; None otherwise (one check when off).
        self.trace: tracing.RequestTrace | None = (
            tracing.start_request(headers.get, self.request_id, "gRPC", rpc_path)
            if tracing.ENABLED and rpc_path is not None
            else None
        )


def read_metadata(context: Any, rpc_path: str | None = None) -> RpcMeta:
    """The one place an RPC's invocation metadata is read (keys, request id, tracing).

    `rpc_path` (/service/method) names the RPC's trace; without it the RPC is not
    traced (a bidirectional stream carries many requests: none of them is traced).
    """
    headers: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            headers[key.lower()] = value
    return RpcMeta(headers, rpc_path)


def error_metadata(err: KilnError, call: Call | None) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of an error: Retry-After and the rate-limit headers, as REST sends."""
    out: list[tuple[str, str]] = []
    retry = getattr(err, "retry_after", None)
    if retry is not None:
        out.append(("retry-after", str(retry)))
    if call is not None and call.rate_headers:
        out.extend((k.decode(), v.decode()) for k, v in call.rate_headers)
    return tuple(out)


def check_size(request: Any, served: Any) -> None:
    """Refuse (413, RESOURCE_EXHAUSTED) a request message over the API's
    serving.max_request_bytes, as REST refuses a body: one rule for every RPC."""
    limit = served.api.serving.max_request_bytes
    size = request.ByteSize()
    if size > limit:
        from kiln.errors import PayloadTooLarge

        raise PayloadTooLarge(
            f"the request is {size} bytes, over this API's limit of {limit} bytes; send "
            f"less data per request or raise serving.max_request_bytes in kiln.yaml"
        )


class Guard:
    """Runs RPCs the way the inference port runs HTTP requests (protocols/app.py)."""

    def __init__(
        self, plane: DataPlane, log: Any, metrics: Any, protocol: str, service: str
    ) -> None:
        self.plane = plane
        self.log = log
        self.metrics = metrics
        self.protocol = protocol  # the metrics label: grpc-v2, grpc-torchserve
        self.service = service  # the full service name, for log lines

    def open(self, meta: RpcMeta, scope: str | None) -> Call:
        """The RPC's Call: its principal when keys are on and the RPC needs one (`scope`)."""
        authority = self.plane.authority
        if scope is None or authority is None:
            call = self.plane.call(None)
        else:
            call = self.plane.call(authenticate(authority, meta, scope))
        call.trace = meta.trace  # None unless traced: the data plane hands it to the batch
        return call

    async def unary(
        self,
        context: Any,
        rpc: str,
        scope: str | None,
        body: Callable[[Call, RpcMeta], Awaitable[T]],
        meta: RpcMeta | None = None,
    ) -> T:
        """Authenticate, run `body`, map its error, meter, count and log: one call."""
        started = time.perf_counter()
        if meta is None:
            meta = read_metadata(context, f"/{self.service}/{rpc}")
        call = self.plane.call(None)
        status = 500
        failure: KilnError | None = None
        try:
            call = self.open(meta, scope)
            result = await body(call, meta)
            status = 200
            if call.rate_headers:
                context.set_trailing_metadata(
                    tuple((k.decode(), v.decode()) for k, v in call.rate_headers)
                )
            return result
        except KilnError as raised:
            failure = self.plane.public_error(call, raised)
            status = failure.status
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception:  # a bug in Kiln itself: log it, never show it
            traceback.print_exc(file=sys.stderr)
            failure = KilnError("internal server error; the details are in the server log")
            status = 500
        finally:
            self.done(call, rpc, status, started, meta)
        await context.abort(
            status_code(failure.status), failure.message, error_metadata(failure, call)
        )
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def done(self, call: Call, rpc: str, status: int, started: float, meta: RpcMeta) -> None:
        """Meter the call (once, if admitted), count it and log it as the HTTP app does."""
        self.plane.finish(call, status)
        trace = meta.trace
        if trace is not None:
            trace.finish(status, call.api, call.version, f"/{self.service}/{rpc}", self.protocol)
        api = call.api or _SYSTEM
        if self.metrics is not None and api != _SYSTEM:
            seconds = time.perf_counter() - started
            self.metrics.request(api, self.protocol, status, seconds, call.version)
        if api != _SYSTEM or status >= 400:
            record: dict[str, Any] = {
                "event": "request",
                "method": "gRPC",
                "path": f"/{self.service}/{rpc}",
                "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "request_id": meta.request_id,
            }
            if trace is not None:
                record["trace_id"] = trace.trace_id
                record["span_id"] = trace.span_id
            self.log.write(api, record)
