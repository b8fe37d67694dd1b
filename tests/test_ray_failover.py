"""A Ray node dies under load: its replicas come back on the head, requests fail fast.

An API of 2 replicas spread over both nodes of the session's cluster
(tests/ray_cluster.py) serves a steady stream of requests while the second
node fails: its raylet is SIGKILLed, then the processes the raylet started (the
node's workers: its Serve proxy and replica actors, their Kiln workers), all of
them this session's cluster's own (never `ray stop`). A real node failure takes
those with it; on one machine an orphaned proxy would keep its share of the
HTTP port (Serve's proxies bind it with SO_REUSEPORT) and answer Serve's own
plain 500 for as long as it lingers (about a minute, measured), which is not
what a client of a dead machine sees. Requests that hit the dead replica get 503 at once,
never hang; within a bounded time every request is 200 again, answered by
replicas on the head. The fixture then removes what is left of the dead node
and adds a fresh second node, so later tests still have two nodes.

The ingress is pinned to the head here: with one ingress replica (stage A) the
node that runs it is a single point of failure, and this test is about replicas.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_cluster import RayCluster, kill_node  # the session fixture `ray_cluster` is in conftest.py

serve = pytest.importorskip("ray.serve")

KILN_YAML = """
- kind: api
  name: echo
  python: {handler: model.py:Model}
  compute: {min_replicas: 2, max_replicas: 2, cpu: 250m}
  serving: {response_timeout_s: 10}
"""

MODEL_PY = """
import time


class Model:
    def predict(self, payload, context):
        time.sleep(payload.get("sleep", 0))
        return {"y": payload["x"] * 2}
"""


REQUEST_TIMEOUT_S = 10.0  # a request that takes longer counts as hanging
RECOVERY_S = 60.0


def _app(root: Path) -> Any:
    """build_app's application, with the ingress pinned to the head node."""
    from kiln.backends.ray.ingress import KilnIngress
    from kiln.backends.ray.options import deployment_name, deployment_options, ingress_options
    from kiln.backends.ray.replica import KilnReplica
    from kiln.config import load_project

    project = load_project(str(root), None)
    handles = {}
    for api in project.apis:
        name = deployment_name(api)
        handles[name] = KilnReplica.options(name=name, **deployment_options(api)).bind(
            str(root), None, api.name, api.version, "auto"
        )
    options = ingress_options()
    options["ray_actor_options"] = {**options["ray_actor_options"], "resources": {"head": 0.01}}
    return KilnIngress.options(**options).bind(handles, str(root), None)


@pytest.fixture()
def failover_app(ray_cluster: RayCluster, tmp_path: Path) -> Any:
    (tmp_path / "kiln.yaml").write_text(KILN_YAML)
    (tmp_path / "model.py").write_text(MODEL_PY)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(serve.run, _app(tmp_path), name="failover", route_prefix="/").result(
            timeout=120
        )
    yield ray_cluster
    serve.delete("failover")


def _post(cluster: RayCluster, x: int) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        with httpx.Client(base_url=cluster.url, timeout=REQUEST_TIMEOUT_S + 5) as http:
            r = http.post("/echo", json={"x": x, "sleep": 0.05})
    except httpx.HTTPError as exc:
        return -1, type(exc).__name__, time.monotonic() - started
    node = r.headers.get("x-kiln-node", "")
    if r.status_code == 200:
        assert r.json() == {"y": 2 * x}
    elif r.status_code != 503:
        node = r.text[:300]  # shown by the assertion
    return r.status_code, node, time.monotonic() - started


def test_killing_a_nodes_raylet_moves_replicas_to_the_head(failover_app: RayCluster) -> None:
    cluster = failover_app
    # Both replicas answer, one per node (Serve spreads replicas over nodes).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda i: _post(cluster, i), range(32)))
    assert {s for s, _, _ in first} == {200}, first
    assert {n for _, n, _ in first} == {cluster.head_node, cluster.second_node}, first

    dead = cluster.second_node_object()
    raylets = dead.all_processes["raylet"]
    assert len(raylets) == 1
    raylet_pid = raylets[0].process.pid

    outcomes: list[tuple[float, int, str, float]] = []
    stop = threading.Event()
    killed_at = 0.0

    def load(worker: int) -> None:
        i = worker * 100_000
        while not stop.is_set():
            i += 1
            status, node, seconds = _post(cluster, i)
            outcomes.append((time.monotonic(), status, node, seconds))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(load, w) for w in range(6)]
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            kill_node(raylet_pid)
            # Until every request in a 3 s window is a 200 from the head, bounded.
            deadline = killed_at + RECOVERY_S
            recovered_at = None
            while time.monotonic() < deadline:
                time.sleep(1.0)
                now = time.monotonic()
                window = [o for o in outcomes if o[0] > now - 3.0]
                if window and all(s == 200 and n == cluster.head_node for _, s, n, _ in window):
                    recovered_at = now
                    break
        finally:
            stop.set()
            for f in running:
                f.result(timeout=REQUEST_TIMEOUT_S + 10)
    try:
        after = [o for o in outcomes if o[0] > killed_at]
        # The dead node's proxy drops the connections it held (what a client of a dead
        # machine sees); a request sent later never fails another way than 503.
        cut = [o for o in after if o[1] == -1 and o[0] - o[3] < killed_at + 0.5]
        odd = [o for o in after if o[1] not in (200, 503) and o not in cut]
        assert not odd, odd[:5]  # no 500, no later connection error
        slow = [
            (round(t - sec - killed_at, 2), st, n[:12], round(sec, 2))
            for t, st, n, sec in after
            if sec >= REQUEST_TIMEOUT_S
        ]
        assert not slow, f"requests hung (sent s after the kill, status, node, s): {slow}"
        assert recovered_at is not None, (
            f"not all 200 from the head within {RECOVERY_S:g}s: {after[-12:]}"
        )
        # Answers kept coming while the node was down: the head's replica never stopped.
        assert sum(1 for _, s, _, _ in after if s == 200) > 0.5 * len(after), after[-12:]
        # Both replicas now live on the head.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            last = list(pool.map(lambda i: _post(cluster, i), range(16)))
        assert {(s, n) for s, n, _ in last} == {(200, cluster.head_node)}, last
        status = serve.status().applications["failover"].deployments["echo"]
        assert status.status == "HEALTHY", status
        assert status.replica_states.get("RUNNING") == 2, status.replica_states
        print(
            f"failover: {len(after)} requests after the kill, "
            f"{sum(1 for _, s, _, _ in after if s == 503)} x 503, {len(cut)} cut by the proxy, "
            f"all 200 on the head {recovered_at - killed_at:.1f}s after the kill"
        )
    finally:
        cluster.replace_second_node(dead)
