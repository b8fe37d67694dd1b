"""Batching, replicas, supervision, deadlines and backpressure, against a real server."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from support import KilnServer, build_linear_onnx, write

HANDLERS = """
import os
import time

import kiln


class Batched:
    def load(self, model_dir, config):
        self.delay = config.get("delay", 0)

    def predict_batch(self, payloads, contexts):
        time.sleep(self.delay)
        out = []
        for p in payloads:
            if p == "bad":
                out.append(kiln.InvalidInput("item 'bad' is not a number"))
            elif p == "boom":
                out.append(RuntimeError("exploded on this item"))
            else:
                out.append({"double": p * 2, "batch": len(payloads), "pid": os.getpid()})
        return out

    def predict(self, payload, context):
        return self.predict_batch([payload], [context])[0]


class WrongLength:
    def predict_batch(self, payloads, contexts):
        if "slow" in payloads:
            time.sleep(0.5)
        if any(p == "short" for p in payloads):
            return payloads[:-1]
        if any(p == "raise" for p in payloads):
            raise ValueError("the whole batch failed")
        return payloads

    def predict(self, payload, context):
        if payload == "slow":
            time.sleep(0.5)
        return payload


class Ahead:
    def predict_batch(self, payloads, contexts):
        if "slow" in payloads:
            time.sleep(3)
        return [{"echo": p, "batch": len(payloads)} for p in payloads]

    def predict(self, payload, context):
        return self.predict_batch([payload], [context])[0]


class Slow:
    def predict(self, payload, context):
        if isinstance(payload, dict) and "alloc_mb" in payload:
            blob = bytearray(payload["alloc_mb"] * 2**20)
            time.sleep(5)
            return len(blob)
        time.sleep(payload)
        return {"slept": payload, "pid": os.getpid()}


class SlowLoad:
    def load(self, model_dir, config):
        time.sleep(2.0)

    def predict(self, payload, context):
        return "loaded"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dp")
    write(root / "h.py", HANDLERS)
    build_linear_onnx(root / "lin.onnx", np.arange(8, dtype=np.float32).reshape(4, 2))
    write(
        root / "kiln.yaml",
        """
- kind: api
  name: batched
  python: {handler: h.py:Batched}
  config: {delay: 0.05}
  batching: {max_batch_size: 16, max_batch_delay_ms: 20}
- kind: api
  name: wrong-length
  python: {handler: h.py:WrongLength}
  batching: {max_batch_size: 8, max_batch_delay_ms: 200}
- kind: api
  name: ahead
  python: {handler: h.py:Ahead}
  batching: {max_batch_size: 2, max_batch_delay_ms: 50}
- kind: api
  name: tensors
  onnx: {model: lin.onnx}
  batching: {max_batch_size: 32, max_batch_delay_ms: 20}
- kind: api
  name: pair
  python: {handler: h.py:Slow}
  compute: {min_replicas: 2}
- kind: api
  name: tight
  python: {handler: h.py:Slow}
  serving: {response_timeout_s: 1, max_queue_size: 3}
- kind: api
  name: slow-load
  python: {handler: h.py:SlowLoad}
  serving: {response_timeout_s: 0.5, startup_timeout_s: 30}
- kind: api
  name: hungry
  python: {handler: h.py:Slow}
  compute: {mem: 150Mi}
""",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def parallel(
    server: KilnServer, path: str, bodies: list, timeout: float = 30
) -> list[httpx.Response]:
    with httpx.Client(
        base_url=server.url, timeout=timeout, limits=httpx.Limits(max_connections=100)
    ) as client:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda b: client.post(path, json=b), bodies))


def describe(server: KilnServer, name: str) -> dict:
    return next(a for a in server.client.get("/apis").json()["apis"] if a["name"] == name)


