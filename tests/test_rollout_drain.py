"""Rolling updates drain: the old version answers everything it queued before it stops.

A Python API with 2 replicas under 8 client threads, redeployed 3 times in a row
on `kiln server`: not one request fails (before, 1-4 per deploy waited 30 s for
the old version's stopped dispatcher and got 503 "shutting down").
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from daemon import Daemon
from support import write

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

CLIENTS = 8
MAX_CALLS = 5000  # per client: the loop is bounded even if stopping fails


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "home")
    d.start()
    yield d
    d.stop()


def revision(folder: Path, version: str) -> Path:
    write(folder / "handler.py", HANDLER.format(version=version))
    write(folder / "kiln.yaml", CONFIG)
    return folder


def deploy(d: Daemon, folder: Path) -> None:
    done = d.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is live" in done.stdout, done.stdout


def test_three_rolling_deploys_under_eight_clients_fail_no_request(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = revision(tmp_path / "drain", "v1")
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
                try:
                    response = http.post(url, json=[index, call])
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                slowest[0] = max(slowest[0], time.monotonic() - started)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                    continue
                answer = response.json()
                assert answer["echo"] == [index, call]
                seen[answer["version"]] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        for version in ("v2", "v3", "v4"):
            deploy(daemon, revision(folder, version))
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert all(seen[v] > 0 for v in ("v1", "v2", "v3", "v4")), seen
    assert slowest[0] < 10, slowest  # nothing waited for a stopped dispatcher (30 s)
    assert httpx.post(url, json=0, headers=daemon.auth).json()["version"] == "v4"
