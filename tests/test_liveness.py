"""Liveness from the first instant, readiness once loaded, and requests that wait for a load.

`kiln serve` and `kiln server` answer `/healthz` and `/v2/health/live` while an API
still loads (a Kubernetes liveness probe must not kill a server that is loading
its models); `/ping` (TorchServe: 500 Unhealthy), `/v2/health/ready` and V2 model
ready (503) say "not ready" until it has loaded; a predict sent meanwhile waits
for the load (`serving.startup_timeout_s`) and is never 404; past that it is 503
with Retry-After. The API's load waits for a file the test writes, so the test,
not the clock, decides when loading ends (at most 20 s).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon import Daemon
from support import KILN, write

HANDLER = """
import os
import time


class Handler:
    def load(self, model_dir, config):
        gate = os.environ["LOAD_GATE"]
        deadline = time.monotonic() + 20
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)

    def predict(self, payload, context):
        return {"loaded": True, "echo": payload}
"""


def project(folder: Path, gate: Path, name: str, startup_timeout_s: int = 60) -> Path:
    """An API whose load waits for `gate` to exist (or 20 s)."""
    write(folder / "handler.py", HANDLER)
    write(
        folder / "kiln.yaml",
        f"- kind: api\n  name: {name}\n  python:\n    handler: handler.py:Handler\n"
        f"  env:\n    LOAD_GATE: {gate}\n"
        f"  serving:\n    startup_timeout_s: {startup_timeout_s}\n",
    )
    return folder


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Serve:
    """`kiln serve` on known ports, returned at once (support.KilnServer waits for the load)."""

    def __init__(self, folder: Path, home: Path) -> None:
        port, management, metrics = free_ports(3)
        self.url = f"http://127.0.0.1:{port}"
        self.log = home / "serve.out"
        home.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*KILN, "serve", str(folder), "--port", str(port), "--management-port",
                 str(management), "--metrics-port", str(metrics), "--home", str(home / "state")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "KILN_HOME": str(home), "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def first_answer(self, path: str, timeout: float = 30) -> tuple[httpx.Response, float]:
        """The first answer on `path`, and the seconds since the process started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                response = self.client.get(path, timeout=2)
                return response, time.monotonic() - self.started
            except httpx.TransportError:
                time.sleep(0.02)
        raise AssertionError(f"no answer on {path} within {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Call(threading.Thread):
    """One POST in the background; `response` once answered."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers or {}
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url, json={"x": 1}, headers=self.headers, timeout=60)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def assert_loading(client: Any, base: str, model: str) -> None:
    """Alive, not ready: what a probe sees while `model` loads."""
    assert client.get(f"{base}/healthz").status_code == 200
    live = client.get(f"{base}/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}
    ping = client.get(f"{base}/ping")
    assert ping.status_code == 500 and ping.json() == {"status": "Unhealthy"}
    ready = client.get(f"{base}/v2/health/ready")
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    model_ready = client.get(f"{base}/v2/models/{model}/ready")
    assert model_ready.status_code == 503 and model_ready.json()["ready"] is False


def assert_loaded(client: Any, base: str, model: str) -> None:
    ping = client.get(f"{base}/ping")
    assert ping.status_code == 200 and ping.json() == {"status": "Healthy"}
    assert client.get(f"{base}/v2/health/ready").status_code == 200
    assert client.get(f"{base}/v2/models/{model}/ready").status_code == 200


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate"
    yield path
    path.touch()  # let any load still waiting finish, so the server stops promptly


def test_kiln_serve_is_alive_at_once_and_ready_once_loaded(tmp_path: Path, gate: Path) -> None:
    serve = Serve(project(tmp_path / "p", gate, "slow"), tmp_path / "home")
    try:
        healthz, after = serve.first_answer("/healthz")
        assert healthz.status_code == 200 and healthz.json() == {"status": "ok"}
        assert after < 10, f"the port answered only {after:.1f}s after the start"
        assert_loading(serve.client, "", "slow")
        call = Call(f"{serve.url}/slow")
        time.sleep(1.0)
        assert call.response is None and call.error is None  # waiting for the load, not 404
        assert_loading(serve.client, "", "slow")
        gate.touch()
        call.join(30)
        assert call.error is None and call.response is not None
        assert call.response.status_code == 200, call.response.text
        assert call.response.json() == {"loaded": True, "echo": {"x": 1}}
        assert_loaded(serve.client, "", "slow")
    finally:
        serve.stop()


def test_kiln_serve_request_past_startup_timeout_is_503(tmp_path: Path, gate: Path) -> None:
    serve = Serve(project(tmp_path / "p", gate, "stuck", startup_timeout_s=2), tmp_path / "home")
    try:
        serve.first_answer("/healthz")
        listed = serve.client.get("/apis").json()["apis"]
        assert [(a["name"], a["status"]) for a in listed] == [("stuck", "loading")]
        started = time.monotonic()
        response = serve.client.post("/stuck", json={"x": 1})
        took = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "Unavailable"
        assert 0.5 < took < 15  # it waited for the load, bounded by startup_timeout_s
    finally:
        serve.stop()


def test_a_stop_while_loading_answers_the_waiting_request_and_exits(
    tmp_path: Path, gate: Path
) -> None:
    serve = Serve(project(tmp_path / "p", gate, "slow"), tmp_path / "home")
    try:
        serve.first_answer("/healthz")
        call = Call(f"{serve.url}/slow")
        time.sleep(1.0)
        assert call.response is None  # waiting for the load
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(60)
        took = time.monotonic() - started
        call.join(10)
        assert serve.proc.returncode == 0, serve.log.read_text()
        assert took < 15, f"stopping took {took:.1f}s (the drain grace is 30 s)"
        assert call.response is not None and call.response.status_code == 503
        assert "shutting down" in call.response.json()["error"]["message"]
        assert int(call.response.headers["retry-after"]) >= 1
    finally:
        serve.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "home")
    d.start()
    yield d
    d.stop()


def test_a_first_deploy_waits_for_its_load_not_404(
    daemon: Daemon, tmp_path: Path, gate: Path
) -> None:
    base = daemon.url
    done = daemon.kiln("deploy", str(project(tmp_path / "slow", gate, "slow")), "--no-wait")
    assert done.returncode == 0, done.stdout + done.stderr
    call = Call(f"{base}/slow", daemon.auth)
    time.sleep(1.0)
    assert call.response is None and call.error is None  # waiting for the load, not 404
    assert_loading(daemon.http, base, "slow")
    gate.touch()
    call.join(30)
    assert call.error is None and call.response is not None
    assert call.response.status_code == 200, call.response.text
    assert call.response.json() == {"loaded": True, "echo": {"x": 1}}
    daemon.wait_until(lambda: daemon.apis()["slow"]["status"] == "live", what="slow live")
    assert_loaded(daemon.http, base, "slow")


def test_a_first_deploy_past_startup_timeout_is_503_then_gone(
    daemon: Daemon, tmp_path: Path, gate: Path
) -> None:
    folder = project(tmp_path / "stuck", gate, "stuck", startup_timeout_s=2)
    done = daemon.kiln("deploy", str(folder), "--no-wait")
    assert done.returncode == 0, done.stdout + done.stderr
    response = daemon.http.post(f"{daemon.url}/stuck", json={"x": 1})
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    # The revision failed to load: nothing of it stays routed, as before the deploy.
    daemon.wait_until(
        lambda: daemon.http.post(f"{daemon.url}/stuck", json={}).status_code == 404,
        what="the failed first revision to leave the routing",
    )
    assert daemon.http.get(f"{daemon.url}/ping").json() == {"status": "Healthy"}
