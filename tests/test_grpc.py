"""The gRPC port against a real `kiln serve`: tritonclient's gRPC client unchanged, the V2
contract over both transports, TorchServe's services, health, reflection and TLS.

tritonclient's messages (default descriptor pool) and Kiln's (a private pool) are
imported in this one process: that they coexist is part of what is tested.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from support import KilnServer, build_linear_onnx, write

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from kiln.protocols.grpc.messages import message  # noqa: E402

W1 = np.arange(8, dtype=np.float32).reshape(4, 2) / 4
W2 = W1 * 10

HANDLERS = """
import numpy as np


class Shout:
    signature = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "upper", "datatype": "BYTES", "shape": [-1]}],
    }

    def predict(self, payload, context):
        text = payload["text"]
        return {"upper": np.array([v.upper() for v in text.reshape(-1)], dtype=object)}


class Count:
    def predict(self, payload, context):
        n = int(np.asarray(payload["n"]).reshape(-1)[0]) if isinstance(payload, dict) else 3
        for i in range(n):
            yield {"step": i}


class Echo:
    def predict(self, payload, context):
        if isinstance(payload, (bytes, bytearray)):
            return {"bytes": len(payload)}
        return {"echo": payload}
"""
CONFIG = """
- kind: api
  name: linear
  version: "1"
  onnx: {model: model/1/linear.onnx}
- kind: api
  name: linear
  version: "2"
  onnx: {model: model/2/linear.onnx}
- kind: api
  name: shout
  python: {handler: h.py:Shout}
- kind: api
  name: count
  python: {handler: h.py:Count}
  metadata: {streaming: true}
- kind: api
  name: echo
  python: {handler: h.py:Echo}
