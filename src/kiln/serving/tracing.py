"""OpenTelemetry traces for inference requests, exported over OTLP (HTTP or gRPC).

Off unless the server is given an OTLP endpoint (`--otlp-endpoint`) or the
standard variables name one (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
OTEL_EXPORTER_OTLP_ENDPOINT). Off, the hot path pays one check of the
module-level `ENABLED` when a request arrives (protocols/http.py `Request`)
and one per batch where a batch is answered (serving/dispatch.py); everything
after that follows a `trace` attribute that stays None, and the SDK is never
imported (it is the optional `otel` extra).

On, each request gets one trace (the caller's, when it sent a W3C
`traceparent`), recorded entirely in the server process:

    {METHOD} {path}        SERVER   arrival -> answer; kiln.request_id, kiln.api, ...
      kiln.route                    arrival -> the adapter and API were found
      kiln.auth                     the API key check (only with keys on)
      kiln.queue                    enqueued -> written to a worker
      kiln.batch                    written to a worker -> its reply; kiln.batch.size
        kiln.pre_inference         the worker got the batch -> its first model call
        kiln.model                 first model call -> last model call returned
        kiln.post_inference        -> the reply was encoded
      kiln.answer                   reply decoded -> response handed to the HTTP layer

Workers export nothing: the sandbox cuts their network, and an exporter in each
worker would cost every replica a thread and a connection. A traced request's
item carries its trace context (for the worker's log lines); the worker sends
the wall-clock times of the batch's phases back in its reply
(`messages.ReplyItem.timings`, on its first item), and the server records them as the batch's
children with explicit start and end times. Server and worker share the
machine's clock, so the times line up.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.serving.batcher import Pending

__all__ = [
    "ENABLED",
    "RequestTrace",
    "TracingError",
    "configure",
    "context_from_headers",
    "record_batch",
    "settings_from_env",
    "shutdown",
    "start_request",
]

# The one check the hot path makes. Set by `configure`, never changed while serving.
ENABLED = False

PROTOCOLS = ("http/protobuf", "grpc")
_tracer: Any = None  # opentelemetry.trace.Tracer once configured
_provider: Any = None
_propagator: Any = None
# opentelemetry.trace names, bound once by `configure` (no import statement per span)
_set_span_in_context: Any = None
_get_current_span: Any = None
_SERVER: Any = None
_error_status: Any = None
# time.time_ns() - time.monotonic_ns(): the queue's monotonic stamps as epoch nanoseconds.
_offset_ns = 0


class TracingError(ValueError):
    """Tracing was asked for but cannot start: a bad setting, or the extra is missing."""


# ----- settings -----------------------------------------------------------------------


def settings_from_env(
    endpoint: str | None = None,
    protocol: str | None = None,
    env: dict[str, str] | os._Environ[str] | None = None,
) -> tuple[str, str] | None:
    """(traces endpoint URL, protocol) when tracing is on, else None.

    `endpoint` (the --otlp-endpoint flag) is a base URL like OTEL_EXPORTER_OTLP_ENDPOINT:
    for OTLP/HTTP `/v1/traces` is added unless the URL already ends with it.
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, when set and no flag is given, is used as it is
    (the specification's rule for the per-signal variable). The protocol is the argument,
    else OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else
    http/protobuf. OTEL_SDK_DISABLED=true and OTEL_TRACES_EXPORTER=none turn it off.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none" and not endpoint:
        return None
    chosen = (
        protocol
        or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if chosen not in PROTOCOLS:
        raise TracingError(
            f"OTLP protocol {chosen!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    signal_url = None if endpoint else env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if signal_url:
        url = signal_url.strip()
    elif base:
        url = base.strip()
        if chosen == "http/protobuf" and not url.rstrip("/").endswith("/v1/traces"):
            url = url.rstrip("/") + "/v1/traces"
    else:
        return None
    if "://" not in url:
        raise TracingError(
            f"OTLP endpoint {url!r} is not a URL; give one like http://127.0.0.1:4318 "
            f"(OTLP/HTTP) or http://127.0.0.1:4317 (gRPC)"
        )
    return url, chosen


def configure(
    endpoint: str | None = None,
    protocol: str | None = None,
    service_name: str | None = None,
    exporter: Any = None,
) -> bool:
    """Turn tracing on from the flag or the OTEL_* variables; True when it is on.

    Called once by the server before it binds its ports. `exporter` (a SpanExporter)
    replaces OTLP, for benchmarks and tests that export in process. The sampler is the
    SDK's: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: parentbased_always_on,
    so a caller's sampled flag is followed). Spans are batched and sent by the SDK's
    background thread (OTEL_BSP_* variables), flushed when the process exits.
    """
    global ENABLED, _tracer, _provider, _propagator, _offset_ns
    global _set_span_in_context, _get_current_span, _SERVER, _error_status
    settings = settings_from_env(endpoint, protocol)
    if settings is None and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import (
            SpanKind,
            Status,
            StatusCode,
            get_current_span,
            set_span_in_context,
        )
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise TracingError(
            f"tracing needs the OpenTelemetry SDK ({exc.name} is missing): install Kiln "
            f"with the otel extra, e.g. pip install -e '.[otel]'"
        ) from None
    if exporter is None:
        assert settings is not None
        exporter = _exporter(*settings)
    version = _kiln_version()
    attributes: dict[str, Any] = {"service.version": version}
    if service_name or not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name or "kiln"
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    atexit.register(shutdown)
    _provider = provider
    _tracer = provider.get_tracer("kiln", version)
    _propagator = TraceContextTextMapPropagator()
    _set_span_in_context, _get_current_span = set_span_in_context, get_current_span
    _SERVER = SpanKind.SERVER
    _error_status = lambda status: Status(StatusCode.ERROR, f"HTTP {status}")  # noqa: E731
    _offset_ns = time.time_ns() - time.monotonic_ns()
    ENABLED = True
    return True


def _kiln_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln-serve")
    except PackageNotFoundError:
        return "unknown"


def _exporter(url: str, protocol: str) -> Any:
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as exc:
        raise TracingError(
            f"OTLP over {protocol} needs {exc.name}: install Kiln with the otel extra, "
            f"e.g. pip install -e '.[otel]'"
        ) from None
    if protocol == "grpc":
        return OTLPSpanExporter(endpoint=url, insecure=url.startswith("http://"))
    return OTLPSpanExporter(endpoint=url)


# At exit, buffered spans get this long to leave: a collector that is down must not hold
# up a server's stop (the exporter alone retries for OTEL_EXPORTER_OTLP_TIMEOUT, 10 s).
SHUTDOWN_GRACE_S = 3.0


def shutdown() -> None:
    """Send what is buffered and stop the exporter, waiting at most SHUTDOWN_GRACE_S
    (at exit; a second call does nothing)."""
    global ENABLED, _provider
    provider, _provider = _provider, None
    ENABLED = False
    if provider is not None:
        import threading

        closing = threading.Thread(target=provider.shutdown, name="kiln-otel-shutdown")
        closing.daemon = True
        closing.start()
        closing.join(SHUTDOWN_GRACE_S)


# ----- a request's trace --------------------------------------------------------------


class _Getter:
    """The propagator's view of a transport's headers through one `get(name)` function."""

    def __init__(self, get: Callable[[str], str | None]) -> None:
        self._get = get

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = self._get(key)
        return None if value is None else [value]

    def keys(self, carrier: Any) -> list[str]:
        return []


def context_from_headers(get: Callable[[str], str | None]) -> Any:
    """The caller's trace context from `traceparent`/`tracestate`, or None.

    `get(name)` reads one header by its lowercase name: `dict.get` of HTTP headers,
    or a lookup in gRPC metadata. A missing or malformed traceparent gives None
    (the request starts a new trace, as the W3C specification says).
    """
    if _propagator is None or not get("traceparent"):
        return None
    context = _propagator.extract(None, getter=_Getter(get))
    if not _get_current_span(context).get_span_context().is_valid:
        return None
    return context


def start_request(
    get: Callable[[str], str | None], request_id: str, method: str, path: str
) -> RequestTrace | None:
    """The trace of a request that arrived now (None when the sampler drops it)."""
    now = time.time_ns()
    span = _tracer.start_span(
        f"{method} {path}",
        context=context_from_headers(get),
        kind=_SERVER,
        start_time=now,
        attributes={
            "http.request.method": method,
            "url.path": path,
            "kiln.request_id": request_id,
        },
    )
    if not span.is_recording():
        return None
    return RequestTrace(span, now)


class RequestTrace:
    """One request's spans; the HTTP layer (or gRPC) starts it, the server ends it."""

    __slots__ = ("span", "context", "mark_ns", "replied_ns", "_traceparent")

    def __init__(self, span: Any, started_ns: int) -> None:
        self.span = span
        self.context = _set_span_in_context(span)
        self.mark_ns = started_ns  # the end of the last step recorded with `step`
        self.replied_ns = 0  # when the worker's answer was decoded (0: none came)
        self._traceparent: str | None = None

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    @property
    def span_id(self) -> str:
        return f"{self.span.get_span_context().span_id:016x}"

    @property
    def traceparent(self) -> str:
        """This request's server span as a W3C traceparent (for the worker's log lines)."""
        if self._traceparent is None:
            ctx = self.span.get_span_context()
            flags = int(ctx.trace_flags) & 0xFF
            self._traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags:02x}"
        return self._traceparent

    def step(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        """Record the step that just ended (route, auth) as a child span."""
        now = time.time_ns()
        _child(self.context, name, self.mark_ns, now, attributes)
        self.mark_ns = now

    def finish(
        self, status: int, api: str = "", version: str = "", route: str = "", protocol: str = ""
    ) -> None:
        """End the request's span with what the answer was (`kiln.answer` before it)."""
        now = time.time_ns()
        if self.replied_ns:
            _child(self.context, "kiln.answer", self.replied_ns, now, None)
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if api:
            span.set_attribute("kiln.api", api)
        if version:
            span.set_attribute("kiln.version", version)
        if route:
            span.set_attribute("http.route", route)
        if protocol:
            span.set_attribute("kiln.protocol", protocol)
        if status >= 500:
            span.set_status(_error_status(status))
        span.end(end_time=now)


def _child(
    parent: Any, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any] | None
) -> Any:
    """A finished span with explicit times; returns its context (for its children)."""
    span = _tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(end_ns, start_ns))
    return _set_span_in_context(span)


def record_batch(batch: Sequence[Pending], sent: float, outcomes: Sequence[Any]) -> None:
    """The queue, batch and worker spans of each traced request of an answered batch.

    `sent` is when the batch was written to the worker (monotonic seconds, like each
    request's `enqueued`); a reply's `worker_timings` are the worker's wall-clock
    nanoseconds [received, first model call, model done, reply encoded].
    """
    now = time.time_ns()
    offset = _offset_ns
    sent_ns = int(sent * 1e9) + offset
    size = len(batch)
    for pending, outcome in zip(batch, outcomes, strict=False):
        trace = pending.request.trace
        if trace is None:
            continue
        trace.replied_ns = now
        enqueued_ns = int(pending.enqueued * 1e9) + offset
        parent = trace.context
        _child(parent, "kiln.queue", enqueued_ns, sent_ns, None)
        attributes: dict[str, Any] = {
            "kiln.batch.size": size,
            "kiln.batch.wait_ms": round((sent_ns - enqueued_ns) / 1e6, 3),
        }
        error = isinstance(outcome, BaseException)
        if error:
            attributes["kiln.error"] = f"{type(outcome).__name__}: {outcome}"[:200]
        batch_ctx = _child(parent, "kiln.batch", sent_ns, now, attributes)
        timings = None if error else getattr(outcome, "worker_timings", None)
        if timings and len(timings) == 4:
            received, model_start, model_end, encoded = timings
            _child(batch_ctx, "kiln.pre_inference", received, model_start, None)
            _child(batch_ctx, "kiln.model", model_start, model_end, None)
            _child(batch_ctx, "kiln.post_inference", model_end, encoded, None)
