"""Rolling updates drain: the old version answers everything it queued before it stops.

An API with 2 replicas under 8 client threads, redeployed 3 times in a row on
`kiln server`, for a Python handler and an ONNX model: not one request fails
(before, 1-4 per deploy waited 30 s for the old version's stopped dispatcher and
got 503 "shutting down").
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from daemon import Daemon
from support import build_linear_onnx, write

HANDLER = """
import time

VERSION = "{version}"


def predict(payload, context):
    time.sleep(0.05)
    return {{"version": VERSION, "echo": payload}}
"""

CONFIG = """
- kind: deployment
  name: drain
- kind: api
  name: steady
  python: {handler: handler.py}
  compute: {min_replicas: 2, init_replicas: 2, max_replicas: 2}
"""

ONNX_CONFIG = """
- kind: deployment
  name: drain
- kind: api
  name: steady
  onnx: {model: model.onnx}
  compute: {min_replicas: 2, init_replicas: 2, max_replicas: 2}
"""

CLIENTS = 8
MAX_CALLS = 5000  # per client: the loop is bounded even if stopping fails


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "home")
    d.start()
    yield d
    d.stop()


def revision(folder: Path, version: str, runtime: str) -> Path:
    """Version vN answers N: the Python handler says so, the ONNX model is y = N * x."""
    if runtime == "python":
        write(folder / "handler.py", HANDLER.format(version=version))
        write(folder / "kiln.yaml", CONFIG)
    else:
        build_linear_onnx(folder / "model.onnx", np.full((1, 1), float(version[1:])))
        write(folder / "kiln.yaml", ONNX_CONFIG)
    return folder


def request_body(runtime: str, index: int, call: int) -> list:
    if runtime == "python":
        return [index, call]
    return [[float(index * 10_000 + call + 1)]]  # one row of x [N, 1], never 0


def answered_version(runtime: str, answer: object, sent: list) -> str:
    """Which version answered, checking that the answer is this request's own."""
    if runtime == "python":
        assert isinstance(answer, dict) and answer["echo"] == sent
        return str(answer["version"])
    assert isinstance(answer, list) and len(answer) == 1, answer
    ratio = answer[0][0] / sent[0][0]
    assert abs(ratio - round(ratio)) < 1e-6, (answer, sent)
    return f"v{round(ratio)}"


def deploy(d: Daemon, folder: Path) -> None:
    done = d.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is live" in done.stdout, done.stdout


@pytest.mark.parametrize("runtime", ["python", "onnx"])
def test_three_rolling_deploys_under_eight_clients_fail_no_request(
    daemon: Daemon, tmp_path: Path, runtime: str
) -> None:
    folder = revision(tmp_path / "drain", "v1", runtime)
    deploy(daemon, folder)
    url = f"{daemon.url}/drain/steady"
    seen: Counter[str] = Counter()
    failures: list[str] = []
    slowest = [0.0]
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=60, headers=daemon.auth) as http:
            for call in range(MAX_CALLS):
                if stop.is_set():
                    return
                started = time.monotonic()
                sent = request_body(runtime, index, call)
                try:
                    response = http.post(url, json=sent)
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                slowest[0] = max(slowest[0], time.monotonic() - started)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                    continue
                seen[answered_version(runtime, response.json(), sent)] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        for version in ("v2", "v3", "v4"):
            deploy(daemon, revision(folder, version, runtime))
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert all(seen[v] > 0 for v in ("v1", "v2", "v3", "v4")), seen
    assert slowest[0] < 10, slowest  # nothing waited for a stopped dispatcher (30 s)
    last = request_body(runtime, 0, 0)
    answer = httpx.post(url, json=last, headers=daemon.auth).json()
    assert answered_version(runtime, answer, last) == "v4"