def test_64_concurrent_clients_each_get_their_own_answer_in_batches(server: KilnServer) -> None:
    responses = parallel(server, "/batched", list(range(64)))
    assert [r.json()["double"] for r in responses] == [i * 2 for i in range(64)]
    sizes = [r.json()["batch"] for r in responses]
    assert max(sizes) > 1, "requests arriving together must share model calls"
    assert max(sizes) <= 16
    assert describe(server, "batched")["stats"]["max_batch"] > 1


def test_tensor_batches_are_stacked_and_split_back(server: KilnServer) -> None:
    bodies = [[i, 0, 0, 0] if i % 2 else [[i, 1, 0, 0], [0, 0, 0, i]] for i in range(48)]
    responses = parallel(server, "/tensors", bodies)
    weights = np.arange(8, dtype=np.float32).reshape(4, 2)
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200
        np.testing.assert_allclose(response.json(), np.asarray(body, np.float32) @ weights)
    assert describe(server, "tensors")["stats"]["max_batch"] > 1


def test_one_bad_item_fails_alone_inside_a_batch(server: KilnServer) -> None:
    bodies = [1, "bad", 2, "boom", 3] * 4
    responses = parallel(server, "/batched", bodies)
    for body, response in zip(bodies, responses, strict=True):
        if body == "bad":
            assert response.status_code == 400
            assert response.json()["error"]["message"] == "item 'bad' is not a number"
        elif body == "boom":
            assert response.status_code == 500
            assert response.json()["error"]["message"] == "RuntimeError: exploded on this item"
        else:
            assert response.json()["double"] == body * 2
    tensor_bodies = [[1, 2, 3, 4], [1, 2, 3], [0, 0, 0, 1]] * 5
    tensor_responses = parallel(server, "/tensors", tensor_bodies)
    assert [r.status_code for r in tensor_responses] == [200, 400, 200] * 5


def test_predict_batch_wrong_length_or_raising_fails_that_batch_only(server: KilnServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with ThreadPoolExecutor(4) as pool:
            busy = pool.submit(client.post, "/wrong-length", json="slow")
            time.sleep(0.1)  # the replica is busy: the next two queue and leave as one batch
            short = pool.submit(client.post, "/wrong-length", json="short")
            partner = pool.submit(client.post, "/wrong-length", json="ok")
            busy, short, partner = busy.result(), short.result(), partner.result()
    assert busy.json() == "slow"
    assert short.status_code == 500 and partner.status_code == 500
    assert "returned 1 results for 2 requests" in short.json()["error"]["message"]
    alone = server.client.post("/wrong-length", json="fine")
    assert alone.json() == "fine"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with ThreadPoolExecutor(4) as pool:
            busy = pool.submit(client.post, "/wrong-length", json="slow")
            time.sleep(0.1)
            raised = pool.submit(client.post, "/wrong-length", json="raise")
            partner = pool.submit(client.post, "/wrong-length", json="ok")
            busy, raised, partner = busy.result(), raised.result(), partner.result()
    assert busy.json() == "slow", "a batch that raises fails no other batch"
    assert raised.status_code == 500 and "the whole batch failed" in raised.text
    assert partner.status_code == 500
    assert server.client.post("/wrong-length", json="after").json() == "after"


def test_a_full_batch_goes_ahead_to_a_busy_replica_a_partial_one_waits(
    server: KilnServer,
) -> None:
    def admitted(n: int) -> None:  # wait until the server has taken n requests in all
        deadline = time.monotonic() + 10
        while describe(server, "ahead")["stats"]["requests"] < n:
            assert time.monotonic() < deadline, "the server did not take the request"
            time.sleep(0.02)

    start = describe(server, "ahead")["stats"]["requests"]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with ThreadPoolExecutor(4) as pool:
            slow = pool.submit(client.post, "/ahead", json="slow")  # busy for 3 s
            admitted(start + 1)
            full = [pool.submit(client.post, "/ahead", json=f"full-{i}") for i in range(2)]
            admitted(start + 3)
            partial = pool.submit(client.post, "/ahead", json="partial")
            admitted(start + 4)
            # The two that make a full batch were sent to the worker already (they queue
            # there, behind "slow"); the lone third one waits here, where it can still grow.
            queued = describe(server, "ahead")["queue"]["length"]
            answers = [f.result().json() for f in (slow, *full, partial)]
    assert queued == 1
    assert answers[0] == {"echo": "slow", "batch": 1}
    assert sorted(a["echo"] for a in answers[1:3]) == ["full-0", "full-1"]
    assert [a["batch"] for a in answers[1:3]] == [2, 2]
    assert answers[3] == {"echo": "partial", "batch": 1}


def test_two_replicas_share_load_and_a_killed_one_fails_only_what_it_held(
    server: KilnServer,
) -> None:
    pids = {r.json()["pid"] for r in parallel(server, "/pair", [0.3] * 4)}
    assert len(pids) == 2, "min_replicas: 2 starts two worker processes, both used"
    with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.post, "/pair", json=1.0) for _ in range(2)]
        time.sleep(0.4)
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 503], "only the request held by the killed replica fails"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and describe(server, "pair")["replicas"]["ready"] < 2:
        time.sleep(0.1)
    assert describe(server, "pair")["replicas"]["ready"] == 2
    new_pids = {r.json()["pid"] for r in parallel(server, "/pair", [0.3] * 4)}
    assert len(new_pids) == 2 and victim not in new_pids


