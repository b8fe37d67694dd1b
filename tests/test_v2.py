"""The Open Inference Protocol (KServe V2) REST routes against a real `kiln serve`.

Models are built here: an ONNX model with one input per datatype, a linear
ONNX model in two versions, and Python handlers (one with a declared
signature that upper-cases strings, one without, one slow to load).
"""

from __future__ import annotations

import gzip
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from support import KilnServer, build_linear_onnx, write

import kiln

W1 = np.arange(8, dtype=np.float32).reshape(4, 2) / 4
W2 = -W1

HANDLERS = '''
import time

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


class Free:
    """No signature: any inputs; answers each input's sum and the datatypes it got."""

    def predict(self, payload, context):
        return {
            "total": np.array([float(np.sum(v)) for v in payload.values()]),
            "dtypes": np.array([str(v.dtype) for v in payload.values()], dtype=object),
        }


class Example:
    """The spec's example model: input0 UINT32, input1 BOOL -> output0, output1."""

    def predict(self, payload, context):
        return {"output0": payload["input0"] * 2, "output1": ~payload["input1"]}


class Slow:
    signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }

    def load(self, model_dir, config):
        time.sleep(1.5)

    def predict(self, payload, context):
        return {"y": payload["x"] * 2}
'''


def build_typed_onnx(path: Path) -> Path:
    """One input per datatype: f32 FP32 [N,3], i64 INT64 [N,2], flag BOOL [N],
    half FP16 [N,2], u8 UINT8 [N,4]; outputs double, negate or widen them."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, kind: int, shape: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, kind, shape)

    inputs = [
        value("f32", TensorProto.FLOAT, ["N", 3]),
        value("i64", TensorProto.INT64, ["N", 2]),
        value("flag", TensorProto.BOOL, ["N"]),
        value("half", TensorProto.FLOAT16, ["N", 2]),
        value("u8", TensorProto.UINT8, ["N", 4]),
    ]
    outputs = [
        value("f32_out", TensorProto.FLOAT, ["N", 3]),
        value("i64_out", TensorProto.INT64, ["N", 2]),
        value("flag_out", TensorProto.BOOL, ["N"]),
        value("half_out", TensorProto.FLOAT, ["N", 2]),
        value("half_same", TensorProto.FLOAT16, ["N", 2]),
        value("u8_out", TensorProto.UINT8, ["N", 4]),
    ]
    nodes = [
        helper.make_node("Add", ["f32", "f32"], ["f32_out"]),
        helper.make_node("Add", ["i64", "i64"], ["i64_out"]),
        helper.make_node("Not", ["flag"], ["flag_out"]),
        helper.make_node("Cast", ["half"], ["half_out"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["half"], ["half_same"]),
        helper.make_node("Identity", ["u8"], ["u8_out"]),
    ]
    graph = helper.make_graph(nodes, "typed", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("v2-project")
    build_typed_onnx(root / "model" / "typed.onnx")
    build_linear_onnx(root / "model" / "v1" / "linear.onnx", W1)
    build_linear_onnx(root / "model" / "v2" / "linear.onnx", W2)
    write(root / "handlers.py", HANDLERS)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: typed
  onnx: {model: model/typed.onnx}
- kind: api
  name: linear
  version: "1"
  onnx: {model: model/v1/linear.onnx}
- kind: api
  name: linear
  version: "2"
  onnx: {model: model/v2/linear.onnx}
- kind: api
  name: shout
  python: {handler: handlers.py:Shout}
- kind: api
  name: free
  python: {handler: handlers.py:Free}
- kind: api
  name: example
  python: {handler: handlers.py:Example}
- kind: api
  name: slow
  python: {handler: handlers.py:Slow}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


# ----- helpers ---------------------------------------------------------------------------

ROWS = {
    "f32": np.array([[1.5, -2.0, 3.25], [0.0, 10.0, -0.5]], np.float32),
    "i64": np.array([[1, -2], [2**40, 7]], np.int64),
    "flag": np.array([True, False]),
    "half": np.array([[0.5, -1.25], [2.0, 3.0]], np.float16),
    "u8": np.array([[0, 1, 254, 255], [7, 8, 9, 10]], np.uint8),
}
DATATYPES = {"f32": "FP32", "i64": "INT64", "flag": "BOOL", "half": "FP16", "u8": "UINT8"}


def json_inputs(rows: dict[str, np.ndarray], nested: bool = False) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "datatype": DATATYPES[name],
            "shape": list(array.shape),
            "data": array.tolist() if nested else array.reshape(-1).tolist(),
        }
        for name, array in rows.items()
    ]


def bytes_element_data(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def binary_body(
    inputs: list[tuple[str, str, list[int], bytes]], extra: dict[str, Any] | None = None
) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor-data request: the JSON header, then each input's raw bytes."""
    head = {
        "inputs": [
            {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(raw)}}
            for n, d, s, raw in inputs
        ],
        **(extra or {}),
    }
    header = orjson.dumps(head)
    body = header + b"".join(raw for *_, raw in inputs)
    return body, {"Inference-Header-Content-Length": str(len(header))}


