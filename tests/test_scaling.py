"""Autoscaling end to end: up under load, down to zero when idle, and a cold start."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from support import KilnServer, write

HANDLER = """
import os
import time


def predict(payload, context):
    time.sleep(payload)
    return os.getpid()
"""


def describe(server: KilnServer) -> dict:
    return server.client.get("/apis").json()["apis"][0]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_scales_up_under_load_then_to_zero_and_cold_starts(tmp_path: Path) -> None:
    write(tmp_path / "h.py", HANDLER)
    write(
        tmp_path / "kiln.yaml",
        """
- kind: api
  name: elastic
  python: {handler: h.py}
  compute: {min_replicas: 0, init_replicas: 1, max_replicas: 2, cpu: 0.5}
  autoscaling:
    target_replica_concurrency: 1
    window: 10s
    upscale_stabilization_period: 0s
    downscale_stabilization_period: 0s
    idle_timeout: 3s
    cold_start_timeout: 30s
""",
    )
    server = KilnServer(tmp_path, tmp_path / "home")
    try:
        assert describe(server)["replicas"]["requested"] == 1
        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.post, "/elastic", json=0.5) for _ in range(24)]
            grew = wait_for(lambda: describe(server)["replicas"]["ready"] == 2, 20)
            pids = {f.result().json() for f in futures}
        assert grew, describe(server)
        assert len(pids) == 2, "both replicas answered"
        events = describe(server)["scaling_events"]
        assert (
            events[0]["from"] == 1 and events[0]["to"] == 2 and "in flight" in events[0]["reason"]
        )

        assert wait_for(lambda: describe(server)["status"] == "scaled to zero", 30), describe(
            server
        )
        assert describe(server)["replicas"]["requested"] == 0
        assert "idle_timeout" in describe(server)["scaling_events"][-1]["reason"]
        # The status flips when the replicas leave the pool; their processes exit just after.
        assert wait_for(lambda: not server.worker_pids(), 10), "no worker process runs at zero"

        started = time.monotonic()
        cold = server.client.post("/elastic", json=0)
        assert cold.status_code == 200 and isinstance(cold.json(), int)
        assert time.monotonic() - started < 30
        assert describe(server)["replicas"]["ready"] == 1
    finally:
        server.stop()


SLOW_LOAD = """
import time

time.sleep(2.5)  # a model that loads for longer than the API's idle_timeout


def predict(payload, context):
    return payload
"""


def test_a_load_longer_than_idle_timeout_is_not_counted_as_idle(tmp_path: Path) -> None:
    write(tmp_path / "slow.py", SLOW_LOAD)
    write(
        tmp_path / "kiln.yaml",
        """
- kind: api
  name: sleepy
  python: {handler: slow.py}
  compute: {min_replicas: 0, init_replicas: 0, max_replicas: 1}
  autoscaling: {idle_timeout: 1s, downscale_stabilization_period: 0s, cold_start_timeout: 60s}
""",
    )
    server = KilnServer(tmp_path, tmp_path / "home")
    try:
        assert describe(server)["status"] == "scaled to zero"
        cold = server.client.post("/sleepy", json="wake", timeout=60)
        answered_at = time.time()
        assert cold.status_code == 200 and cold.json() == "wake"
        assert wait_for(lambda: describe(server)["status"] == "scaled to zero", 30)
        to_zero = [e for e in describe(server)["scaling_events"] if e["to"] == 0]
        # Idle time counts from the answer, not from the request's arrival before the load:
        # otherwise the first autoscaler tick after the answer would scale straight to zero.
        assert to_zero and to_zero[-1]["time"] - answered_at >= 0.8, (to_zero, answered_at)
    finally:
        server.stop()
