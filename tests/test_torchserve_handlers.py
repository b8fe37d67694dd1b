"""TorchServe handlers served unchanged by the `torchserve:` runtime (issue 16, part 2).

One real `kiln serve` holds a streaming function handler (the seed's), a
BaseHandler-style image classifier over raw bytes with a TorchScript model built
here, a batched function handler, and one raising PredictionException; `.mar`
archives built here with zipfile go through `kiln import`.
"""

from __future__ import annotations

import json
import subprocess
import threading
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from support import KILN, KilnServer, write

torch = pytest.importorskip("torch")

# The seed's handler (004), with echo_stream.mar's intermediate answer: "hello".
ECHO_STREAM = """
from ts.protocol.otf_message_handler import send_intermediate_predict_response
def handle(data, context):
    if type(data) is list:
        for i in range (3):
            send_intermediate_predict_response(["hello"], context.request_ids, "Intermediate Prediction success", 200, context)
        return ["hello world "]
"""  # noqa: E501 - the seed's handler as written

CLASSIFIER = """
import json

import torch
import torch.nn.functional as F
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import map_class_to_label


class TinyImageClassifier(BaseHandler):
    \"\"\"A 2x2 grey image as 4 raw bytes -> its top class, TorchServe style.\"\"\"

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            pixels = torch.frombuffer(bytearray(image), dtype=torch.uint8)
            images.append(pixels.float().div(255))
        return torch.stack(images)

    def postprocess(self, data):
        probs = F.softmax(data, dim=1)
        top = probs.topk(1, dim=1)
        self.context.metrics.add_counter("ImagesClassified", len(probs))
        return map_class_to_label(top.values.tolist(), self.mapping, top.indices.tolist())

    def get_insights(self, tensor_data, raw_data, target):
        # pixel x the weight of the target class: one list per request, as Captum's would be
        weights = self.model.fc.weight[int(target)]
        return (tensor_data * weights).tolist()

    def describe_handle(self):
        return json.dumps({"classes": len(self.mapping), "input": "2x2 grey, 4 raw bytes"})
"""

BATCHED = """
import time


def handle(data, context):
    if data is None:  # TorchServe calls a function handler once at load
        return None
    time.sleep(0.3)  # busy: requests arriving meanwhile are batched (Kiln's adaptive rule)
    return [
        {
            "batch": len(data),
            "body": row.get("body"),
            "request_id": context.get_request_id(i),
            "batch_size": context.system_properties["batch_size"],
            "model_dir_set": bool(context.system_properties["model_dir"]),
            "model_name": context.manifest["model"]["modelName"],
            "header": context.get_request_header(i, "x-request-id"),
        }
        for i, row in enumerate(data)
    ]
"""

STRICT = """
from ts.utils.util import PredictionException


def handle(data, context):
    if data is None:
        return None
    if data[0].get("body") == {"ok": False}:
        raise PredictionException("the input was refused by the handler", 422)
    context.set_response_status(201, "Created", 0)
    return ["fine"]
"""


class TinyNet(torch.nn.Module):
    """Class 0 follows pixel 0, class 1 pixel 1, class 2 pixels 2 and 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[8.0, 0, 0, 0], [0, 8.0, 0, 0], [0, 0, 4.0, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


LABELS = {"0": "cat", "1": "dog", "2": "bird"}


def save_torchscript(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TinyNet()).save(str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ts-handlers")
    write(root / "echo" / "handler.py", ECHO_STREAM)
    write(root / "classifier" / "handler.py", CLASSIFIER)
    save_torchscript(root / "classifier" / "model" / "model.pt")
    write(root / "classifier" / "model" / "index_to_name.json", json.dumps(LABELS))
    write(root / "batched" / "handler.py", BATCHED)
    write(root / "batched" / "model-config.yaml", "batchSize: 4\nmaxBatchDelay: 400\n")
    write(root / "strict" / "handler.py", STRICT)
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: echo-stream
  torchserve: {handler: echo/handler.py}
- kind: api
  name: classifier
  torchserve: {handler: classifier/handler.py, model: classifier/model}
- kind: api
  name: batched
  torchserve: {handler: "batched/handler.py:handle"}
- kind: api
  name: strict
  torchserve: {handler: strict/handler.py}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


# ----- the seed's streaming test, verbatim (test_utils stands in for TorchServe's) ------

TF_INFERENCE_API = ""


class _TestUtils:
    """The seed's helpers: the model is already served by the `server` fixture."""

    def start_torchserve(self, **_: Any) -> None:
        return None

    def register_model(self, name: str, _url: str) -> None:
        assert httpx.get(f"{TF_INFERENCE_API}/ping", timeout=30).status_code == 200, name

    def unregister_model(self, _name: str) -> None:
        return None