"""


def _project(root: Path) -> Path:
    build_linear_onnx(root / "model" / "1" / "linear.onnx", W1)
    build_linear_onnx(root / "model" / "2" / "linear.onnx", W2)
    write(root / "h.py", HANDLERS)
    write(root / "kiln.yaml", CONFIG)
    return root


def grpc_address(server: KilnServer) -> str:
    info = orjson.loads((server.state / "server.json").read_bytes())
    return info["grpc"]["address"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnServer]:
    root = _project(tmp_path_factory.mktemp("grpc-project"))
    srv = KilnServer(root, tmp_path_factory.mktemp("home"), ["--grpc-port", "0"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clients(server: KilnServer) -> Iterator[dict[str, Any]]:
    made = {
        "http": httpclient.InferenceServerClient(server.url.removeprefix("http://")),
        "grpc": grpcclient.InferenceServerClient(grpc_address(server)),
    }
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(scope="module")
def channel(server: KilnServer) -> Iterator[Any]:
    with grpc.insecure_channel(grpc_address(server)) as chan:
        yield chan


def unary(channel: Any, method: str, request: Any, response: str, **kw: Any) -> Any:
    call = channel.unary_unary(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=message(response).FromString,
    )
    return call(request, timeout=30, **kw)


# ----- the V2 contract, over HTTP and gRPC ------------------------------------------------
TRANSPORTS = ["http", "grpc"]


def _module(transport: str) -> Any:
    return grpcclient if transport == "grpc" else httpclient


def _status(exc: InferenceServerException, transport: str) -> str:
    return str(exc.status())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_and_metadata(clients: dict[str, Any], transport: str) -> None:
    client = clients[transport]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("linear") and client.is_model_ready("linear", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True) if transport == "grpc" else None
    meta = meta or client.get_server_metadata()
    assert meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"]
    linear = client.get_model_metadata(
        "linear", **({"as_json": True} if transport == "grpc" else {})
    )
    assert linear["versions"] == ["1", "2"] and linear["platform"] == "onnx_onnxv1"
    assert linear["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}] or linear[
        "inputs"
    ] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fp32_infer_by_version(clients: dict[str, Any], transport: str) -> None:
    mod = _module(transport)
    x = np.array([[1, 2, 3, 4], [0.5, -1, 0, 8]], np.float32)
    tensor = mod.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = clients[transport].infer("linear", [tensor], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("y"), x @ W2, rtol=1e-6)  # default: highest
    first = clients[transport].infer("linear", [tensor], model_version="1")
    np.testing.assert_allclose(first.as_numpy("y"), x @ W1, rtol=1e-6)
    response = result.get_response(as_json=True) if transport == "grpc" else result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "2"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bytes_infer(clients: dict[str, Any], transport: str) -> None:
    mod = _module(transport)
    words = np.array([b"hello", b"kiln", b"v2 protocol"], dtype=object)
    tensor = mod.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(words)
    result = clients[transport].infer("shout", [tensor])
    assert [bytes(v) for v in result.as_numpy("upper")] == [w.upper() for w in words]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_errors_carry_the_status_and_the_message(clients: dict[str, Any], transport: str) -> None:
    mod, client = _module(transport), clients[transport]
    bad = mod.InferInput("nope", [1, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("linear", [bad])
    assert "unknown input 'nope'" in caught.value.message()
    want = {"http": ("400", "404"), "grpc": ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")}
    assert _status(caught.value, transport) == want[transport][0]
    shape = mod.InferInput("x", [1, 3], "FP32")
    shape.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("linear", [shape])
    assert _status(caught.value, transport) == want[transport][0]
    assert "dimension 1 must be 4" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("missing", [shape])
    assert _status(caught.value, transport) == want[transport][1]
    assert "no model named 'missing'" in caught.value.message()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_repository_unload_and_load(clients: dict[str, Any], transport: str) -> None:
    client = clients[transport]
    index = client.get_model_repository_index(**({"as_json": True} if transport == "grpc" else {}))
    models = index["models"] if transport == "grpc" else index
    assert {"name": "echo", "state": "READY"} in [
        {"name": m["name"], "state": m["state"]} for m in models
    ]
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    client.load_model("echo")
    assert client.is_model_ready("echo")


# ----- gRPC only ---------------------------------------------------------------------------
def test_typed_contents_and_raw_outputs(channel: Any) -> None:
    request = message("inference.ModelInferRequest")(model_name="linear", model_version="1", id="t")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    answer = unary(
        channel,
        "/inference.GRPCInferenceService/ModelInfer",
        request,
        "inference.ModelInferResponse",
    )
    assert answer.id == "t" and answer.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [("y", "FP32", [1, 2])]
    got = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(1, 2)
    np.testing.assert_allclose(got, np.array([[1, 2, 3, 4]], np.float32) @ W1)
    short = message("inference.ModelInferRequest")(model_name="linear")
    short.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1])
    with pytest.raises(grpc.RpcError) as caught:
        unary(
            channel,
            "/inference.GRPCInferenceService/ModelInfer",
            short,
            "inference.ModelInferResponse",
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds 4 elements" in caught.value.details()


def test_model_config_for_tritonclient(clients: dict[str, Any]) -> None:
    config = clients["grpc"].get_model_config("linear", as_json=True)["config"]
    assert config["name"] == "linear" and config["backend"] == "onnx"
    assert config["input"][0]["name"] == "x" and config["input"][0]["data_type"] == "TYPE_FP32"


def test_stream_infer_streams_a_handler_and_answers_a_plain_model(server: KilnServer) -> None:
    client = grpcclient.InferenceServerClient(grpc_address(server))
    results: list[Any] = []
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        n = grpcclient.InferInput("n", [1], "INT64")
        n.set_data_from_numpy(np.array([3], np.int64))
        client.async_stream_infer("count", [n], request_id="s1")
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.async_stream_infer("linear", [x], model_version="1", request_id="s2")
        bad = grpcclient.InferInput("x", [1, 3], "FP32")
        bad.set_data_from_numpy(np.ones((1, 3), np.float32))
        client.async_stream_infer("linear", [bad], request_id="s3")
    finally:
        client.stop_stream()  # waits for the stream's answers
        client.close()
    assert len(results) == 5, results
    steps = [json.loads(bytes(r.as_numpy("output")[0])) for r, e in results[:3]]
    assert steps == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert all(e is None for _, e in results[:4])
    np.testing.assert_allclose(results[3][0].as_numpy("y"), np.ones((1, 4), np.float32) @ W1)
    error = results[4][1]
    assert error is not None and "dimension 1 must be 4" in error.message()


def test_torchserve_ping_predictions_and_streams(channel: Any) -> None:
    empty = message("google.protobuf.Empty")()
    ping = unary(
        channel,
        "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping",
        empty,
        "org.pytorch.serve.grpc.inference.TorchServeHealthResponse",
    )
    assert json.loads(ping.health) == {"status": "Healthy"}
    request = message("org.pytorch.serve.grpc.inference.PredictionsRequest")
    predicted = unary(
        channel,
        "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
        request(model_name="echo", input={"data": b"abcd"}),
        "org.pytorch.serve.grpc.inference.PredictionResponse",
    )
    assert json.loads(predicted.prediction) == {"bytes": 4}
    stream = channel.unary_stream(
        "/org.pytorch.serve.grpc.inference.InferenceAPIsService/StreamPredictions",
        request_serializer=request.SerializeToString,
        response_deserializer=message(
            "org.pytorch.serve.grpc.inference.PredictionResponse"
        ).FromString,
    )
    items = [json.loads(r.prediction) for r in stream(request(model_name="count"), timeout=30)]
    assert items == [{"step": 0}, {"step": 1}, {"step": 2}]
    with pytest.raises(grpc.RpcError) as caught:
        unary(
            channel,
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request(model_name="nope", input={"data": b"x"}),
            "org.pytorch.serve.grpc.inference.PredictionResponse",
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Model not found: nope" in caught.value.details()


def test_torchserve_management_maps_onto_rest(channel: Any) -> None:
    listed = unary(
        channel,
        "/org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels",
        message("org.pytorch.serve.grpc.management.ListModelsRequest")(),
        "org.pytorch.serve.grpc.management.ManagementResponse",
    )
    names = {m["modelName"] for m in json.loads(listed.msg)["models"]}
    assert {"linear", "shout", "count", "echo"} <= names
    with pytest.raises(grpc.RpcError) as caught:  # registration is off without the flag
        unary(
            channel,
            "/org.pytorch.serve.grpc.management.ManagementAPIsService/RegisterModel",
            message("org.pytorch.serve.grpc.management.RegisterModelRequest")(url="x.mar"),
            "org.pytorch.serve.grpc.management.ManagementResponse",
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # REST's 405
    assert "--enable-model-api" in caught.value.details()


def test_health_and_reflection(channel: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    checker = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        answer = checker.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.ModelInferRequest"
        ),
    ]
    answers = list(stub.ServerReflectionInfo(iter(asks), timeout=10))
    services = {s.name for s in answers[0].list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "org.pytorch.serve.grpc.inference.InferenceAPIsService",
        "org.pytorch.serve.grpc.management.ManagementAPIsService",
        "grpc.health.v1.Health",
    } <= services
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the schema itself


# ----- TLS --------------------------------------------------------------------------------
def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_port_answers_a_secure_channel_only(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    write(tmp_path / "p" / "h.py", HANDLERS)
    write(
        tmp_path / "p" / "kiln.yaml", "- kind: api\n  name: echo\n  python: {handler: h.py:Echo}\n"
    )
    srv = KilnServer(
        tmp_path / "p",
        tmp_path / "home",
        ["--grpc-port", "0", "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key)],
    )
    try:
        info = orjson.loads((srv.state / "server.json").read_bytes())["grpc"]
        assert info["tls"] is True
        client = grpcclient.InferenceServerClient(
            info["address"], ssl=True, root_certificates=str(cert)
        )
        assert client.is_server_live() and client.is_model_ready("echo")
        client.close()
        plain = grpcclient.InferenceServerClient(info["address"])
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=3)
        plain.close()
    finally:
        srv.stop()


# ----- the port's own errors --------------------------------------------------------------
def _serve(tmp_path: Path, *args: str, prelude: str = "pass") -> subprocess.CompletedProcess[str]:
    write(tmp_path / "p" / "h.py", HANDLERS)
    write(
        tmp_path / "p" / "kiln.yaml", "- kind: api\n  name: echo\n  python: {handler: h.py:Echo}\n"
    )
    code = (
        f"import sys; {prelude}; from kiln.cli.main import main; "
        f"sys.argv = ['kiln', 'serve', {str(tmp_path / 'p')!r}, '--port', '0', "
        f"'--management-port', '0', '--metrics-port', '0', '--home', "
        f"{str(tmp_path / 'home')!r}, *{list(args)!r}]; main()"
    )
    import sys

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_asking_for_the_port_without_the_extra_names_the_extra(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--grpc-port", "0", prelude="sys.modules['grpc_health'] = None")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the gRPC port needs the grpc extra" in done.stderr, done.stderr
    assert "pip install 'kiln-serve[grpc]'" in done.stderr and "Traceback" not in done.stderr


def test_a_busy_grpc_port_fails_the_start_naming_the_flag(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _serve(tmp_path, "--grpc-port", str(taken.getsockname()[1]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot listen on 127.0.0.1:" in done.stderr and "--grpc-port" in done.stderr
    assert "Traceback" not in done.stderr
