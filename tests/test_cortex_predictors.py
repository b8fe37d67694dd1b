"""Cortex predictor-era ONNX and TensorFlow predictor classes, served by a real `kiln serve`.

`predictor: {type: onnx, path: predictor.py}` is an `ONNXPredictor` class when
the file defines one (Cortex v0.13 to v0.30: `__init__(self, onnx_client, config)`,
`predict(self, payload)` calling `onnx_client.predict(model_input)`), and the
TensorFlow twin with `tensorflow_client`; a file without the class keeps the
request-handler meaning (`pre_inference` / `post_inference`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import KilnServer, build_linear_onnx, write

# Exact in float32: small integers and halves.
W_IRIS = np.array([[1, 0, 0.5], [0, 2, 0], [3, 0, 1], [0, 1, 4]], dtype=np.float32)
LABELS = ["setosa", "versicolor", "virginica"]

# Cortex's iris ONNXPredictor, as its examples wrote it (labels from `config`).
ONNX_PREDICTOR = """
class ONNXPredictor:
    def __init__(self, onnx_client, config):
        self.client = onnx_client
        self.labels = config["labels"]

    def predict(self, payload):
        model_input = [
            payload["sepal_length"],
            payload["sepal_width"],
            payload["petal_length"],
            payload["petal_width"],
        ]
        prediction = self.client.predict(model_input)
        scores = prediction[0][0]
        return {"label": self.labels[int(scores.argmax())], "scores": scores.tolist()}
"""

# Same `predictor:` mapping, no ONNXPredictor: seed-era request handlers.
HOOKS = """
def post_inference(prediction, signature, metadata):
    return {"hooked": prediction[0].tolist()}
"""

# Cortex's iris TensorFlowPredictor: int(prediction["class_ids"][0]).
TF_PREDICTOR = """
labels = ["setosa", "versicolor", "virginica"]


class TensorFlowPredictor:
    def __init__(self, tensorflow_client, config):
        self.client = tensorflow_client
        self.offset = config.get("offset", 0)

    def predict(self, payload, query_params):
        prediction = self.client.predict(payload)
        predicted_class_id = int(prediction["class_ids"][0]) + self.offset
        return {"label": labels[predicted_class_id], "score": prediction["score"],
                "query": query_params}
"""


def iris(x: list[float]) -> dict[str, float]:
    return dict(zip(["sepal_length", "sepal_width", "petal_length", "petal_width"], x, strict=True))


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cortex-onnx")
    build_linear_onnx(root / "model.onnx", W_IRIS)
    write(root / "predictor.py", ONNX_PREDICTOR)
    write(root / "hooks.py", HOOKS)
    write(
        root / "kiln.yaml",
        f"""
- name: iris
  kind: RealtimeAPI
  predictor:
    type: onnx
    path: predictor.py
    model: model.onnx
    config:
      labels: {LABELS}
- name: hooks
  kind: RealtimeAPI
  predictor:
    type: onnx
    path: hooks.py
    model: model.onnx
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def test_onnx_predictor_class_answers_through_its_onnx_client(onnx_server: KilnServer) -> None:
    for x in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [2, 1, 1, 0.5]):
        response = onnx_server.client.post("/iris", json=iris(x))
        assert response.status_code == 200, response.text
        scores = np.asarray(x, np.float32) @ W_IRIS
        assert response.json() == {
            "label": LABELS[int(scores.argmax())],
            "scores": scores.tolist(),
        }
    # The model is Kiln's ONNX runtime: its signature is the API's (V2 metadata).
    meta = onnx_server.client.get("/v2/models/iris").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


def test_onnx_predictor_errors_are_the_runtimes_400s(onnx_server: KilnServer) -> None:
    missing = onnx_server.client.post("/iris", json={"sepal_length": 1})
    assert missing.status_code == 500  # the user's own KeyError
    bad = onnx_server.client.post("/iris", json=iris([1, 2, "x", 4]))
    assert bad.status_code == 400
    assert "input 'x'" in bad.json()["error"]["message"]


def test_a_path_without_onnx_predictor_keeps_request_handlers(onnx_server: KilnServer) -> None:
    x = [[1, 2, 3, 4]]
    answer = onnx_server.client.post("/hooks", json=x).json()
    assert answer == {"hooked": (np.asarray(x, np.float32) @ W_IRIS).tolist()}


def save_tf_model(folder: Path) -> None:
    tf = pytest.importorskip("tensorflow")

    class Iris(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(W_IRIS)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            scores = tf.matmul(x, self.w)
            return {"score": scores, "class_ids": tf.argmax(scores, axis=1)[:, None]}

    model = Iris()
    tf.saved_model.save(model, str(folder), signatures={"serving_default": model.serve})


@pytest.fixture(scope="module")
def tf_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cortex-tf")
    save_tf_model(root / "model" / "1")
    write(root / "predictor.py", TF_PREDICTOR)
    write(
        root / "kiln.yaml",
        """
- name: iris-tf
  kind: RealtimeAPI
  predictor:
    type: tensorflow
    path: predictor.py
    model: model
    config: {offset: 0}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def test_tensorflow_predictor_class_answers_through_its_client(tf_server: KilnServer) -> None:
    for x in ([0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]):
        response = tf_server.client.post("/iris-tf?source=test", json={"x": x})
        assert response.status_code == 200, response.text
        scores = np.asarray(x, np.float32) @ W_IRIS
        # Outputs come back flat, as Cortex's client simplified TF Serving's answer.
        assert response.json() == {
            "label": LABELS[int(scores.argmax())],
            "score": scores.tolist(),
            "query": {"source": "test"},
        }
