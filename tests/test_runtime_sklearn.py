"""scikit-learn served end to end: skops and joblib files, predict and predict_proba.

The classifiers are trained here on iris and every answer is compared with
the same estimator called in-process.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import KilnServer, write

pytest.importorskip("sklearn")
sio = pytest.importorskip("skops.io")
joblib = pytest.importorskip("joblib")

from sklearn.datasets import load_iris  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer, StandardScaler  # noqa: E402

NAMES = np.array(["setosa", "versicolor", "virginica"])
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sklearn-project")
    x, y = load_iris(return_X_y=True)
    named = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, NAMES[y])
    numbered = LogisticRegression(max_iter=500).fit(x, y)
    write(root / "features.py", "def double(x):\n    return x * 2\n")
    sys.path.insert(0, str(root))
    try:  # a pipeline with a user function: skops does not trust it by default
        features = importlib.import_module("features")
        custom = make_pipeline(
            FunctionTransformer(features.double), LogisticRegression(max_iter=500)
        )
        custom.fit(x, y)
        (root / "model").mkdir()
        sio.dump(custom, root / "model" / "custom.skops")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("features", None)
    sio.dump(named, root / "model" / "iris.skops")
    joblib.dump(numbered, root / "model" / "iris.joblib")
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: labels
  sklearn:
    model: model/iris.skops
  tracker:
    model_type: classification
- kind: api
  name: proba
  sklearn:
    model: model/iris.skops
    method: predict_proba
  batching:
    max_batch_size: 8
- kind: api
  name: custom
  sklearn:
    model: model/custom.skops
- kind: api
  name: custom-trusted
  sklearn:
    model: model/custom.skops
    trusted: true
- kind: api
  name: pickled
  sklearn:
    model: model/iris.joblib
- kind: api
  name: pickled-trusted
  sklearn:
    model: model/iris.joblib
    trusted: true
- kind: api
  name: no-decision
  sklearn:
    model: model/iris.skops
    method: transform
""",
    )
    return root, named, numbered, custom


@pytest.fixture(scope="module")
def server(project, tmp_path_factory: pytest.TempPathFactory):
    srv = KilnServer(project[0], tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def test_predict_answers_class_labels(server: KilnServer, project) -> None:
    response = server.client.post("/labels", json=ROWS)
    assert response.status_code == 200, response.text
    assert response.json() == project[1].predict(np.asarray(ROWS)).tolist()
    assert response.json() == ["setosa", "virginica", "versicolor"]
    one = server.client.post("/labels", json=ROWS[0])
    assert one.json() == "setosa"


def test_predict_proba_answers_one_row_of_probabilities_per_instance(
    server: KilnServer, project
) -> None:
    response = server.client.post("/proba", json={"input": ROWS})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json(), project[1].predict_proba(np.asarray(ROWS)))
    assert len(response.json()) == 3 and len(response.json()[0]) == 3


def test_v2_metadata_and_infer(server: KilnServer, project) -> None:
    meta = server.client.get("/v2/models/labels").json()
    assert meta["platform"] == "sklearn"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "predict", "datatype": "BYTES", "shape": [-1]}]
    proba_meta = server.client.get("/v2/models/proba").json()
    assert proba_meta["outputs"] == [
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}
    ]
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [3, 4], "data": ROWS}]}
    labels = server.client.post("/v2/models/labels/infer", json=body).json()["outputs"][0]
    assert labels["data"] == ["setosa", "virginica", "versicolor"]
    proba = server.client.post("/v2/models/proba/infer", json=body).json()["outputs"][0]
    assert proba["shape"] == [3, 3]
    np.testing.assert_allclose(
        np.reshape(proba["data"], (3, 3)), project[1].predict_proba(np.asarray(ROWS))
    )


def test_kserve_v1_instances(server: KilnServer, project) -> None:
    response = server.client.post("/v1/models/labels:predict", json={"instances": ROWS})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == ["setosa", "virginica", "versicolor"]


def test_wrong_number_of_features_is_a_400(server: KilnServer) -> None:
    response = server.client.post("/labels", json=[[1.0, 2.0]])
    assert response.status_code == 400
    assert "expected [N, 4]" in response.json()["error"]["message"]


def test_untrusted_skops_types_are_listed_with_how_to_trust_them(server: KilnServer) -> None:
    response = server.client.post("/custom", json=ROWS)
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "features.double" in message
    assert "add 'trusted: true' to the sklearn block of API 'custom'" in message


def test_trusted_skops_loads(server: KilnServer, project) -> None:
    response = server.client.post("/custom-trusted", json=ROWS)
    assert response.json() == project[3].predict(np.asarray(ROWS)).tolist()


def test_joblib_is_refused_unless_trusted(server: KilnServer, project) -> None:
    refused = server.client.post("/pickled", json=ROWS)
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "pickle" in message and "runs whatever code it contains" in message
    assert "trusted: true" in message and "skops" in message
    trusted = server.client.post("/pickled-trusted", json=ROWS)
    assert trusted.json() == project[2].predict(np.asarray(ROWS)).tolist() == [0, 2, 1]


def test_a_method_the_estimator_lacks_is_a_load_error(server: KilnServer) -> None:
    message = server.client.post("/no-decision", json=ROWS).json()["error"]["message"]
    assert "has no transform()" in message and "predict_proba" in message


def test_a_method_that_is_not_for_inference_is_refused_by_the_config(tmp_path: Path) -> None:
    from kiln.config import ConfigError, load_project

    write(
        tmp_path / "kiln.yaml",
        "- kind: api\n  name: a\n  sklearn:\n    model: m.skops\n    method: fit\n",
    )
    with pytest.raises(ConfigError, match="not an inference method"):
        load_project(tmp_path, check_files=False)


def test_tracker_counts_class_labels(server: KilnServer) -> None:
    for _ in range(2):
        server.client.post("/labels", json=ROWS)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = server.client.get("/apis/labels/monitoring").json()
        if body.get("count", 0) >= 6:
            break
        time.sleep(0.2)
    assert body["model_type"] == "classification"
    assert body["classes"]["setosa"] >= 2 and body["classes"]["virginica"] >= 2
