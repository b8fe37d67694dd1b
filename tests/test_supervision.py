"""Supervision against a real `kiln serve`: restart backoff, load failures that cannot
pass, and SIGTERM to the whole process group (systemd's default)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support import KilnServer, write

from kiln.sandbox import probe

HANDLERS = """
import os
import time


class Crash:
    def predict(self, payload, context):
        os._exit(1)


class Slow:
    def predict(self, payload, context):
        time.sleep(payload)
        return {"slept": payload, "pid": os.getpid()}
"""


def describe(server: KilnServer, name: str) -> dict:
    return next(a for a in server.client.get("/apis").json()["apis"] if a["name"] == name)


def test_a_worker_that_crashes_on_every_request_is_restarted_with_growing_delays(
    tmp_path: Path,
) -> None:
    write(tmp_path / "h.py", HANDLERS)
    write(tmp_path / "kiln.yaml", "- kind: api\n  name: crash\n  python: {handler: h.py:Crash}\n")
    server = KilnServer(tmp_path, tmp_path / "home")
    stop = threading.Event()
    statuses: list[int] = []

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post("/crash", json=1).status_code)

    reasons: set[str] = set()
    try:
        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            info = describe(server, "crash")
            if info.get("error"):
                reasons.add(info["error"])
            time.sleep(0.1)
        restarts = describe(server, "crash")["replicas"]["restarts"]
        stop.set()
        for thread in threads:
            thread.join(60)
        lines = [r.get("message", "") for r in server.api_log("crash") if "restarting it" in str(r)]
    finally:
        stop.set()
        server.stop()
    # 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of backoff, plus the loads: at most 5 in 6 s, where
    # restarting every ~0.5 s (no backoff after a good load) made about a dozen.
    assert 2 <= restarts <= 5, (restarts, lines)
    assert statuses and set(statuses) <= {503}, set(statuses)
    assert "worker exited with code 1" in reasons, reasons
    delays = [line.split("restarting it in ")[1].split("s ")[0] for line in lines if " in " in line]
    assert delays[:3] == ["0.2", "0.4", "0.8"], lines


def test_a_syntax_error_fails_the_api_at_once_and_other_apis_still_answer(
    tmp_path: Path,
) -> None:
    write(tmp_path / "h.py", HANDLERS)
    write(tmp_path / "bad.py", "class Bad:\n    def predict(self, payload)\n        return 1\n")
    write(
        tmp_path / "kiln.yaml",
        "- kind: api\n  name: bad\n  python: {handler: bad.py:Bad}\n"
        "- kind: api\n  name: slow\n  python: {handler: h.py:Slow}\n",
    )
    server = KilnServer(tmp_path, tmp_path / "home")
    try:
        time.sleep(3)
        attempts = [
            r for r in server.api_log("bad") if "failed to load" in str(r.get("message", ""))
        ]
        info = describe(server, "bad")
        answer = server.client.post("/bad", json=1)
        other = server.client.post("/slow", json=0)
    finally:
        server.stop()
    assert len(attempts) == 1, attempts
    assert "not retried" in attempts[0]["message"]
    assert info["status"] == "failed"
    assert info["replicas"]["restarts"] == 0
    assert info["error"].startswith(f"SyntaxError in {tmp_path / 'bad.py'}, line 2: ")
    assert answer.status_code == 503
    assert answer.json()["error"]["message"].startswith(
        f"API 'bad' failed to load: SyntaxError in {tmp_path / 'bad.py'}, line 2: "
    )
    assert other.status_code == 200 and other.json()["slept"] == 0


@pytest.mark.parametrize("sandboxed", [False, True], ids=["plain", "sandboxed"])
def test_sigterm_to_the_process_group_drains_every_request_in_flight(
    tmp_path: Path, sandboxed: bool
) -> None:
    """systemd stops a service by sending SIGTERM to its whole process group: the
    workers must not die with it, so the server can drain and then stop them."""
    if sandboxed and not probe().available:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the sandbox: " + "; ".join(probe().problems))
        pytest.skip("the sandbox is not available here: " + "; ".join(probe().problems))
    project = tmp_path / "project"  # the home beside the project, not in it
    write(project / "h.py", HANDLERS)
    write(
        project / "kiln.yaml",
        "- kind: api\n  name: slow\n  python: {handler: h.py:Slow}\n"
        "  compute: {min_replicas: 2, max_replicas: 2}\n",
    )
    server = KilnServer(project, tmp_path / "home", ["--sandbox"] if sandboxed else [])
    with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.post, "/slow", json=1.0) for _ in range(6)]
        time.sleep(0.4)
        os.killpg(server.proc.pid, signal.SIGTERM)  # KilnServer starts it in its own group
        results = [f.result() for f in futures]
        code = server.stop()
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
    assert all(r.json()["slept"] == 1.0 for r in results)
    assert code == 0, server.output()[-2000:]
