"""Explanations on `/explanations/{model}[/{version}]` and V1 `:explain`, on a real `kiln serve`.

These check Kiln's explanation object (`?format=kiln`, and the native
`POST {endpoint}/explain`); TorchServe's bare attribution lists, the default
on those routes, are tests/test_explanation_shapes.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from support import KilnServer, build_linear_onnx, write

HANDLERS = """
class Explained:
    def predict(self, payload, context):
        return {"prediction": payload}

    def explain(self, payload, context):
        return {"explained_by": "handler", "payload": payload, "protocol": context.protocol}


class Unexplained:
    def predict(self, payload, context):
        return payload
"""

# Exact in float32: small integers and quarters, so x_j * W[j, k] has no rounding.
W_CLASSES = np.array([[1, 0.5, 2], [0, 3, 1], [2, 0.25, 0], [1, 1, 4]], dtype=np.float32)
W_SINGLE = np.array([[0.5], [-2], [3], [0.25]], dtype=np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("explain-project")
    write(root / "handlers.py", HANDLERS)
    build_linear_onnx(root / "classes.onnx", W_CLASSES)
    build_linear_onnx(root / "single.onnx", W_SINGLE)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: classes
  version: "1"
  onnx: {model: classes.onnx}
- kind: api
  name: single
  onnx: {model: single.onnx}
- kind: api
  name: explained
  python: {handler: handlers.py:Explained}
- kind: api
  name: unexplained
  python: {handler: handlers.py:Unexplained}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def test_single_output_attributions_are_x_times_w(server: KilnServer) -> None:
    x = np.array([[2, 1, -1, 4], [1, 1, 1, 1]], dtype=np.float32)
    response = server.client.post("/explanations/single?format=kiln", json=x.tolist())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "feature_ablation"
    assert body["baseline"] == 0.0
    expected = x * W_SINGLE[:, 0]
    assert body["attributions"]["x"] == expected.tolist()
    assert body["output"] == (x @ W_SINGLE).tolist()


def test_argmax_class_attributions_are_x_times_w_of_that_class(server: KilnServer) -> None:
    x = np.array([[1, 2, 3, 4], [4, 0, 1, 0]], dtype=np.float32)
    target = (x @ W_CLASSES).argmax(axis=1)
    for path in ("/explanations/classes?format=kiln", "/explanations/classes/1?format=kiln"):
        body = server.client.post(path, json=x.tolist()).json()
        assert body["target"] == target.tolist()
        expected = x * W_CLASSES[:, target].T
        assert body["attributions"]["x"] == expected.tolist()


def test_v1_explain_gives_one_explanation_per_instance(server: KilnServer) -> None:
    x = [[1, 2, 3, 4], [4, 0, 1, 0]]
    response = server.client.post("/v1/models/single:explain?format=kiln", json={"instances": x})
    explanations = response.json()["explanations"]
    assert len(explanations) == 2
    for row, explanation in zip(x, explanations, strict=True):
        expected = np.asarray(row, np.float32) * W_SINGLE[:, 0]
        # one instance is explained as a batch of one row
        assert explanation["attributions"]["x"] == [expected.tolist()]


def test_a_python_handlers_explain_is_called(server: KilnServer) -> None:
    body = server.client.post("/explanations/explained", json={"a": 1}).json()
    assert body == {"explained_by": "handler", "payload": {"a": 1}, "protocol": "torchserve"}
    raw = server.client.put("/explanations/explained", content=b"raw").json()
    assert raw["payload"] == "raw"  # bytes reach explain() too (JSON-encoded back as text)
    v1 = server.client.post("/v1/models/explained:explain", json={"instances": [7]}).json()
    assert v1 == {"explanations": [{"explained_by": "handler", "payload": 7, "protocol": "v1"}]}


def test_no_explainer_is_501_saying_how_to_add_one(server: KilnServer) -> None:
    response = server.client.post("/explanations/unexplained", json=1)
    assert response.status_code == 501
    body = response.json()
    assert body["code"] == 501
    assert body["type"] == "NotImplementedException"
    assert "add an explain(payload, context) method" in body["message"]


def test_explanations_need_post_or_put(server: KilnServer) -> None:
    response = server.client.get("/explanations/single")
    assert response.status_code == 405
    assert response.json()["type"] == "MethodNotAllowedException"


def test_native_explain_route_answers_the_kiln_object(server: KilnServer) -> None:
    x = np.array([[2, 1, -1, 4]], dtype=np.float32)
    body = server.client.post("/single/explain", json=x.tolist()).json()
    assert body["method"] == "feature_ablation"
    assert body["attributions"]["x"] == (x * W_SINGLE[:, 0]).tolist()
    assert body["output"] == (x @ W_SINGLE).tolist()
    handler = server.client.post("/explained/explain", json={"a": 1}).json()
    assert handler == {"explained_by": "handler", "payload": {"a": 1}, "protocol": "native"}
    refused = server.client.get("/single/explain")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "POST"


def test_an_unknown_explanation_format_is_a_400_naming_the_known_ones(server: KilnServer) -> None:
    response = server.client.post("/explanations/single?format=captum", json=[[1, 2, 3, 4]])
    assert response.status_code == 400
    assert response.json()["type"] == "BadRequestException"
    assert "format=kiln" in response.json()["message"]
    v1 = server.client.post("/v1/models/single:explain?format=x", json={"instances": [[1, 2]]})
    assert v1.status_code == 400
    assert "format=kiln" in v1.json()["error"]
