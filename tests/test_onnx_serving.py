"""ONNX models served end to end: a real `kiln serve`, a real worker, onnxruntime in both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support import KilnServer, build_linear_onnx, build_two_input_onnx, write

WEIGHTS = np.arange(8, dtype=np.float32).reshape(4, 2) / 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("onnx-project")
    build_linear_onnx(root / "model" / "linear.onnx", WEIGHTS)
    build_two_input_onnx(root / "model" / "two.onnx")
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: linear
  onnx:
    model: model/linear.onnx
  metadata:
    owner: tests
- kind: api
  name: two
  endpoint: /models-of-two/two
  onnx:
    model: model/two.onnx
  serving:
    max_request_bytes: 2000
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def in_process(model: Path, feeds: dict) -> list:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_dict_body_matches_onnxruntime_in_process(server: KilnServer) -> None:
    rows = [[1, 2, 3, 4], [0.5, -1, 2, 8]]
    response = server.client.post("/linear", json={"x": rows})
    assert response.status_code == 200
    expected = in_process(
        server.project / "model" / "linear.onnx", {"x": np.asarray(rows, np.float32)}
    )
    np.testing.assert_allclose(response.json(), expected[0], rtol=1e-6)


def test_bare_list_batch_and_single_instance(server: KilnServer) -> None:
    batch = server.client.post("/linear", json=[[1, 0, 0, 0], [0, 0, 0, 1]])
    assert batch.json() == [[0.0, 0.25], [1.5, 1.75]]
    one = server.client.post("/linear", json=[1, 0, 0, 0])
    assert one.json() == [0.0, 0.25]  # no batch axis in, none out


def test_ints_are_cast_to_the_declared_float_dtype(server: KilnServer) -> None:
    response = server.client.post("/linear", json={"x": [[2, 2, 2, 2]]})
    assert response.json() == [[6.0, 8.0]]


def test_wrong_shape_is_a_400_that_says_what_was_expected(server: KilnServer) -> None:
    response = server.client.post("/linear", json=[[1, 2, 3]])
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "InvalidInput"
    assert "expected [N, 4]" in body["error"]["message"]
    assert "got [1, 3]" in body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]


def test_wrong_rank_and_ragged_and_strings_are_400(server: KilnServer) -> None:
    for body, words in [
        ([[[1, 2, 3, 4]]], "rank 2"),
        ([[1, 2, 3, 4], [1, 2]], "rectangular"),
        ([["a", "b", "c", "d"]], "strings"),
    ]:
        response = server.client.post("/linear", json=body)
        assert response.status_code == 400, body
        assert words in response.json()["error"]["message"]


def test_named_inputs_and_int64_dtype(server: KilnServer) -> None:
    payload = {"a": [[1, 2, 3]], "b": [[0.5, 0.5, 0.5]], "idx": [[3, 4]]}
    response = server.client.post("/models-of-two/two", json=payload)
    assert response.status_code == 200
    assert response.json() == {"sum": [[1.5, 2.5, 3.5]], "doubled": [[6, 8]]}


def test_named_input_errors(server: KilnServer) -> None:
    missing = server.client.post("/models-of-two/two", json={"a": [[1, 2, 3]], "b": [[1, 2, 3]]})
    assert missing.status_code == 400
    assert "missing input 'idx'" in missing.json()["error"]["message"]
    unknown = server.client.post("/models-of-two/two", json={"a": [[1, 2, 3]], "zz": 1, "b": 1})
    assert "unknown input 'zz'" in unknown.json()["error"]["message"]
    fractional = server.client.post(
        "/models-of-two/two", json={"a": [[1, 2, 3]], "b": [[1, 2, 3]], "idx": [[1.5, 2]]}
    )
    assert fractional.status_code == 400
    assert "integers" in fractional.json()["error"]["message"]
    bare = server.client.post("/models-of-two/two", json=[[1, 2, 3]])
    assert "3 inputs" in bare.json()["error"]["message"]


def test_get_endpoint_reports_ready_with_signature_and_metadata(server: KilnServer) -> None:
    body = server.client.get("/linear").json()
    assert body["status"] == "ready"
    assert body["metadata"] == {"owner": "tests"}
    assert body["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert body["signature"]["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]


def test_signature_route_in_seed_shape(server: KilnServer) -> None:
    body = server.client.get("/models-of-two/two/signature").json()
    assert body["signature"] == {
        "a": {"shape": [-1, 3], "type": "FP32"},
        "b": {"shape": [-1, 3], "type": "FP32"},
        "idx": {"shape": [-1, 2], "type": "INT64"},
    }


def test_listing_and_health(server: KilnServer) -> None:
    apis = server.client.get("/apis").json()["apis"]
    assert {(a["name"], a["endpoint"], a["status"]) for a in apis} == {
        ("linear", "/linear", "ready"),
        ("two", "/models-of-two/two", "ready"),
    }
    assert server.client.get("/").json() == server.client.get("/apis").json()
    assert server.client.get("/healthz").json() == {"status": "ok"}


def test_error_matrix_on_native_routes(server: KilnServer) -> None:
    cases = [
        (server.client.post("/nope", json=[1]), 404, "NotFound"),
        (server.client.put("/linear", json=[1]), 405, "MethodNotAllowed"),
        (server.client.delete("/apis"), 405, "MethodNotAllowed"),
        (server.client.post("/linear", content=b"{not json"), 400, "InvalidInput"),
        (server.client.post("/models-of-two/two", json=[0.0] * 1000), 413, "PayloadTooLarge"),
    ]
    for response, status, kind in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"]["type"] == kind
        assert body["request_id"] == response.headers["x-request-id"]
        assert "Traceback" not in response.text
    assert server.client.put("/linear", json=[1]).headers["allow"] == "GET, POST"


def test_request_id_is_echoed_and_success_bodies_are_stable(server: KilnServer) -> None:
    first = server.client.post("/linear", json=[1, 1, 1, 1], headers={"X-Request-ID": "abc-123"})
    second = server.client.post("/linear", json=[1, 1, 1, 1])
    assert first.headers["x-request-id"] == "abc-123"
    assert second.headers["x-request-id"] != "abc-123"
    assert first.content == second.content


def test_each_request_is_logged_as_one_json_line(server: KilnServer) -> None:
    server.client.post("/linear", json=[1, 1, 1, 1], headers={"X-Request-ID": "log-me-1"})
    mine = lambda records: [r for r in records if r.get("request_id") == "log-me-1"]  # noqa: E731
    records = mine(server.api_log("linear", until=mine))
    assert len(records) == 1
    record = records[0]
    assert record["event"] == "request" and record["status"] == 200 and record["api"] == "linear"
    assert isinstance(record["latency_ms"], float)