test_utils = _TestUtils()


def test_echo_stream_inference(server: KilnServer) -> None:
    global TF_INFERENCE_API
    TF_INFERENCE_API = server.url
    seed_echo_stream_inference()


# fmt: off
def seed_echo_stream_inference():
    test_utils.start_torchserve(no_config_snapshots=True, gen_mar=False)
    test_utils.register_model('echo_stream',
                              'https://torchserve.pytorch.org/mar_files/echo_stream.mar')

    response = requests.post(TF_INFERENCE_API + '/predictions/echo_stream', data="foo", stream=True)
    assert response.headers['Transfer-Encoding'] == 'chunked'

    prediction = []
    for chunk in (response.iter_content(chunk_size=None)):
        if chunk:
            prediction.append(chunk.decode("utf-8"))

    assert str(" ".join(prediction)) == "hello hello hello hello world "
    test_utils.unregister_model('echo_stream')
# fmt: on


# ----- BaseHandler classes, function handlers, batching, statuses ---------------------


def test_base_handler_classifier_over_raw_bytes(server: KilnServer) -> None:
    url = f"{server.url}/predictions/classifier"
    cat = httpx.put(url, content=bytes([255, 0, 0, 0]), timeout=30)
    assert cat.status_code == 200, cat.text
    (answer,) = [cat.json()] if isinstance(cat.json(), dict) else cat.json()
    assert list(answer) == ["cat"]
    assert answer["cat"] > 0.9
    bird = httpx.post(url, files={"data": bytes([0, 0, 255, 255])}, timeout=30)
    assert bird.status_code == 200, bird.text
    assert list(bird.json()) == ["bird"]


def test_base_handler_explanations_pass_through(server: KilnServer) -> None:
    r = httpx.post(
        f"{server.url}/explanations/classifier", content=bytes([255, 0, 0, 255]), timeout=30
    )
    assert r.status_code == 200, r.text
    # explain_handle -> get_insights; like TorchServe, request i gets element i of the list
    assert r.json() == [8.0, 0.0, 0.0, 0.0]


def test_describe_handle_answers_customized_metadata(server: KilnServer) -> None:
    """TorchServe's `GET /models/{m}?customized=true`: the handler's describe_handle()."""
    assert server.management_url
    url = f"{server.management_url}/models/classifier"
    plain = httpx.get(url, timeout=30).json()[0]
    assert plain["modelName"] == "classifier" and "customizedMetadata" not in plain
    described = httpx.get(url, params={"customized": "true"}, timeout=30).json()[0]
    expected = {"classes": len(LABELS), "input": "2x2 grey, 4 raw bytes"}
    assert json.loads(described["customizedMetadata"]) == expected


