"""OpenTelemetry traces: a real `kiln serve` exports over OTLP to a receiver in this process.

The receivers are the OTLP collector's wire contract and nothing more: an HTTP server
on 127.0.0.1 that decodes `ExportTraceServiceRequest` protobufs posted to /v1/traces,
and a grpcio server implementing `TraceService/Export`. Every request is sent with
the client's own `traceparent` (or none) and the spans that arrive are checked as a
tree: ids, parents, names, attributes and times.
"""

from __future__ import annotations

import gzip
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from support import KilnServer, build_linear_onnx, write

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.proto.collector.trace.v1 import (  # noqa: E402
    trace_service_pb2,
    trace_service_pb2_grpc,
)

W = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)

HOOKS = """
import time

def pre_inference(sample, signature, metadata):
    time.sleep(0.06)
    return {"x": sample["values"]}


def post_inference(prediction, signature, metadata):
    time.sleep(0.04)
    return {"y": prediction[0].tolist()}
"""

HANDLERS = """
class Boom:
    def predict(self, payload, context):
        raise RuntimeError("the handler failed on purpose")
"""

CONFIG = """
- kind: api
  name: linear
  onnx: {model: model/linear.onnx}
- kind: api
  name: hooked
  onnx: {model: model/linear.onnx, request_handler: hooks.py}
- kind: api
  name: boom
  python: {handler: handlers.py:Boom}
"""


