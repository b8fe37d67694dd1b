"""TensorFlow SavedModels served end to end: signatures, version folders, zips, handlers.

The model is a tf.Module with two signatures, saved by the test; every answer
is compared with the same signature called in-process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import KilnServer, write

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
tf = pytest.importorskip("tensorflow")

ROWS = [[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]
IDS = [3, 7]

HANDLER = """
def pre_inference(sample, signature, metadata):
    assert signature["x"]["shape"] == [-1, 3] and signature["x"]["type"] == "float32"
    return {"x": [sample["features"]]}


def post_inference(prediction, signature, metadata):
    return {"projection": prediction["y"][0].tolist(), "unit": metadata["unit"]}
"""


def save_model(folder: Path, scale: float) -> None:
    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
            self.scale = tf.Variable(scale)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def project(self, x):
            return {"y": tf.matmul(x, self.w) * self.scale}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 3], tf.float32, name="x"),
                tf.TensorSpec([None], tf.int64, name="ids"),
            ]
        )
        def total(self, x, ids):
            return {"sum": tf.reduce_sum(x, axis=1) * self.scale, "ids_doubled": ids * 2}

    model = Model()
    tf.saved_model.save(
        model, str(folder), signatures={"project": model.project, "total": model.total}
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tf-project")
    save_model(root / "model" / "two", 2.0)
    save_model(root / "model" / "versions" / "1", 1.0)  # seed era: numbered versions,
    save_model(root / "model" / "versions" / "2", 3.0)  # the highest is served
    shutil.make_archive(str(root / "model" / "zipped"), "zip", root / "model" / "two")
    write(root / "handler.py", HANDLER)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: ambiguous
  tensorflow:
    model: model/two
- kind: api
  name: project
  tensorflow:
    model: model/two
    signature_key: project
- kind: api
  name: total
  tensorflow:
    model: model/two
    signature_key: total
- kind: api
  name: versioned
  tensorflow:
    model: model/versions
    signature_key: project
- kind: api
  name: zipped
  tensorflow:
    model: model/zipped.zip
    signature_key: project
    request_handler: handler.py
  metadata:
    unit: cm
- kind: api
  name: wrong-key
  tensorflow:
    model: model/two
    signature_key: predict
""",
    )
    return root


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = KilnServer(project, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def in_process(folder: Path, key: str, **feeds: object) -> dict[str, np.ndarray]:
    fn = tf.saved_model.load(str(folder)).signatures[key]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def test_several_signatures_without_a_key_list_the_keys(server: KilnServer) -> None:
    response = server.client.post("/ambiguous", json=ROWS)
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "2 signatures" in message and "signature_key" in message
    assert "project, total" in message


def test_an_unknown_key_lists_the_available_ones(server: KilnServer) -> None:
    message = server.client.post("/wrong-key", json=ROWS).json()["error"]["message"]
    assert "signature_key 'predict' is not in the model" in message
    assert "available keys: project, total" in message


def test_signature_key_picks_one_and_values_equal_tensorflow(
    server: KilnServer, project: Path
) -> None:
    response = server.client.post("/project", json=ROWS)
    assert response.status_code == 200, response.text
    want = in_process(project / "model" / "two", "project", x=np.float32(ROWS))
    np.testing.assert_allclose(response.json(), want["y"], rtol=1e-6)


def test_two_inputs_and_two_outputs_by_name(server: KilnServer, project: Path) -> None:
    response = server.client.post("/total", json={"x": ROWS, "ids": IDS})
    assert response.status_code == 200, response.text
    want = in_process(project / "model" / "two", "total", x=np.float32(ROWS), ids=np.int64(IDS))
    body = response.json()
    np.testing.assert_allclose(body["sum"], want["sum"], rtol=1e-6)
    assert body["ids_doubled"] == want["ids_doubled"].tolist() == [6, 14]


def test_v2_metadata_has_the_signature_names_dtypes_and_shapes(server: KilnServer) -> None:
    body = server.client.get("/v2/models/total").json()
    assert body["platform"] == "tensorflow_savedmodel"
    assert body["inputs"] == [
        {"name": "ids", "datatype": "INT64", "shape": [-1]},
        {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert body["outputs"] == [
        {"name": "ids_doubled", "datatype": "INT64", "shape": [-1]},
        {"name": "sum", "datatype": "FP32", "shape": [-1]},
    ]


def test_v2_infer_equals_tensorflow(server: KilnServer, project: Path) -> None:
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": ROWS},
            {"name": "ids", "datatype": "INT64", "shape": [2], "data": IDS},
        ]
    }
    response = server.client.post("/v2/models/total/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    want = in_process(project / "model" / "two", "total", x=np.float32(ROWS), ids=np.int64(IDS))
    np.testing.assert_allclose(outputs["sum"]["data"], want["sum"], rtol=1e-6)
    assert outputs["ids_doubled"]["datatype"] == "INT64"


def test_the_highest_numbered_version_is_served(server: KilnServer, project: Path) -> None:
    response = server.client.post("/versioned", json=[ROWS[0]])
    want = in_process(project / "model" / "versions" / "2", "project", x=np.float32([ROWS[0]]))
    np.testing.assert_allclose(response.json(), want["y"], rtol=1e-6)


def test_a_zipped_saved_model_with_request_handlers(server: KilnServer, project: Path) -> None:
    response = server.client.post("/zipped", json={"features": ROWS[0]})
    assert response.status_code == 200, response.text
    want = in_process(project / "model" / "two", "project", x=np.float32([ROWS[0]]))
    assert response.json()["unit"] == "cm"
    np.testing.assert_allclose(response.json()["projection"], want["y"][0], rtol=1e-6)


def test_wrong_shape_and_dtype_are_400(server: KilnServer) -> None:
    assert server.client.post("/project", json=[[1, 2]]).status_code == 400
    response = server.client.post("/total", json={"x": ROWS, "ids": [0.5, 1]})
    assert response.status_code == 400
    assert "integers" in response.json()["error"]["message"]