def test_function_handler_gets_batches_of_request_dicts(server: KilnServer) -> None:
    url = f"{server.url}/predictions/batched"
    answers: dict[int, Any] = {}

    def send(i: int) -> None:
        r = httpx.post(url, json={"x": i}, headers={"x-request-id": f"req-{i}"}, timeout=30)
        answers[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    threads[0].start()  # the first runs alone; the three behind it queue and form a batch
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(answers) == [0, 1, 2, 3]
    for i, (status, body) in answers.items():
        assert status == 200
        assert body["body"] == {"x": i}  # JSON arrives parsed, as TorchServe gives it
        assert body["header"] == f"req-{i}"
        assert body["batch_size"] == 4  # batchSize from model-config.yaml
        assert body["model_dir_set"] and body["model_name"] == "batched"
    assert max(body["batch"] for _, body in answers.values()) >= 2


def test_prediction_exception_answers_its_status(server: KilnServer) -> None:
    url = f"{server.url}/predictions/strict"
    refused = httpx.post(url, json={"ok": False}, timeout=30)
    assert refused.status_code == 422
    assert "the input was refused by the handler" in refused.json()["message"]
    fine = httpx.post(url, json={"ok": True}, timeout=30)
    assert fine.status_code == 201  # context.set_response_status
    assert fine.text == "fine"


# ----- kiln import model.mar ---------------------------------------------------------

MODEL_PY = """
import torch


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.fc(x)
"""


def build_mar(path: Path, weights: Path, model_file: bool) -> Path:
    """A .mar as torch-model-archiver lays it out: every file at the root, plus the manifest."""
    model: dict[str, Any] = {
        "modelName": "tiny_classifier",
        "serializedFile": weights.name,
        "handler": "handler.py",
        "modelVersion": "1.0",
    }
    if model_file:
        model["modelFile"] = "model.py"
    manifest = {"createdOn": "01/01/2026 00:00:00", "runtime": "python", "model": model}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        zf.writestr("handler.py", CLASSIFIER)
        zf.writestr("index_to_name.json", json.dumps(LABELS))
        if model_file:
            zf.writestr("model.py", MODEL_PY)
        zf.write(weights, weights.name)
    return path


def kiln_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KILN, "import", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_mar_with_state_dict_is_imported_and_served(tmp_path: Path) -> None:
    weights = tmp_path / "model.pth"
    torch.save(TinyNet().state_dict(), weights)
    mar = build_mar(tmp_path / "tiny_classifier.mar", weights, model_file=True)
    project = tmp_path / "project"
    done = kiln_import(str(mar), str(project))
    assert done.returncode == 0, done.stderr
    config = (project / "kiln.yaml").read_text()
    assert "name: tiny-classifier" in config and 'version: "1.0"' in config
    assert "trusted" not in config
    assert (project / "model" / "MAR-INF" / "MANIFEST.json").is_file()
    srv = KilnServer(project, tmp_path / "home")
    try:
        r = httpx.post(
            f"{srv.url}/predictions/tiny_classifier", content=bytes([0, 255, 0, 0]), timeout=30
        )
        assert r.status_code == 200, r.text
        assert list(r.json()) == ["dog"]
    finally:
        srv.stop()


def test_pickled_mar_is_refused_without_trusted(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    torch.save(TinyNet(), weights)  # the whole module: a full pickle
    mar = build_mar(tmp_path / "pickled.mar", weights, model_file=False)
    refused = kiln_import(str(mar), str(tmp_path / "refused"))
    assert refused.returncode == 1
    assert "full pickle" in refused.stderr and "--trusted" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "refused").exists()
    accepted = kiln_import(str(mar), str(tmp_path / "accepted"), "--trusted")
    assert accepted.returncode == 0, accepted.stderr
    assert "trusted: true" in (tmp_path / "accepted" / "kiln.yaml").read_text()


def test_context_metrics_reach_prometheus(server: KilnServer) -> None:
    url = f"{server.url}/predictions/classifier"
    for _ in range(2):
        assert httpx.post(url, content=bytes([0, 255, 0, 0]), timeout=30).status_code == 200
    assert server.metrics_url
    text = httpx.get(server.metrics_url, timeout=30).text
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("kiln_handler_counter_total{")
        and 'api="classifier"' in line
        and 'name="ImagesClassified"' in line
    ]
    assert len(counted) == 1, text[-2000:]
    assert float(counted[0].rsplit(" ", 1)[1]) >= 2  # the handler's add_counter, summed
    timed = [
        line
        for line in text.splitlines()
        if line.startswith("kiln_handler_metric{")
        and 'name="HandlerTime"' in line
        and 'unit="ms"' in line
    ]
    assert len(timed) == 1 and float(timed[0].rsplit(" ", 1)[1]) >= 0  # BaseHandler's