class Spans:
    """What a receiver got: one dict per span, any thread may add."""

    def __init__(self) -> None:
        self._spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, request: Any) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "status": span.status.code,
                            "resource": resource,
                        }
                    )
        with self._lock:
            self._spans.extend(found)

    def trace(self, trace_id: str, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        """The spans of one trace, once at least `count` of them arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = [s for s in self._spans if s["trace_id"] == trace_id]
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)

    def server_span(self, request_id: str, timeout: float = 15) -> dict[str, Any]:
        """The SERVER span whose kiln.request_id is `request_id`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for span in self._spans:
                    if span["attributes"].get("kiln.request_id") == request_id:
                        return span
            time.sleep(0.05)
        raise AssertionError(f"no span for request {request_id} arrived")


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class HttpReceiver:
    """OTLP/HTTP: POST /v1/traces with a protobuf ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans = Spans()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                spans.add(request)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC: opentelemetry.proto.collector.trace.v1.TraceService/Export."""

    def __init__(self) -> None:
        import grpc

        self.spans = Spans()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{port}"
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the service's name
        self.spans.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        self.server.stop(0)


def traceparent() -> tuple[str, str, str]:
    """A caller's (traceparent header, trace id, span id), sampled."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def project(root: Path) -> Path:
    build_linear_onnx(root / "model" / "linear.onnx", W)
    write(root / "hooks.py", HOOKS)
    write(root / "handlers.py", HANDLERS)
    write(root / "kiln.yaml", CONFIG)
    return root


# Export every 50 ms so a test waits for its spans a moment, not the SDK's 5 s default.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "kiln-under-test"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    got = HttpReceiver()
    yield got
    got.close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, receiver: HttpReceiver
) -> Iterator[KilnServer]:
    root = project(tmp_path_factory.mktemp("traced"))
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    srv = KilnServer(root, tmp_path_factory.mktemp("home"), env=env)
    yield srv
    srv.stop()


def by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    names: dict[str, dict[str, Any]] = {}
    for span in spans:
        assert span["name"] not in names, f"two spans named {span['name']}"
        names[span["name"]] = span
    return names


def within(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    return outer["start"] <= inner["start"] <= inner["end"] <= outer["end"]


ROUTES = {
    "native": ("/linear", {"x": [[1, 2, 3, 4]]}),
    "v2": (
        "/v2/models/linear/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    ),
    "v1": ("/v1/models/linear:predict", {"instances": [[1, 2, 3, 4]]}),
    "torchserve": ("/predictions/linear", {"x": [[1, 2, 3, 4]]}),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_callers_trace_continues_through_gateway_batch_and_worker(
    server: KilnServer, receiver: HttpReceiver, route: str
) -> None:
    path, body = ROUTES[route]
    header, trace_id, caller_span = traceparent()
    response = server.client.post(
        path, json=body, headers={"traceparent": header, "tracestate": "vendor=1"}
    )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]

    root = receiver.spans.server_span(request_id)
    assert root["trace_id"] == trace_id  # the caller's trace, not a new one
    assert root["parent"] == caller_span  # a child of the caller's span
    assert root["kind"] == 2  # SPAN_KIND_SERVER
    assert root["name"] == f"POST {path}"
    attributes = root["attributes"]
    assert attributes["kiln.api"] == "linear"
    assert attributes["kiln.request_id"] == request_id
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == path
    assert attributes["http.request.method"] == "POST"
    assert root["resource"]["service.name"] == "kiln-under-test"

    spans = receiver.spans.trace(trace_id, 8)
    names = by_name(spans)
    assert set(names) == {
        root["name"],
        "kiln.route",
        "kiln.queue",
        "kiln.batch",
        "kiln.pre_inference",
        "kiln.model",
        "kiln.post_inference",
        "kiln.answer",
    }
    for child in ("kiln.route", "kiln.queue", "kiln.batch", "kiln.answer"):
        assert names[child]["parent"] == root["span_id"], child
        assert within(names[child], root), child
    batch = names["kiln.batch"]
    assert batch["attributes"]["kiln.batch.size"] == 1
    assert batch["attributes"]["kiln.batch.wait_ms"] >= 0
    for phase in ("kiln.pre_inference", "kiln.model", "kiln.post_inference"):
        assert names[phase]["parent"] == batch["span_id"], phase
        assert within(names[phase], batch), phase
    # In order: queued, then the batch; in the worker pre -> model -> post; then the answer.
    assert names["kiln.queue"]["end"] <= batch["start"]
    assert names["kiln.pre_inference"]["end"] <= names["kiln.model"]["start"]
    assert names["kiln.model"]["end"] <= names["kiln.post_inference"]["start"]
    assert batch["end"] <= names["kiln.answer"]["start"]


def test_a_grpc_call_continues_the_callers_trace_and_meets_the_same_spans(
    server: KilnServer, receiver: HttpReceiver
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    address = orjson.loads((server.state / "server.json").read_bytes())["grpc"]["address"]
    header, trace_id, caller_span = traceparent()
    client = grpcclient.InferenceServerClient(address)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    result = client.infer("linear", [x], headers={"traceparent": header})
    assert result.as_numpy(result.get_response().outputs[0].name) is not None
    client.close()

    spans = receiver.spans.trace(trace_id, 7)
    names = by_name(spans)
    root = names["gRPC /inference.GRPCInferenceService/ModelInfer"]
    assert root["parent"] == caller_span
    assert root["attributes"]["kiln.api"] == "linear"
    assert root["attributes"]["kiln.protocol"] == "grpc-v2"
    assert root["attributes"]["http.response.status_code"] == 200
    assert len(root["attributes"]["kiln.request_id"]) >= 16
    batch = names["kiln.batch"]
    assert names["kiln.queue"]["parent"] == root["span_id"]
    assert batch["parent"] == root["span_id"] and within(batch, root)
    for phase in ("kiln.pre_inference", "kiln.model", "kiln.post_inference"):
        assert names[phase]["parent"] == batch["span_id"], phase


def test_a_request_without_traceparent_starts_a_new_trace(
    server: KilnServer, receiver: HttpReceiver
) -> None:
    first = server.client.post("/linear", json={"x": [[1, 0, 0, 0]]})
    second = server.client.post(
        "/linear", json={"x": [[0, 1, 0, 0]]}, headers={"traceparent": "junk"}
    )
    roots = [receiver.spans.server_span(r.headers["x-request-id"]) for r in (first, second)]
    for root in roots:
        assert root["parent"] == ""  # a root: no caller span (a malformed one is ignored)
        assert len(root["trace_id"]) == 32 and int(root["trace_id"], 16) != 0
    assert roots[0]["trace_id"] != roots[1]["trace_id"]  # one trace per request


def test_worker_phases_time_the_request_hooks_and_the_model(
    server: KilnServer, receiver: HttpReceiver
) -> None:
    header, trace_id, _ = traceparent()
    response = server.client.post(
        "/hooked", json={"values": [[1, 2, 3, 4]]}, headers={"traceparent": header}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"y": [[4.0, 5.0]]}
    names = by_name(receiver.spans.trace(trace_id, 8))
    ms = {n: (s["end"] - s["start"]) / 1e6 for n, s in names.items()}
    assert ms["kiln.pre_inference"] >= 55  # the hook sleeps 60 ms before the model
    assert ms["kiln.post_inference"] >= 35  # and 40 ms after it
    assert ms["kiln.model"] < 30  # a 4x2 MatMul
    assert ms["kiln.batch"] >= ms["kiln.pre_inference"] + ms["kiln.post_inference"]


def test_log_records_carry_the_trace_and_span_ids(
    server: KilnServer, receiver: HttpReceiver
) -> None:
    header, trace_id, _ = traceparent()
    ok = server.client.post("/linear", json={"x": [[1, 2, 3, 4]]}, headers={"traceparent": header})
    request_id = ok.headers["x-request-id"]
    root = receiver.spans.server_span(request_id)

    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r.get("request_id") == request_id]

    records = mine(server.api_log("linear", until=mine))
    assert records and records[0]["trace_id"] == trace_id
    assert records[0]["span_id"] == root["span_id"]

    # The worker's own lines about a traced request that failed name its trace too.
    header, trace_id, _ = traceparent()
    failed = server.client.post("/boom", json={"a": 1}, headers={"traceparent": header})
    assert failed.status_code == 500
    failed_id = failed.headers["x-request-id"]

    def worker_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            r for r in records if r.get("event") == "worker" and failed_id in r.get("message", "")
        ]

    lines = worker_lines(server.api_log("boom", until=worker_lines))
    assert lines, "the worker logged no line about the failed request"
    assert lines[0]["trace_id"] == trace_id
    assert lines[0]["span_id"] == receiver.spans.server_span(failed_id)["span_id"]
    failed_root = receiver.spans.server_span(failed_id)
    assert failed_root["attributes"]["http.response.status_code"] == 500
    assert failed_root["status"] == 2  # STATUS_CODE_ERROR


def test_grpc_exporter(tmp_path: Path) -> None:
    """`kiln serve --otlp-endpoint URL --otlp-protocol grpc` sends the same spans over
    OTLP/gRPC (the flags, where the other tests use the OTEL_* variables)."""
    receiver = GrpcReceiver()
    root = project(tmp_path / "project")
    flags = ["--otlp-endpoint", receiver.url, "--otlp-protocol", "grpc"]
    srv = KilnServer(root, tmp_path / "home", flags, env=FAST_EXPORT)
    try:
        header, trace_id, caller_span = traceparent()
        response = srv.client.post(
            "/linear", json={"x": [[1, 2, 3, 4]]}, headers={"traceparent": header}
        )
        assert response.status_code == 200
        root_span = receiver.spans.server_span(response.headers["x-request-id"])
        assert root_span["trace_id"] == trace_id and root_span["parent"] == caller_span
        assert "kiln.model" in {s["name"] for s in receiver.spans.trace(trace_id, 8)}
    finally:
        srv.stop()
        receiver.close()


def test_a_missing_receiver_never_fails_requests(tmp_path: Path) -> None:
    """Export is in the background: an endpoint nobody answers costs requests nothing."""
    with httpx.Client() as probe:  # a port that was free a moment ago
        del probe
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = project(tmp_path / "project")
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    srv = KilnServer(root, tmp_path / "home", env=env)
    try:
        for _ in range(3):
            assert srv.client.post("/linear", json={"x": [[1, 2, 3, 4]]}).status_code == 200
    finally:
        assert srv.stop() == 0


def test_settings_follow_the_flag_then_the_otel_variables() -> None:
    from kiln.serving.tracing import TracingError, settings_from_env

    assert settings_from_env(None, None, {}) is None  # nothing set: tracing off
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert settings_from_env(None, None, base) == (
        "http://collector:4318/v1/traces",
        "http/protobuf",
    )
    # The per-signal variable is used as it is; the flag wins over both.
    signal = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://other:9/custom"}
    assert settings_from_env(None, None, signal) == ("http://other:9/custom", "http/protobuf")
    assert settings_from_env("http://flag:4318/", None, signal) == (
        "http://flag:4318/v1/traces",
        "http/protobuf",
    )
    grpc = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert settings_from_env(None, "grpc", grpc) == ("http://collector:4317", "grpc")
    assert settings_from_env(None, None, {**grpc, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == (
        "http://collector:4317",
        "grpc",
    )
    assert settings_from_env(None, None, {**base, "OTEL_SDK_DISABLED": "true"}) is None
    assert settings_from_env(None, None, {**base, "OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(TracingError, match="http/json"):
        settings_from_env("http://x:4318", "http/json", {})
    with pytest.raises(TracingError, match="not a URL"):
        settings_from_env("collector:4318", None, {})


def test_a_bad_otlp_setting_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    root = project(tmp_path / "project")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift",
    }
    with pytest.raises(RuntimeError) as failed:
        KilnServer(root, tmp_path / "home", env=env)
    message = str(failed.value)
    assert "OTLP protocol 'thrift' is not supported; use one of http/protobuf, grpc" in message
    assert "Traceback" not in message
