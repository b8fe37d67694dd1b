"""KServe V1 on a real `kiln serve`: models, readiness, :predict per instance in order, :explain."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from support import KilnServer, build_linear_onnx, write

HANDLERS = """
import time

import kiln


class Doubler:
    def predict(self, payload, context):
        (result,) = self.predict_batch([payload], [context])
        if isinstance(result, Exception):
            raise result
        return result

    def predict_batch(self, payloads, contexts):
        time.sleep(0.2)  # long enough for the other instances to gather behind this batch
        out = []
        for payload, context in zip(payloads, contexts):
            if payload == "bad":
                out.append(kiln.InvalidInput("'bad' is not a number"))
            elif payload == "boom":
                out.append(RuntimeError("exploded"))
            else:
                out.append({"doubled": payload * 2, "batch": len(payloads),
                            "protocol": context.protocol})
        return out

    def explain(self, payload, context):
        return {"why": f"{payload} doubled", "protocol": context.protocol}


class Shapes:
    def predict(self, payload, context):
        if payload == "text":
            context.set_header("Content-Type", "text/plain")
            return b"just text"
        if payload == "bytes":
            return b"\\x00\\xffbin"
        return payload
"""

BROKEN = 'raise RuntimeError("cannot load")\n'
WEIGHTS = np.arange(8, dtype=np.float32).reshape(4, 2) / 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("v1-project")
    write(root / "handlers.py", HANDLERS)
    write(root / "broken.py", BROKEN)
    build_linear_onnx(root / "linear.onnx", WEIGHTS)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: doubler
  python: {handler: handlers.py:Doubler}
  batching: {max_batch_size: 8, max_batch_delay_ms: 20}
- kind: api
  name: shapes
  python: {handler: handlers.py:Shapes}
- kind: api
  name: linear
  onnx: {model: linear.onnx}
- kind: api
  name: broken
  python: {handler: broken.py}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def test_list_models(server: KilnServer) -> None:
    response = server.client.get("/v1/models")
    assert response.status_code == 200
    assert sorted(response.json()["models"]) == ["broken", "doubler", "linear", "shapes"]


def test_model_readiness(server: KilnServer) -> None:
    assert server.client.get("/v1/models/linear").json() == {"name": "linear", "ready": True}
    broken = server.client.get("/v1/models/broken")
    assert broken.status_code == 503
    assert "not ready" in broken.json()["error"]
    assert "cannot load" in broken.json()["error"]
    missing = server.client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "Model with name nope does not exist."}


def test_instances_are_items_answered_in_order_and_batched(server: KilnServer) -> None:
    values = list(range(10))
    response = server.client.post("/v1/models/doubler:predict", json={"instances": values})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["doubled"] for p in predictions] == [v * 2 for v in values]
    assert {p["protocol"] for p in predictions} == {"v1"}
    assert max(p["batch"] for p in predictions) > 1  # instances shared model calls


def test_inputs_rows_and_columns(server: KilnServer) -> None:
    rows = server.client.post("/v1/models/shapes:predict", json={"inputs": [1, [2, 3]]})
    assert rows.json() == {"predictions": [1, [2, 3]]}
    columns = server.client.post(
        "/v1/models/shapes:predict", json={"inputs": {"a": [1, 2], "b": ["x", "y"]}}
    )
    assert columns.json() == {"predictions": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]}
    one = server.client.post("/v1/models/shapes:predict", json={"inputs": {"a": 1}})
    assert one.json() == {"predictions": [{"a": 1}]}


def test_tensor_model_gets_each_instance(server: KilnServer) -> None:
    response = server.client.post(
        "/v1/models/linear:predict", json={"instances": [[1, 0, 0, 0], [0, 0, 0, 1]]}
    )
    assert response.json() == {"predictions": [[0.0, 0.25], [1.5, 1.75]]}


def test_text_and_bytes_answers(server: KilnServer) -> None:
    response = server.client.post(
        "/v1/models/shapes:predict", json={"instances": ["text", "bytes", {"k": None}]}
    )
    text, binary, obj = response.json()["predictions"]
    assert text == "just text"
    assert base64.b64decode(binary["b64"]) == b"\x00\xffbin"
    assert obj == {"k": None}


def test_an_error_in_any_instance_fails_the_call(server: KilnServer) -> None:
    bad = server.client.post("/v1/models/doubler:predict", json={"instances": [1, "bad", 3]})
    assert bad.status_code == 400
    assert bad.json() == {"error": "'bad' is not a number"}
    boom = server.client.post("/v1/models/doubler:predict", json={"instances": [1, "boom"]})
    assert boom.status_code == 500
    assert "exploded" in boom.json()["error"]
    assert set(boom.json()) == {"error"}


def test_bad_bodies_are_400(server: KilnServer) -> None:
    not_json = server.client.post("/v1/models/doubler:predict", content=b"{nope")
    assert not_json.status_code == 400
    assert "not valid JSON" in not_json.json()["error"]
    no_key = server.client.post("/v1/models/doubler:predict", json={"rows": [1]})
    assert no_key.status_code == 400
    assert '"instances"' in no_key.json()["error"]
    not_list = server.client.post("/v1/models/doubler:predict", json={"instances": 3})
    assert not_list.status_code == 400


def test_unavailable_and_unknown_and_methods(server: KilnServer) -> None:
    broken = server.client.post("/v1/models/broken:predict", json={"instances": [1]})
    assert broken.status_code == 503
    assert "cannot load" in broken.json()["error"]
    missing = server.client.post("/v1/models/nope:predict", json={"instances": [1]})
    assert missing.status_code == 404
    assert server.client.get("/v1/models/doubler:predict").status_code == 405
    assert server.client.post("/v1/models/doubler:train", json={}).status_code == 404


def test_explain_per_instance(server: KilnServer) -> None:
    response = server.client.post("/v1/models/doubler:explain", json={"instances": [2, 5]})
    assert response.json() == {
        "explanations": [
            {"why": "2 doubled", "protocol": "v1"},
            {"why": "5 doubled", "protocol": "v1"},
        ]
    }
    missing = server.client.post("/v1/models/shapes:explain", json={"instances": [1]})
    assert missing.status_code == 501
    assert "explain(payload, context)" in missing.json()["error"]


def test_empty_instances(server: KilnServer) -> None:
    response = server.client.post("/v1/models/doubler:predict", json={"instances": []})
    assert response.json() == {"predictions": []}