def parse_binary_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON header, {output name: numpy array or list of bytes}) of a binary response."""
    length = int(response.headers["inference-header-content-length"])
    head = orjson.loads(response.content[:length])
    tail = response.content[length:]
    arrays: dict[str, Any] = {}
    offset = 0
    numpy_types = {
        "FP32": "<f4",
        "FP16": "<f2",
        "INT64": "<i8",
        "UINT8": "u1",
        "BOOL": "?",
        "FP64": "<f8",
    }
    for out in head["outputs"]:
        params = out.get("parameters") or {}
        if "binary_data_size" not in params:
            continue
        raw = tail[offset : offset + params["binary_data_size"]]
        offset += params["binary_data_size"]
        if out["datatype"] == "BYTES":
            values, pos = [], 0
            while pos < len(raw):
                (size,) = struct.unpack_from("<I", raw, pos)
                values.append(raw[pos + 4 : pos + 4 + size])
                pos += 4 + size
            arrays[out["name"]] = values
        else:
            dtype = np.dtype(numpy_types[out["datatype"]])
            arrays[out["name"]] = np.frombuffer(raw, dtype).reshape(out["shape"])
    assert offset == len(tail)
    return head, arrays


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {out["name"]: out for out in body["outputs"]}


def expected_typed(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "f32_out": rows["f32"] + rows["f32"],
        "i64_out": rows["i64"] + rows["i64"],
        "flag_out": ~rows["flag"],
        "half_out": rows["half"].astype(np.float32),
        "half_same": rows["half"],
        "u8_out": rows["u8"],
    }


# ----- server metadata and health --------------------------------------------------------


def test_server_metadata_has_exactly_the_spec_keys(server: KilnServer) -> None:
    response = server.client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {
        "name": "kiln",
        "version": kiln.__version__,
        "extensions": ["binary_tensor_data", "model_repository"],
    }


def test_health_live_and_ready(server: KilnServer) -> None:
    live = server.client.get("/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready = server.client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    model = server.client.get("/v2/models/typed/ready")
    assert (model.status_code, model.json()) == (200, {"name": "typed", "ready": True})


def test_model_list(server: KilnServer) -> None:
    response = server.client.get("/v2/models")
    assert sorted(response.json()["models"]) == [
        "example",
        "free",
        "linear",
        "shout",
        "slow",
        "typed",
    ]


# ----- model metadata --------------------------------------------------------------------


def test_onnx_metadata_lists_real_names_datatypes_and_variable_dims(server: KilnServer) -> None:
    response = server.client.get("/v2/models/typed")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "typed"
    assert body["platform"] == "onnx_onnxv1"
    assert body["versions"] == []
    assert body["inputs"] == [
        {"name": "f32", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "i64", "datatype": "INT64", "shape": [-1, 2]},
        {"name": "flag", "datatype": "BOOL", "shape": [-1]},
        {"name": "half", "datatype": "FP16", "shape": [-1, 2]},
        {"name": "u8", "datatype": "UINT8", "shape": [-1, 4]},
    ]
    assert body["outputs"][0] == {"name": "f32_out", "datatype": "FP32", "shape": [-1, 3]}
    assert [o["name"] for o in body["outputs"]] == [
        "f32_out",
        "i64_out",
        "flag_out",
        "half_out",
        "half_same",
        "u8_out",
    ]
    assert body["outputs"][2]["datatype"] == "BOOL"


def test_python_handler_metadata_comes_from_its_declared_signature(server: KilnServer) -> None:
    body = server.client.get("/v2/models/shout").json()
    assert body == {
        "name": "shout",
        "versions": [],
        "platform": "python",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "upper", "datatype": "BYTES", "shape": [-1]}],
    }
    free = server.client.get("/v2/models/free").json()
    assert (free["platform"], free["inputs"], free["outputs"]) == ("python", [], [])


# ----- inference: JSON -------------------------------------------------------------------


def test_infer_every_datatype_as_json_matches_numpy(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/typed/infer", json={"id": "42", "inputs": json_inputs(ROWS)}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model_name"] == "typed"
    assert body["id"] == "42"
    outputs = outputs_by_name(body)
    datatypes = {
        "f32_out": "FP32",
        "i64_out": "INT64",
        "flag_out": "BOOL",
        "half_out": "FP32",
        "half_same": "FP16",
        "u8_out": "UINT8",
    }
    for name, want in expected_typed(ROWS).items():
        out = outputs[name]
        assert out["datatype"] == datatypes[name]
        assert out["shape"] == list(want.shape)
        got = np.asarray(out["data"], dtype=want.dtype).reshape(out["shape"])
        np.testing.assert_array_equal(got, want)
    assert outputs["i64_out"]["data"][2] == 2**41  # no float rounding of big int64s


def test_flat_and_nested_data_give_the_same_answer(server: KilnServer) -> None:
    flat = server.client.post("/v2/models/typed/infer", json={"inputs": json_inputs(ROWS)})
    nested = server.client.post(
        "/v2/models/typed/infer", json={"inputs": json_inputs(ROWS, nested=True)}
    )
    assert flat.status_code == nested.status_code == 200
    assert flat.json()["outputs"] == nested.json()["outputs"]


def test_requested_outputs_subset(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/typed/infer",
        json={"inputs": json_inputs(ROWS), "outputs": [{"name": "i64_out"}, {"name": "u8_out"}]},
    )
    assert response.status_code == 200
    outputs = outputs_by_name(response.json())
    assert set(outputs) == {"i64_out", "u8_out"}
    assert outputs["u8_out"]["data"] == ROWS["u8"].reshape(-1).tolist()


def test_request_without_id_gets_one(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/typed/infer",
        json={"inputs": json_inputs(ROWS)},
        headers={"X-Request-ID": "trace-7"},
    )
    assert response.json()["id"] == "trace-7"


def test_bytes_through_a_python_handler(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/shout/infer",
        json={
            "id": "s1",
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [3], "data": ["ab", "Kiln", "x y"]}
            ],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "shout" and body["id"] == "s1"
    assert body["outputs"] == [
        {"name": "upper", "datatype": "BYTES", "shape": [3], "data": ["AB", "KILN", "X Y"]}
    ]


def test_python_handler_without_signature_takes_any_tensors(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/free/infer",
        json={
            "inputs": [
                {"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]},
                {"name": "b", "datatype": "FP64", "shape": [1], "data": [0.5]},
            ]
        },
    )
    assert response.status_code == 200, response.text
    outputs = outputs_by_name(response.json())
    assert outputs["total"]["data"] == [10.0, 0.5]
    assert outputs["dtypes"]["data"] == ["int32", "float64"]


def test_the_spec_example_round_trips(server: KilnServer) -> None:
    # The spec's example sends one value for input1's shape [3]; three values here.
    request = {
        "id": "42",
        "inputs": [
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
            {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
        ],
        "outputs": [{"name": "output0"}],
    }
    response = server.client.post("/v2/models/example/infer", json=request)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model_name": "example",
        "id": "42",
        "outputs": [
            {"name": "output0", "datatype": "UINT32", "shape": [2, 2], "data": [2, 4, 6, 8]}
        ],
    }


# ----- inference: binary tensor data ------------------------------------------------------


def test_binary_request_and_binary_response(server: KilnServer) -> None:
    inputs = [
        (name, DATATYPES[name], list(array.shape), array.tobytes()) for name, array in ROWS.items()
    ]
    body, headers = binary_body(
        inputs,
        {
            "id": "bin",
            "outputs": [
                {"name": "f32_out", "parameters": {"binary_data": True}},
                {"name": "flag_out", "parameters": {"binary_data": True}},
                {"name": "half_same", "parameters": {"binary_data": True}},
                {"name": "i64_out", "parameters": {"binary_data": False}},
            ],
        },
    )
    response = server.client.post("/v2/models/typed/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    head, arrays = parse_binary_response(response)
    assert head["id"] == "bin"
    want = expected_typed(ROWS)
    for name in ("f32_out", "flag_out", "half_same"):
        np.testing.assert_array_equal(arrays[name], want[name])
    sizes = {o["name"]: o.get("parameters", {}).get("binary_data_size") for o in head["outputs"]}
    assert sizes == {"f32_out": 24, "flag_out": 2, "half_same": 8, "i64_out": None}
    i64 = outputs_by_name(head)["i64_out"]
    assert i64["data"] == want["i64_out"].reshape(-1).tolist()


def test_request_level_binary_data_output_applies_to_every_output(server: KilnServer) -> None:
    body = {"inputs": json_inputs(ROWS), "parameters": {"binary_data_output": True}}
    response = server.client.post("/v2/models/typed/infer", json=body)
    head, arrays = parse_binary_response(response)
    assert len(arrays) == len(head["outputs"]) == 6
    np.testing.assert_array_equal(arrays["u8_out"], ROWS["u8"])


def test_fp16_binary_matches_fp32_json_within_tolerance(server: KilnServer) -> None:
    values = np.array([[0.1, 0.2], [0.3, 123.456]])
    rows = {**ROWS, "half": values.astype(np.float16)}
    inputs = [(n, DATATYPES[n], list(a.shape), a.tobytes()) for n, a in rows.items()]
    body, headers = binary_body(inputs)
    response = server.client.post("/v2/models/typed/infer", content=body, headers=headers)
    got = outputs_by_name(response.json())["half_out"]["data"]
    np.testing.assert_allclose(np.reshape(got, (2, 2)), values, rtol=1e-3)


def test_binary_bytes_in_and_out(server: KilnServer) -> None:
    words = [b"hello", b"", b"w\xc3\xb6rld"]
    body, headers = binary_body(
        [("text", "BYTES", [3], bytes_element_data(words))],
        {"outputs": [{"name": "upper", "parameters": {"binary_data": True}}]},
    )
    response = server.client.post("/v2/models/shout/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    _, arrays = parse_binary_response(response)
    assert arrays["upper"] == [w.upper() for w in words]


def test_bf16_binary_input_reaches_an_fp32_model_widened(server: KilnServer) -> None:
    x = np.array([[1.0, 2.0, 0.5, -3.0]], np.float32)  # exact in bfloat16
    bf16 = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    body, headers = binary_body([("x", "BF16", [1, 4], bf16)])
    response = server.client.post(
        "/v2/models/linear/versions/1/infer", content=body, headers=headers
    )
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(out["data"], (1, 2)), x @ W1)


def test_gzip_request_body(server: KilnServer) -> None:
    raw = orjson.dumps({"inputs": json_inputs(ROWS), "outputs": [{"name": "u8_out"}]})
    response = server.client.post(
        "/v2/models/typed/infer", content=gzip.compress(raw), headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == ROWS["u8"].reshape(-1).tolist()


# ----- errors ----------------------------------------------------------------------------


def _with(name: str, **change: Any) -> list[dict[str, Any]]:
    inputs = json_inputs(ROWS)
    for item in inputs:
        if item["name"] == name:
            item.update(change)
    return inputs


@pytest.mark.parametrize(
    ("inputs", "tensor", "words"),
    [
        (
            [*json_inputs(ROWS), {"name": "extra", "datatype": "FP32", "shape": [1], "data": [1]}],
            "extra",
            "unknown input",
        ),
        ([i for i in json_inputs(ROWS) if i["name"] != "u8"], "u8", "missing input"),
        (_with("f32", datatype="FP64"), "f32", "the model takes FP32"),
        (_with("i64", shape=[3, 2]), "i64", "holds 6 elements, but its data has 4"),
        (_with("u8", shape=[2, 2], data=[1, 2, 3, 4]), "u8", "dimension 1 must be 4"),
        (_with("u8", shape=[8], data=list(range(8))), "u8", "rank 2"),
        (_with("i64", data=[1.5, 2, 3, 4]), "i64", "fractional"),
        (_with("u8", data=[1, 2, 3, 256, 0, 0, 0, 0]), "u8", "outside [0, 255]"),
        (_with("flag", data=[1, 0]), "flag", "true or false"),
        (_with("f32", data=["a"] * 6), "f32", "strings"),
    ],
    ids=[
        "unknown-input",
        "missing-input",
        "wrong-datatype",
        "element-count",
        "fixed-dim",
        "rank",
        "fractional-int",
        "out-of-range",
        "bool-as-int",
        "strings-as-numbers",
    ],
)
def test_bad_inputs_are_400_naming_the_tensor(
    server: KilnServer, inputs: list[dict[str, Any]], tensor: str, words: str
) -> None:
    response = server.client.post("/v2/models/typed/infer", json={"inputs": inputs})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert f"'{tensor}'" in body["error"]
    assert words in body["error"]


def test_binary_size_that_does_not_fit_the_shape_is_400(server: KilnServer) -> None:
    body, headers = binary_body([("x", "FP32", [1, 4], b"\0" * 12)])
    response = server.client.post("/v2/models/linear/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert "'x'" in response.json()["error"] and "16 bytes" in response.json()["error"]


def test_binary_data_without_the_header_length_is_400(server: KilnServer) -> None:
    body, _ = binary_body([("x", "FP32", [1, 4], b"\0" * 16)])
    response = server.client.post("/v2/models/linear/infer", content=body)
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]


def test_unknown_requested_output_is_400(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/typed/infer", json={"inputs": json_inputs(ROWS), "outputs": [{"name": "nope"}]}
    )
    assert response.status_code == 400
    assert "unknown output 'nope'" in response.json()["error"]


def test_bytes_input_checked_against_a_python_signature(server: KilnServer) -> None:
    response = server.client.post(
        "/v2/models/shout/infer",
        json={"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
    )
    assert response.status_code == 400
    assert "'text'" in response.json()["error"] and "BYTES" in response.json()["error"]


def test_invalid_json_and_missing_inputs_are_400(server: KilnServer) -> None:
    bad = server.client.post("/v2/models/typed/infer", content=b"{nope")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    empty = server.client.post("/v2/models/typed/infer", json={"inputs": []})
    assert empty.status_code == 400 and "inputs" in empty.json()["error"]


def test_unknown_model_version_and_route_are_404(server: KilnServer) -> None:
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        response = server.client.get(path)
        assert response.status_code == 404
        assert response.json() == {
            "error": "no model named 'nope'; GET /v2/models lists the models"
        }
    infer = server.client.post("/v2/models/nope/infer", json={"inputs": []})
    assert infer.status_code == 404
    version = server.client.get("/v2/models/linear/versions/9")
    assert version.status_code == 404
    assert version.json()["error"] == "model 'linear' has no version '9' (versions: 1, 2)"
    unversioned = server.client.get("/v2/models/typed/versions/1/ready")
    assert unversioned.status_code == 404
    route = server.client.get("/v2/nothing/here")
    assert route.status_code == 404 and set(route.json()) == {"error"}


def test_wrong_method_is_405_with_allow(server: KilnServer) -> None:
    response = server.client.get("/v2/models/typed/infer")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert set(response.json()) == {"error"}


# ----- versions --------------------------------------------------------------------------


def test_versions_are_listed_and_routed(server: KilnServer) -> None:
    meta = server.client.get("/v2/models/linear/versions/1").json()
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    x = np.array([[1, 2, 3, 4]], np.float32)
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.tolist()}]}
    answers = {}
    for path in ("/versions/1", "/versions/2", ""):
        body = server.client.post(f"/v2/models/linear{path}/infer", json=request).json()
        answers[path] = (body["model_version"], body["outputs"][0]["data"])
    assert answers["/versions/1"] == ("1", (x @ W1).reshape(-1).tolist())
    assert answers["/versions/2"] == ("2", (x @ W2).reshape(-1).tolist())
    assert answers[""] == answers["/versions/2"]  # the highest version is the default
    ready = server.client.get("/v2/models/linear/versions/1/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "linear", "ready": True})


# ----- repository extension --------------------------------------------------------------


def test_repository_unload_then_load(server: KilnServer) -> None:
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
    assert server.client.post("/v2/models/slow/infer", json=request).json()["outputs"][0][
        "data"
    ] == [2.0, 4.0]

    unload = server.client.post("/v2/repository/models/slow/unload", json={})
    assert (unload.status_code, unload.json()) == (200, {"name": "slow", "unload": True})
    ready = server.client.get("/v2/models/slow/ready")
    assert (ready.status_code, ready.json()) == (503, {"name": "slow", "ready": False})
    refused = server.client.post("/v2/models/slow/infer", json=request)
    assert refused.status_code == 503
    assert "unloaded" in refused.json()["error"] and "/load" in refused.json()["error"]
    index = server.client.post("/v2/repository/index").json()
    assert {"name": "slow", "state": "UNAVAILABLE", "reason": "unloaded"} in index
    assert {"name": "typed", "state": "READY"} in index
    assert all(
        e["name"] != "slow"
        for e in server.client.post("/v2/repository/index", json={"ready": True}).json()
    )
    # An API unloaded on purpose does not make the server unready.
    assert server.client.get("/v2/health/ready").status_code == 200

    # While the model loads again (1.5 s), the server and the model are not ready.
    seen: list[int] = []
    loader = threading.Thread(
        target=lambda: seen.append(
            server.client.post("/v2/repository/models/slow/load", json={}).status_code
        )
    )
    loader.start()
    time.sleep(0.5)
    during = server.client.get("/v2/health/ready")
    model_during = server.client.get("/v2/models/slow/ready")
    loader.join(30)
    assert seen == [200]
    assert (during.status_code, during.json()) == (503, {"ready": False})
    assert model_during.status_code == 503
    assert server.client.get("/v2/models/slow/ready").status_code == 200
    assert server.client.get("/v2/health/ready").status_code == 200
    again = server.client.post("/v2/models/slow/infer", json=request)
    assert again.status_code == 200 and again.json()["outputs"][0]["data"] == [2.0, 4.0]


def test_repository_index_lists_every_version(server: KilnServer) -> None:
    index = server.client.post("/v2/repository/index").json()
    assert {"name": "linear", "version": "1", "state": "READY"} in index
    assert {"name": "linear", "version": "2", "state": "READY"} in index


def test_repository_load_of_unknown_model_is_404(server: KilnServer) -> None:
    response = server.client.post("/v2/repository/models/nope/load", json={})
    assert response.status_code == 404 and "nope" in response.json()["error"]


# ---- every runtime through the same V2 routes (issue 8: rows, not a parallel suite) ----------


def _runtime_rows(root: Path) -> dict[str, tuple[str, Any]]:
    """Per runtime: (kiln.yaml entry, in-process function x -> expected y) for what is installed."""
    import importlib.util

    weights = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 0.0]], dtype=np.float32)
    rows: dict[str, tuple[str, Any]] = {}
    build_linear_onnx(root / "lin.onnx", weights)
    rows["onnx"] = ("onnx: {model: lin.onnx}", lambda x: x @ weights)
    if importlib.util.find_spec("torch"):
        import torch

        layer = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weights.T))
        torch.jit.script(layer.eval()).save(str(root / "lin.ts"))
        rows["torch"] = ("torch: {model: lin.ts}", lambda x: x @ weights)
    if importlib.util.find_spec("sklearn") and importlib.util.find_spec("skops"):
        import skops.io as sio
        from sklearn.linear_model import LinearRegression

        data = np.random.default_rng(1).normal(size=(20, 3))
        reg = LinearRegression().fit(data, data @ weights[:, 0])
        sio.dump(reg, root / "lin.skops")
        rows["sklearn"] = ("sklearn: {model: lin.skops}", lambda x: reg.predict(x))
    if importlib.util.find_spec("tensorflow"):
        import tensorflow as tf

        class Lin(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
            def serve(self, x):
                return {"y": tf.matmul(x, tf.constant(weights))}

        module = Lin()
        tf.saved_model.save(
            module, str(root / "lin-tf"), signatures={"serving_default": module.serve}
        )
        rows["tensorflow"] = ("tensorflow: {model: lin-tf}", lambda x: x @ weights)
    return rows


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("runtimes")
    rows = _runtime_rows(root)
    config = "".join(
        f"- kind: api\n  name: rt-{name}\n  {block}\n" for name, (block, _) in rows.items()
    )
    write(root / "kiln.yaml", config)
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv, {name: fn for name, (_, fn) in rows.items()}
    srv.stop()


@pytest.mark.parametrize("runtime", ["onnx", "torch", "sklearn", "tensorflow"])
def test_v2_metadata_and_infer_for_every_runtime(runtimes, runtime: str) -> None:
    server, expected = runtimes
    if runtime not in expected:
        pytest.skip(f"{runtime} is not installed here")
    name = f"rt-{runtime}"
    meta = server.client.get(f"/v2/models/{name}").json()
    assert meta["name"] == name and len(meta["inputs"]) == 1 and meta["outputs"]
    tensor = meta["inputs"][0]
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=np.float32)
    datatype = tensor["datatype"]
    body = {
        "inputs": [
            {
                "name": tensor["name"],
                "shape": list(x.shape),
                "datatype": datatype,
                "data": x.ravel().tolist(),
            }
        ]
    }
    response = server.client.post(f"/v2/models/{name}/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    got = np.array(out["data"], dtype=np.float64).reshape(out["shape"])
    want = np.asarray(expected[runtime](x.astype(np.float64 if datatype == "FP64" else np.float32)))
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    assert server.client.get(f"/v2/models/{name}/ready").status_code == 200
