"""TorchServe's explanation shapes (seed 004) on a real `kiln serve` of examples/torchserve-compat.

`/explanations/{m}` answers the bare nested list of attributions that Captum
returns through TorchServe, shaped like the input; KServe V1 `:explain` answers
`{"explanations": [<that list per instance>]}`; several inputs give one list per
input in signature order; a handler's own `explain()` answer is passed through;
`?format=kiln` (and the native `POST {endpoint}/explain`) give Kiln's object.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from support import KilnServer, build_linear_onnx, build_two_input_onnx, write

EXAMPLE = Path(__file__).parents[1] / "examples" / "torchserve-compat"
PNG = "examples/image_classifier/mnist/test_data/0.png"
MNIST_JSON = "kubernetes/kserve/kf_request_json/v1/mnist.json"
W_SINGLE = np.array([[0.5], [-2], [3], [0.25]], dtype=np.float32)

HANDLER = """
class OwnExplainer:
    def predict(self, payload, context):
        return payload

    def explain(self, payload, context):
        # Looks like Kiln's object on purpose: it must still pass through untouched.
        return {"method": "mine", "attributions": {"x": [payload]}, "protocol": context.protocol}
"""

EXTRA_APIS = """
- kind: api
  name: single
  onnx: {model: model/single.onnx}
- kind: api
  name: two
  onnx: {model: model/two.onnx}
- kind: api
  name: own
  python: {handler: own.py:OwnExplainer}
"""


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory):
    """The seed's example project, plus three small APIs for the multi-input cases."""
    project = tmp_path_factory.mktemp("shapes") / "torchserve-compat"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    subprocess.run(
        [sys.executable, "build_models.py"], cwd=project, check=True, capture_output=True
    )
    build_linear_onnx(project / "model" / "single.onnx", W_SINGLE)
    build_two_input_onnx(project / "model" / "two.onnx")
    write(project / "own.py", HANDLER)
    config = project / "kiln.yaml"
    config.write_text(config.read_text() + EXTRA_APIS)
    srv = KilnServer(project, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def _mnist(project: Path) -> tuple[np.ndarray, Any]:
    """The example's mnist weights [784, 10] and its own pixel reader."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(project / "model" / "mnist.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sys.path.insert(0, str(project / "src"))
    try:
        from mnist_hooks import pixels
    finally:
        sys.path.pop(0)
    return weights["W"], pixels


def _expected_mnist(project: Path, sample: object) -> np.ndarray:
    """Feature ablation of a linear model: pixel * weight of the predicted digit."""
    w, pixels = _mnist(project)
    image = pixels(sample).ravel()
    digit = int(np.argmax(image @ w))
    return (image * w[:, digit]).reshape(1, 1, 28, 28)


def test_seed_explanations_curl_answers_a_bare_list_shaped_like_the_input(
    example: KilnServer,
) -> None:
    # curl http://127.0.0.1:8080/explanations/mnist -T examples/.../0.png
    png = (example.project / PNG).read_bytes()
    response = example.client.put("/explanations/mnist", content=png)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer, list) and isinstance(answer[0][0][0][0], float)
    attributions = np.asarray(answer)
    assert attributions.shape == (1, 1, 28, 28)  # the model input's shape: [1, 1, 28, 28]
    np.testing.assert_allclose(attributions, _expected_mnist(example.project, png), atol=1e-4)
    # Kiln's object stays one query parameter away, with the same numbers in it.
    rich = example.client.put("/explanations/mnist?format=kiln", content=png).json()
    assert rich["method"] == "feature_ablation"
    assert rich["target"] == [0]
    assert rich["attributions"]["image"] == answer


def test_seed_kserve_explain_wraps_one_list_per_instance(example: KilnServer) -> None:
    body = orjson.loads((example.project / MNIST_JSON).read_bytes())
    response = example.client.post("/v1/models/mnist:explain", json=body)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert len(explanations) == 1
    expected = _expected_mnist(example.project, body["instances"][0])
    assert np.asarray(explanations[0]).shape == (1, 1, 28, 28)
    np.testing.assert_allclose(np.asarray(explanations[0]), expected, atol=1e-4)
    # Two instances: two lists, in order; the PNG of a 0 explained second.
    png = (example.project / PNG).read_bytes()
    two = {"instances": [body["instances"][0], {"data": base64.b64encode(png).decode()}]}
    both = example.client.post("/v1/models/mnist:explain", json=two).json()["explanations"]
    assert len(both) == 2
    np.testing.assert_allclose(np.asarray(both[0]), expected, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(both[1]), _expected_mnist(example.project, png), atol=1e-4
    )
    rich = example.client.post("/v1/models/mnist:explain?format=kiln", json=body).json()
    assert rich["explanations"][0]["method"] == "feature_ablation"


def test_instances_with_and_without_a_batch_axis_keep_their_shape(example: KilnServer) -> None:
    one = [2.0, 1.0, -1.0, 4.0]
    answer = example.client.post("/explanations/single", json=one).json()
    assert answer == (np.asarray(one, np.float32) * W_SINGLE[:, 0]).tolist()  # shape [4]
    batch = [[2, 1, -1, 4], [1, 1, 1, 1]]
    answer = example.client.post("/explanations/single", json=batch).json()
    assert np.asarray(answer).shape == (2, 4)
    assert answer == (np.asarray(batch, np.float32) * W_SINGLE[:, 0]).tolist()
    v1 = example.client.post("/v1/models/single:explain", json={"instances": batch}).json()
    rows = [(np.asarray(row, np.float32) * W_SINGLE[:, 0]).tolist() for row in batch]
    assert v1 == {"explanations": rows}


def test_several_inputs_answer_one_list_per_input_in_signature_order(
    example: KilnServer,
) -> None:
    # The signature is a, b, idx; the body names them in another order on purpose.
    body = {"idx": [[3, 4]], "b": [[0, 1, 0]], "a": [[1, 5, 2]]}
    answer = example.client.post("/explanations/two", json=body).json()
    # sum = a + b = [1, 6, 2]: the explained output is column 1 (its argmax); zeroing
    # a[1] drops it by 5, b[1] by 1; idx does not feed `sum`.
    assert answer == [[[0.0, 5.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0]]]
    for values, sent in zip(answer, (body["a"], body["b"], body["idx"]), strict=True):
        assert np.asarray(values).shape == np.asarray(sent).shape
    instance = {"a": [1, 5, 2], "b": [0, 1, 0], "idx": [3, 4]}
    v1 = example.client.post("/v1/models/two:explain", json={"instances": [instance]}).json()
    assert v1 == {"explanations": [[[0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0]]]}


def test_a_handlers_own_explain_answer_passes_through_unchanged(example: KilnServer) -> None:
    answer = example.client.post("/explanations/own", json=7).json()
    assert answer == {"method": "mine", "attributions": {"x": [7]}, "protocol": "torchserve"}
    v1 = example.client.post("/v1/models/own:explain", json={"instances": [7]}).json()
    own = {"method": "mine", "attributions": {"x": [7]}, "protocol": "v1"}
    assert v1 == {"explanations": [own]}
