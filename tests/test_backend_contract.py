"""One contract, every backend: the protocols' core cases against `kiln server` on this
machine and against `kiln server --backend ray` through Ray Serve's proxy.

The same project (a Python handler and an ONNX model the test builds), deployed the
same way with the CLI, answers the same values and the same errors whichever backend
places it: native, KServe V1 (predict and explain), V2 with tritonclient, TorchServe's
inference API, streaming (chunked and SSE), API keys, the deployment's env, the
tracker. Ray's own behaviour (nodes, failover, scale to zero) is in test_ray_*.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from daemon import Daemon
from support import build_linear_onnx, write

W = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)

KILN_YAML = """
- kind: deployment
  name: contract
- kind: api
  name: echo
  python: {handler: model.py:Model}
  compute: {cpu: 200m}
  env: {PLACE: kiln.yaml}
  tracker: {model_type: classification, key: label}
- kind: api
  name: words
  python: {handler: model.py:Words}
  metadata: {streaming: true}
  compute: {cpu: 100m}
- kind: api
  name: lin
  onnx: {model: model/lin.onnx}
  compute: {cpu: 200m}
"""

MODEL_PY = """
import os


class Model:
    def predict(self, payload, context):
        if payload == "env":
            return {k: os.environ.get(k) for k in ("GREETING", "PLACE", "KILN_STATE_URL")}
        if isinstance(payload, dict):
            x = payload["x"]
            return {"y": x * 2, "label": "huge" if x > 1000 else "big" if x > 10 else "small"}
        return payload * 2

    def explain(self, payload, context):
        return {"why": f"{payload} doubled", "protocol": context.protocol}


class Words:
    def predict(self, payload, context):
        for word in ("one ", "two ", "three"):
            yield word
"""


@dataclass
class Served:
    backend: str
    url: str  # where clients send requests: the server's port, or Serve's proxy
    key: str
    endpoint: str  # the native route of `echo`
    metrics_url: str  # the control plane's metrics port

    @property
    def auth(self) -> dict[str, str]:
        return {"x-api-key": self.key}

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers=self.auth, timeout=60, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["local", "ray"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp(f"contract-{request.param}")
    project = root / "project"
    write(project / "kiln.yaml", KILN_YAML)
    write(project / "model.py", MODEL_PY)
    write(project / ".env", "GREETING=hello from .env\n")
    build_linear_onnx(project / "model" / "lin.onnx", W)
    if request.param == "ray":
        import kiln_on_ray

        cluster = request.getfixturevalue("ray_cluster")
        daemon = kiln_on_ray.start(cluster, root / "home")
        url = cluster.url
    else:
        daemon = Daemon(root / "home")
        daemon.start()
        url = daemon.url
    try:
        done = daemon.kiln("deploy", str(project), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        endpoint = daemon.apis()["echo"]["endpoint"]
        metrics = daemon.info["metrics_url"]
        served = Served(request.param, url, daemon.admin_key, endpoint, metrics)
        daemon.wait_until(lambda: served.post(endpoint, json={"x": 1}).status_code == 200, 30)
        yield served
    finally:
        daemon.stop()
        if request.param == "ray":
            kiln_on_ray.remove_kiln_apps()


def test_native_kserve_v1_and_torchserve_answer_the_same(served: Served) -> None:
    native = served.post(served.endpoint, json={"x": 21})
    assert native.status_code == 200, native.text
    assert native.json() == {"y": 42, "label": "big"}
    v1 = served.post("/v1/models/echo:predict", json={"instances": [1, 2, 3]})
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == [2, 4, 6]
    ts = served.post("/predictions/echo", json={"x": 5})
    assert ts.status_code == 200, ts.text
    assert ts.json() == {"y": 10, "label": "small"}


def test_v2_with_tritonclient(served: Served) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(served.url.removeprefix("http://"))
    try:
        x = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 1.0]], dtype=np.float32)
        inputs = [httpclient.InferInput("x", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=True)
        wanted = [httpclient.InferRequestedOutput("y")]
        result = client.infer("lin", inputs, outputs=wanted, headers=served.auth)
        np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)
        metadata = client.get_model_metadata("lin", headers=served.auth)
        assert metadata["inputs"][0]["name"] == "x" and metadata["inputs"][0]["datatype"] == "FP32"
        assert client.is_model_ready("lin", headers=served.auth)
    finally:
        client.close()


def test_errors_are_the_same_on_every_backend(served: Served) -> None:
    malformed = served.post(served.endpoint, content=b"{not json")
    assert malformed.status_code == 400, malformed.text
    assert "error" in malformed.json()
    missing = served.post("/v2/models/nope/infer", json={"inputs": []})
    assert missing.status_code == 404, missing.text
    assert "nope" in missing.text  # the error names the model it could not find
    unauthenticated = httpx.post(f"{served.url}{served.endpoint}", json={"x": 1}, timeout=30)
    assert unauthenticated.status_code == 401
    bad_v2 = served.post("/v2/models/lin/infer", json={"inputs": [{"name": "x"}]})
    assert bad_v2.status_code == 400, bad_v2.text


def test_the_deployments_env_reaches_the_handler_and_nothing_of_the_servers(
    served: Served,
) -> None:
    answer = served.post(served.endpoint, json="env")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "GREETING": "hello from .env",
        "PLACE": "kiln.yaml",
        "KILN_STATE_URL": None,
    }


def test_the_tracker_counts_answers_whichever_backend_served_them(served: Served) -> None:
    def big() -> float:
        text = httpx.get(served.metrics_url, headers=served.auth, timeout=30).text
        for line in text.splitlines():
            if line.startswith("kiln_tracked_predictions_total{") and 'class_name="huge"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    assert big() == 0.0
    for x in (1001, 1002, 1003):
        assert served.post(served.endpoint, json={"x": x}).status_code == 200
    deadline = time.monotonic() + 30
    while big() < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.5)  # a late duplicate from the cluster would show by now
    assert big() == 3.0


def test_explanations_and_streams_on_every_backend(served: Served) -> None:
    explained = served.post("/v1/models/echo:explain", json={"instances": [2, 5]})
    assert explained.status_code == 200, explained.text
    assert explained.json() == {
        "explanations": [
            {"why": "2 doubled", "protocol": "v1"},
            {"why": "5 doubled", "protocol": "v1"},
        ]
    }
    with httpx.Client(base_url=served.url, headers=served.auth, timeout=60) as http:
        with http.stream("POST", "/predictions/words", content=b"go") as response:
            assert response.status_code == 200, response.read()
            assert b"".join(response.iter_raw()) == b"one two three"
        sse = http.post(
            "/predictions/words", content=b"go", headers={"Accept": "text/event-stream"}
        )
        assert sse.status_code == 200 and sse.headers["content-type"] == "text/event-stream"
        data = [line for line in sse.text.splitlines() if line.startswith("data:")]
        assert data == ["data: one ", "data: two ", "data: three", "data: {}"]
