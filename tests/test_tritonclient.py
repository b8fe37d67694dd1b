"""NVIDIA's own V2 client (`tritonclient.http`) against a real `kiln serve`.

Whatever Kiln's V2 routes think they do, this is what Triton users run: the
client decides which headers, bodies and binary layouts are sent and how the
answers are parsed, so a mismatch with the protocol shows up here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import KilnServer, build_linear_onnx, build_two_input_onnx, write

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

W1 = np.arange(8, dtype=np.float32).reshape(4, 2) / 4
W2 = W1 * 10

SHOUT = """
import numpy as np


class Shout:
    signature = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "upper", "datatype": "BYTES", "shape": [-1]}],
    }

    def predict(self, payload, context):
        text = payload["text"]
        flat = [value.upper() for value in text.reshape(-1)]
        return {"upper": np.array(flat, dtype=object).reshape(text.shape)}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnServer]:
    root: Path = tmp_path_factory.mktemp("triton-project")
    build_linear_onnx(root / "model" / "1" / "linear.onnx", W1)
    build_linear_onnx(root / "model" / "2" / "linear.onnx", W2)
    build_two_input_onnx(root / "model" / "two.onnx")
    write(root / "shout.py", SHOUT)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: linear
  version: "1"
  onnx: {model: model/1/linear.onnx}
- kind: api
  name: linear
  version: "2"
  onnx: {model: model/2/linear.onnx}
- kind: api
  name: two
  onnx: {model: model/two.onnx}
- kind: api
  name: shout
  python: {handler: shout.py:Shout}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: KilnServer) -> Iterator[object]:
    address = server.url.removeprefix("http://")
    triton = httpclient.InferenceServerClient(url=address, network_timeout=60)
    yield triton
    triton.close()


def test_health_and_server_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("linear")
    assert client.is_model_ready("linear", "1")
    assert not client.is_model_ready("nope")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "kiln"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata(client) -> None:
    linear = client.get_model_metadata("linear")
    assert linear["name"] == "linear"
    assert linear["versions"] == ["1", "2"]
    assert linear["platform"] == "onnx_onnxv1"
    assert linear["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert linear["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    two = client.get_model_metadata("two", "")
    assert [(i["name"], i["datatype"], i["shape"]) for i in two["inputs"]] == [
        ("a", "FP32", [-1, 3]),
        ("b", "FP32", [-1, 3]),
        ("idx", "INT64", [-1, 2]),
    ]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_infer(client, binary: bool) -> None:
    x = np.array([[1, 2, 3, 4], [0.5, -1, 0, 8]], np.float32)
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    result = client.infer("linear", [tensor], outputs=wanted, request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("y"), x @ W2, rtol=1e-6)  # default: highest
    response = result.get_response()
    assert response["id"] == "r-1"
    assert response["model_version"] == "2"
    first = client.infer("linear", [tensor], model_version="1", outputs=wanted)
    np.testing.assert_allclose(first.as_numpy("y"), x @ W1, rtol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_and_int64_inputs_of_one_model(client, binary: bool) -> None:
    a = np.array([[1, 2, 3]], np.float32)
    b = np.array([[0.5, 0.25, -3]], np.float32)
    idx = np.array([[7, 2**40]], np.int64)
    inputs = []
    for name, array, datatype in (("a", a, "FP32"), ("b", b, "FP32"), ("idx", idx, "INT64")):
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    result = client.infer("two", inputs)  # no outputs named: the client asks for binary
    np.testing.assert_allclose(result.as_numpy("sum"), a + b)
    doubled = result.as_numpy("doubled")
    assert doubled.dtype == np.int64
    np.testing.assert_array_equal(doubled, idx * 2)
    only = client.infer(
        "two", inputs, outputs=[httpclient.InferRequestedOutput("doubled", binary_data=binary)]
    )
    assert only.as_numpy("sum") is None
    np.testing.assert_array_equal(only.as_numpy("doubled"), idx * 2)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_infer(client, binary: bool) -> None:
    words = np.array([b"hello", b"kiln", b"v2 protocol"], dtype=object)
    tensor = httpclient.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(words, binary_data=binary)
    result = client.infer(
        "shout", [tensor], outputs=[httpclient.InferRequestedOutput("upper", binary_data=binary)]
    )
    got = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("upper")]
    assert got == [w.upper() for w in words]


def test_bf16_input_through_ml_dtypes(client) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[1.0, 2.0, 0.5, -3.0]], dtype=ml_dtypes.bfloat16)
    tensor = httpclient.InferInput("x", [1, 4], "BF16")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer("linear", [tensor], model_version="1")
    np.testing.assert_allclose(result.as_numpy("y"), x.astype(np.float32) @ W1)


def test_compressed_request_and_response(client) -> None:
    x = np.ones((1, 4), np.float32)
    tensor = httpclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        "linear",
        [tensor],
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    np.testing.assert_allclose(result.as_numpy("y"), x @ W2)


def test_errors_reach_the_client_with_status_and_message(client) -> None:
    tensor = httpclient.InferInput("nope", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("linear", [tensor])
    assert caught.value.status() == "400"
    assert "unknown input 'nope'" in caught.value.message()
    wrong = httpclient.InferInput("x", [1, 4], "INT64")
    wrong.set_data_from_numpy(np.zeros((1, 4), np.int64), binary_data=True)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("linear", [wrong])
    assert caught.value.status() == "400" and "'x'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "404"


def test_repository_unload_and_load(client) -> None:
    index = client.get_model_repository_index()
    assert {"name": "shout", "state": "READY"} in index
    client.unload_model("shout")
    assert not client.is_model_ready("shout")
    tensor = httpclient.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"a"], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("shout", [tensor])
    assert caught.value.status() == "503"
    client.load_model("shout")
    assert client.is_model_ready("shout")
    assert client.infer("shout", [tensor]).as_numpy("upper").tolist() == [b"A"]