def test_slow_load_is_not_killed_by_the_response_timeout(server: KilnServer) -> None:
    response = server.client.post("/slow-load", json=None)
    assert response.status_code == 200 and response.json() == "loaded"


def test_deadline_counts_queue_time_and_is_a_504(server: KilnServer) -> None:
    responses = parallel(server, "/tight", [0.6, 0.6, 0.6])
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200
    assert 504 in statuses, "a request that waited 0.6 s in the queue cannot also run 0.6 s"
    timeout = next(r for r in responses if r.status_code == 504)
    assert timeout.json()["error"]["type"] == "Timeout"
    # The replica is not left wedged: the next request is served.
    assert server.client.post("/tight", json=0).json()["slept"] == 0


def test_a_stuck_request_gets_504_and_its_replica_is_replaced(server: KilnServer) -> None:
    before = server.client.post("/tight", json=0).json()["pid"]
    stuck = server.client.post("/tight", json=5)
    assert stuck.status_code == 504
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = server.client.post("/tight", json=0)
        if after.status_code == 200:
            break
        time.sleep(0.1)
    assert after.json()["pid"] != before


def test_full_queue_answers_503_with_retry_after_at_once(server: KilnServer) -> None:
    started = time.monotonic()
    responses = parallel(server, "/tight", [0.25] * 12)
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, statuses
    assert all(r.headers["retry-after"] == "1" for r in rejected)
    assert "max_queue_size" in rejected[0].json()["error"]["message"]
    assert statuses.count(200) >= 3
    assert time.monotonic() - started < 5
    info = describe(server, "tight")
    assert info["queue"]["max"] == 3 and info["stats"]["rejected"] >= len(rejected)


def test_memory_watchdog_restarts_a_replica_over_compute_mem(server: KilnServer) -> None:
    response = server.client.post("/hungry", json={"alloc_mb": 400})
    assert response.status_code == 503
    assert "compute.mem" in response.json()["error"]["message"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        again = server.client.post("/hungry", json=0)
        if again.status_code == 200:
            break
        time.sleep(0.1)
    assert again.json()["slept"] == 0


def test_sigterm_drains_every_in_flight_and_queued_request(tmp_path: Path) -> None:
    write(tmp_path / "h.py", HANDLERS)
    write(tmp_path / "kiln.yaml", "- kind: api\n  name: slow\n  python: {handler: h.py:Slow}\n")
    server = KilnServer(tmp_path, tmp_path / "home")
    with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.post, "/slow", json=0.3) for _ in range(6)]
        time.sleep(0.3)
        code = server.stop(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 6
    assert code == 0
