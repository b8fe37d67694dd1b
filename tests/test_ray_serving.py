"""Kiln on a real 2-node Ray cluster: a project served by Ray Serve through Kiln's ingress.

Every request goes through Serve's HTTP proxy on 127.0.0.1 to the KilnIngress
deployment (Kiln's inference app) and on to a KilnReplica, whose Kiln worker
subprocess runs the handler or the ONNX model. Values are checked, replicas must
answer from both nodes, a handler cannot reach the cluster, and a killed worker
fails fast and comes back.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ray_cluster import RayCluster  # the session fixture `ray_cluster` is in conftest.py
from support import build_linear_onnx

serve = pytest.importorskip("ray.serve")

W = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)

KILN_YAML = """
- kind: api
  name: echo
  python: {handler: model.py:Model}
  compute: {min_replicas: 2, max_replicas: 2, cpu: 250m}
  serving: {response_timeout_s: 20}
- kind: api
  name: lin
  onnx: {model: model/lin.onnx}
  compute: {min_replicas: 1, max_replicas: 1, cpu: 200m}
"""

MODEL_PY = """
import os


class Model:
    def predict(self, payload, context):
        if isinstance(payload, dict) and payload.get("probe") == "ray":
            seen = sorted(k for k in os.environ if k.startswith("RAY"))
            try:
                import ray

                ray.init(address="auto")
                return {"ray": "connected", "env": seen}
            except Exception as exc:
                return {"ray": "refused", "error": type(exc).__name__, "env": seen,
                        "tmp_ray": os.path.exists("/tmp/ray")}
        if isinstance(payload, dict) and "sleep" in payload:
            import time

            time.sleep(payload["sleep"])
            return {"slept": payload["sleep"]}
        if isinstance(payload, dict):
            return {"y": payload["x"] * 2}
        return payload * 2
"""


@pytest.fixture(scope="module")
def kiln_on_ray(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from kiln.backends.ray.app import build_app

    root: Path = tmp_path_factory.mktemp("ray-project")
    (root / "kiln.yaml").write_text(KILN_YAML)
    (root / "model.py").write_text(MODEL_PY)
    build_linear_onnx(root / "model" / "lin.onnx", W)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deployed = pool.submit(
            serve.run, build_app({"project_dir": str(root)}), name="kiln", route_prefix="/"
        )
        deployed.result(timeout=120)
    yield ray_cluster
    serve.delete("kiln")


def _client(cluster: RayCluster) -> httpx.Client:
    return httpx.Client(base_url=cluster.url, timeout=30)


def test_native_v1_and_torchserve_through_serves_proxy(kiln_on_ray: RayCluster) -> None:
    with _client(kiln_on_ray) as http:
        native = http.post("/echo", json={"x": 21})
        assert native.status_code == 200, native.text
        assert native.json() == {"y": 42}
        assert native.headers["x-kiln-node"] in (kiln_on_ray.head_node, kiln_on_ray.second_node)
        v1 = http.post("/v1/models/echo:predict", json={"instances": [1, 2, 3]})
        assert v1.status_code == 200, v1.text
        assert v1.json()["predictions"] == [2, 4, 6]
        ts = http.post("/predictions/echo", json={"x": 5})
        assert ts.status_code == 200, ts.text
        assert ts.json() == {"y": 10}
        missing = http.post("/nope", json={})
        assert missing.status_code == 404
        assert "error" in missing.json()


def test_v2_with_tritonclient(kiln_on_ray: RayCluster) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{kiln_on_ray.http_port}")
    x = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 1.0]], dtype=np.float32)
    inputs = [httpclient.InferInput("x", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    result = client.infer("lin", inputs, outputs=[httpclient.InferRequestedOutput("y")])
    np.testing.assert_allclose(result.as_numpy("y"), x @ W, rtol=1e-6)
    client.close()


def test_replicas_answer_from_both_nodes(kiln_on_ray: RayCluster) -> None:
    def one(i: int) -> str:
        with _client(kiln_on_ray) as http:
            r = http.post("/echo", json={"sleep": 0.2})
            assert r.status_code == 200, r.text
            return r.headers["x-kiln-node"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        nodes = set(pool.map(one, range(24)))
    assert nodes == {kiln_on_ray.head_node, kiln_on_ray.second_node}


def test_a_handler_cannot_reach_the_cluster(kiln_on_ray: RayCluster) -> None:
    with _client(kiln_on_ray) as http:
        r = http.post("/echo", json={"probe": "ray"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["ray"] == "refused", answer
    assert answer["env"] == []  # no RAY_* variable (address, token, session dir) in the worker
    assert answer["tmp_ray"] is False  # the sandbox's own /tmp: no session folder


def test_a_killed_worker_fails_fast_and_comes_back(kiln_on_ray: RayCluster) -> None:
    handle = serve.get_deployment_handle("echo", app_name="kiln")
    info = handle.info.remote().result(timeout_s=10)
    pid = info["pid"]
    assert pid and info["sandboxed"] is True  # the worker runs in the sandbox (bubblewrap)

    def during(i: int) -> tuple[int, float]:
        started = time.monotonic()
        with _client(kiln_on_ray) as http:
            r = http.post("/echo", json={"sleep": 0.3} if i % 2 else {"x": i})
        return r.status_code, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(during, i) for i in range(6)]
        time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        later = [pool.submit(during, i) for i in range(6, 18)]
        outcomes = [f.result(timeout=40) for f in running + later]
    assert {status for status, _ in outcomes} <= {200, 503}, outcomes
    assert max(seconds for _, seconds in outcomes) < 25, outcomes  # never hangs
    # Serve's health check sees the dead worker and replaces the replica.
    deadline = time.monotonic() + 60
    pids: set[int] = set()
    while time.monotonic() < deadline:
        pids = {handle.info.remote().result(timeout_s=10)["pid"] for _ in range(6)}
        if pid not in pids and len(pids) == 2:
            break
        time.sleep(1)
    assert pid not in pids and len(pids) == 2, pids
    with _client(kiln_on_ray) as http:
        statuses = [http.post("/echo", json={"x": i}).status_code for i in range(10)]
    assert statuses == [200] * 10
