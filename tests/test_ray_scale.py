"""Scale to zero, cold start and streaming on the session's Ray cluster.

An API with `min_replicas: 0` (and `init_replicas: 0`) stays at zero replicas
after its deployment: starting the ingress no longer asks it for its signature
(which made Serve cold-start it for nothing). A request wakes it up (it waits
for the cold start and gets 200); idle, it goes back to zero; the next request
starts it again. A streaming handler's chunks come through the ingress and the
replica's `stream` generator in order, the first before the handler finishes,
SSE and the errors as on one machine.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from ray_cluster import RayCluster  # the session fixture `ray_cluster` is in conftest.py

serve = pytest.importorskip("ray.serve")

KILN_YAML = """
- kind: api
  name: zero
  python: {handler: model.py:Model}
  compute: {min_replicas: 0, max_replicas: 1, init_replicas: 0, cpu: 250m}
  autoscaling:
    window: 10s
    upscale_stabilization_period: 1s
    downscale_stabilization_period: 1s
    idle_timeout: 2s
- kind: api
  name: slow
  python: {handler: model.py:Slow}
  metadata: {streaming: true}
  compute: {min_replicas: 1, max_replicas: 1, cpu: 250m}
- kind: api
  name: fails-midway
  python: {handler: model.py:FailsMidway}
  metadata: {streaming: true}
  compute: {min_replicas: 1, max_replicas: 1, cpu: 250m}
"""

MODEL_PY = """
import time

import kiln


class Model:
    def predict(self, payload, context):
        return {"y": payload["x"] * 2}


class Slow:
    def predict(self, payload, context):
        for word in ("one ", "two ", "three"):
            yield word
            time.sleep(0.5)


class FailsMidway:
    def predict(self, payload, context):
        yield "ok "
        raise kiln.InvalidInput("stopped halfway: the input ran out")
"""


@pytest.fixture(scope="module")
def scale_app(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from kiln.backends.ray.app import build_app

    root: Path = tmp_path_factory.mktemp("ray-scale")
    (root / "kiln.yaml").write_text(KILN_YAML)
    (root / "model.py").write_text(MODEL_PY)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(
            serve.run, build_app({"project_dir": str(root)}), name="scale", route_prefix="/"
        ).result(timeout=120)
    yield ray_cluster
    serve.delete("scale")


def _running(deployment: str) -> int:
    status = serve.status().applications["scale"].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait_running(deployment: str, count: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _running(deployment) == count:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: {_running(deployment)} replicas, not {count}")


def test_an_api_at_zero_stays_at_zero_and_starts_on_a_request(scale_app: RayCluster) -> None:
    time.sleep(3)  # the ingress has been up for a while: nothing woke the API up
    assert _running("zero") == 0
    with httpx.Client(base_url=scale_app.url, timeout=90) as http:
        started = time.monotonic()
        r = http.post("/zero", json={"x": 21})
        cold = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json() == {"y": 42}
        assert _running("zero") == 1
        # Idle: back to zero (Serve's downscale_to_zero_delay_s from idle_timeout).
        _wait_running("zero", 0, 60)
        started = time.monotonic()
        again = http.post("/zero", json={"x": 5})
        second_cold = time.monotonic() - started
        assert again.status_code == 200, again.text
        assert again.json() == {"y": 10}
    print(f"cold starts on Ray: {cold:.2f}s, then {second_cold:.2f}s")


def test_chunks_stream_through_ray_in_order(scale_app: RayCluster) -> None:
    started = time.monotonic()
    chunks: list[tuple[float, bytes]] = []
    with httpx.Client(base_url=scale_app.url, timeout=30) as http:
        with http.stream("POST", "/predictions/slow", content=b"go") as response:
            assert response.status_code == 200, response.read()
            assert "content-length" not in response.headers
            for chunk in response.iter_raw():
                chunks.append((time.monotonic() - started, chunk))
        total = time.monotonic() - started
        assert b"".join(c for _, c in chunks) == b"one two three"
        assert chunks[0][1] == b"one "
        assert chunks[0][0] < total - 0.7, (chunks, total)  # the first left before the end
        sse = http.post("/predictions/slow", content=b"go", headers={"Accept": "text/event-stream"})
        assert sse.status_code == 200
        assert sse.headers["content-type"] == "text/event-stream"
        assert [line for line in sse.text.splitlines() if line.startswith("data:")] == [
            "data: one ",
            "data: two ",
            "data: three",
            "data: {}",
        ]


def test_a_stream_error_midway_is_an_sse_error_event_on_ray(scale_app: RayCluster) -> None:
    with httpx.Client(base_url=scale_app.url, timeout=30) as http:
        r = http.post(
            "/predictions/fails-midway", content=b"x", headers={"Accept": "text/event-stream"}
        )
    assert r.status_code == 200
    events = r.text.split("\n\n")
    assert events[0] == "data: ok " or events[0].endswith("data: ok "), r.text
    error = next(e for e in events if e.startswith("event: error"))
    assert orjson.loads(error.split("data: ", 1)[1]) == {
        "code": 400,
        "type": "BadRequestException",
        "message": "stopped halfway: the input ran out",
    }
