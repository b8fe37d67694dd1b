"""AsyncAPIs (issue 19): submit, poll, results kept and pruned, survival of SIGKILL, webhooks.

Real `kiln serve` processes on free ports with real workers; the webhook receiver
is the test's own HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from support import KILN, KilnServer, write

HANDLER = """
import time
from pathlib import Path

DONE = Path(__file__).parent / "done.txt"


def predict(payload, context):
    if "fail" in payload:
        raise ValueError("cannot score " + payload["fail"])
    time.sleep(payload.get("sleep", 0))
    with open(DONE, "a") as f:
        f.write(payload["tag"] + "\\n")
    return {"tag": payload["tag"], "double": payload.get("x", 0) * 2}
"""


class Receiver:
    """A webhook target: records every POST body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", 0))
                received.append(orjson.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def project(root: Path, hook: str, ttl: str = "7d") -> Path:
    write(root / "handler.py", HANDLER)
    write(
        root / "kiln.yaml",
        f"- kind: AsyncAPI\n  name: scorer\n  python: {{handler: handler.py}}\n"
        f"  async: {{result_ttl: 7d, webhook: '{hook}'}}\n"
        f"- kind: AsyncAPI\n  name: brief\n  python: {{handler: handler.py}}\n"
        f"  async: {{result_ttl: {ttl}}}\n",
    )
    return root


def submit(srv: KilnServer, body: dict[str, Any], api: str = "scorer") -> str:
    r = srv.client.post(f"/{api}", json=body)
    assert r.status_code == 202, r.text
    doc = r.json()
    assert set(doc) == {"id"} and len(doc["id"]) >= 16
    return str(doc["id"])


def wait_done(srv: KilnServer, request_id: str, api: str = "scorer", timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = srv.client.get(f"/{api}/{request_id}")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["status"] in ("in_queue", "in_progress", "completed", "failed")
        if doc["status"] in ("completed", "failed"):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"{request_id} did not finish in {timeout}s: {doc}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[KilnServer]:
    root = project(tmp_path_factory.mktemp("async-project"), receiver.url, ttl="1s")
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def test_post_answers_202_with_an_id_and_polling_reaches_the_result(server: KilnServer) -> None:
    request_id = submit(server, {"tag": "first", "x": 21})
    doc = wait_done(server, request_id)
    assert doc["status"] == "completed", doc
    assert doc["id"] == request_id
    assert doc["result"] == {"tag": "first", "double": 42}
    assert doc["timestamp"].startswith("20") and "T" in doc["timestamp"]
    # The endpoint's GET is still the native status answer.
    assert server.client.get("/scorer").status_code == 200


def test_unknown_id_is_404(server: KilnServer) -> None:
    r = server.client.get("/scorer/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "NotFound"
    assert "no request" in error["message"] and "result_ttl" in error["message"]
    # An id of one AsyncAPI is not readable through another's endpoint.
    request_id = submit(server, {"tag": "own"})
    wait_done(server, request_id)
    assert server.client.get(f"/brief/{request_id}").status_code == 404


def test_failed_handler_gives_status_failed_with_the_error(server: KilnServer) -> None:
    doc = wait_done(server, submit(server, {"tag": "bad", "fail": "this one"}))
    assert doc["status"] == "failed", doc
    assert "cannot score this one" in doc["error"]
    assert "result" not in doc


def test_webhook_to_loopback_is_refused_by_default(server: KilnServer, receiver: Receiver) -> None:
    request_id = submit(server, {"tag": "hooked"})
    wait_done(server, request_id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = server.client.get(f"/scorer/{request_id}").json()
        if doc.get("webhook", {}).get("status") not in (None, "pending", "sending"):
            break
        time.sleep(0.1)
    assert doc["webhook"]["status"] == "refused", doc
    assert "--webhook-allow" in doc["webhook"]["error"]
    assert not [b for b in receiver.bodies if b["id"] == request_id]


def test_results_expire_after_result_ttl_and_are_pruned(server: KilnServer) -> None:
    request_id = submit(server, {"tag": "short-lived"}, api="brief")
    doc = wait_done(server, request_id, api="brief")
    assert doc["result"]["tag"] == "short-lived"
    deadline = time.monotonic() + 15
    rows = -1
    while time.monotonic() < deadline:
        with sqlite3.connect(server.state / "state.db") as db:
            rows = db.execute(
                "select count(*) from async_requests where id = ?", (request_id,)
            ).fetchone()[0]
        if rows == 0:
            break
        time.sleep(0.2)
    assert rows == 0, "the expired result was not pruned"
    assert server.client.get(f"/brief/{request_id}").status_code == 404


def _in_flight_gauge(srv: KilnServer, api: str) -> float:
    assert srv.metrics_url is not None
    text = httpx.get(srv.metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith("kiln_in_flight_requests{") and f'api="{api}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no kiln_in_flight_requests for {api}")


def test_a_backlog_on_one_async_api_neither_starves_another_nor_hides_from_the_autoscaler(
    server: KilnServer,
) -> None:
    # 24 slow requests on `scorer` (one replica: the runner holds 8 per replica, the rest
    # waits in the store's queue), then one on `brief`.
    flood = [submit(server, {"tag": f"flood-{i}", "sleep": 0.25}) for i in range(24)]
    # The waiting requests are the API's load: the in-flight gauge (the autoscaler's
    # signal) counts them, not just the 8 the runner holds.
    deadline = time.monotonic() + 10
    seen = 0.0
    while time.monotonic() < deadline and seen <= 8:
        seen = _in_flight_gauge(server, "scorer")
        time.sleep(0.2)
    assert seen > 8, f"the store's backlog is not counted as load: {seen}"
    quick = submit(server, {"tag": "quick"}, api="brief")
    doc = wait_done(server, quick, api="brief", timeout=30)
    assert doc["status"] == "completed"
    # `brief` did not wait for `scorer`'s backlog to drain.
    waiting = [
        rid
        for rid in flood
        if server.client.get(f"/scorer/{rid}").json()["status"] in ("in_queue", "in_progress")
    ]
    assert len(waiting) >= 8, f"brief ran only after scorer's backlog: {len(waiting)} left"
    for rid in flood:
        assert wait_done(server, rid, timeout=60)["status"] == "completed"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and seen > 0:
        seen = _in_flight_gauge(server, "scorer")
        time.sleep(0.2)
    assert seen == 0


def test_webhook_is_delivered_once_when_the_server_allows_loopback(tmp_path: Path) -> None:
    rec = Receiver()
    try:
        root = project(tmp_path / "proj", rec.url)
        srv = KilnServer(root, tmp_path / "home", extra_args=["--webhook-allow", "127.0.0.1/32"])
        try:
            request_id = submit(srv, {"tag": "announced", "x": 5})
            doc = wait_done(srv, request_id)
            deadline = time.monotonic() + 10
            while not rec.bodies and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # a second call would come now
            assert len(rec.bodies) == 1, rec.bodies
            hook = rec.bodies[0]
            assert hook["id"] == request_id and hook["status"] == "completed"
            assert hook["result"] == {"tag": "announced", "double": 10} == doc["result"]
            assert srv.client.get(f"/scorer/{request_id}").json()["webhook"] == {"status": "sent"}
        finally:
            srv.stop()
    finally:
        rec.close()


def test_accepted_requests_survive_a_sigkill_of_the_server(tmp_path: Path) -> None:
    root = project(tmp_path / "proj", "https://hooks.example.invalid/x")
    home = tmp_path / "home"
    first = KilnServer(root, home)
    tags = [f"t{i}" for i in range(24)]
    try:
        ids = {tag: submit(first, {"tag": tag, "sleep": 0.15}) for tag in tags}
        done = root / "done.txt"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (done.exists() and done.read_text().strip()):
            time.sleep(0.02)
        first.proc.send_signal(signal.SIGKILL)  # the server only: its workers die with it
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    ran_before = done.read_text().split()
    assert 0 < len(ran_before) < len(tags), "the kill should land mid-queue"
    (home / "state" / "server.json").unlink(missing_ok=True)  # left behind by SIGKILL
    second = KilnServer(root, home)
    try:
        for tag, request_id in ids.items():
            doc = wait_done(second, request_id)
            assert doc["status"] == "completed", doc
            assert doc["result"]["tag"] == tag
    finally:
        second.stop()
    ran = done.read_text().split()
    assert set(ran) == set(tags)  # every accepted request ran
    # Queued requests run once; only those running at the kill may have run twice.
    repeated = len(ran) - len(tags)
    assert 0 <= repeated <= 8, ran


def test_bad_webhook_allow_is_refused_before_serving(tmp_path: Path) -> None:
    import subprocess

    root = project(tmp_path / "proj", "https://hooks.example.invalid/x")
    out = subprocess.run(
        [*KILN, "serve", str(root), "--port", "0", "--webhook-allow", "not-a-net"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--webhook-allow 'not-a-net'" in out.stderr + out.stdout


def test_async_block_is_validated(tmp_path: Path) -> None:
    import subprocess

    write(tmp_path / "handler.py", HANDLER)
    write(
        tmp_path / "kiln.yaml",
        "- kind: AsyncAPI\n  name: a\n  python: {handler: handler.py}\n"
        "  async: {result_ttl: soon, webhook: 'ftp://x'}\n",
    )
    out = subprocess.run(
        [*KILN, "validate", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0
    assert "async.result_ttl" in text and "async.webhook" in text and "http(s) URL" in text


def test_webhook_targets_are_checked_on_every_resolved_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from kiln.control import webhooks

    answers: dict[str, list[str]] = {
        "rebind.example": ["93.184.216.34", "10.0.0.5"],  # one public, one private
        "public.example": ["93.184.216.34"],
        "metadata.example": ["169.254.169.254"],
        "mapped.example": ["::ffff:127.0.0.1"],
    }

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    none: list[Any] = []
    assert webhooks.resolve("https://public.example/h", none) == (
        "https",
        "public.example",
        443,
        "93.184.216.34",
    )
    for host in ("rebind.example", "metadata.example", "mapped.example"):
        with pytest.raises(webhooks.WebhookRefused, match="--webhook-allow"):
            webhooks.resolve(f"http://{host}/h", none)
    allowed = webhooks.parse_allow(["10.0.0.0/8", "127.0.0.1/32"])
    assert webhooks.resolve("http://rebind.example/h", allowed)[3] == "93.184.216.34"
    assert webhooks.resolve("http://mapped.example/h", allowed)[3] == "::ffff:127.0.0.1"
    with pytest.raises(ValueError, match="not an address or CIDR"):
        webhooks.parse_allow(["10.0.0.0/99"])


def test_server_yaml_keeps_and_checks_webhook_allow(tmp_path: Path) -> None:
    from kiln.control import server_file

    server_file.save(tmp_path, {"webhook_allow": ["10.0.0.0/8"]})
    assert server_file.load(tmp_path)["webhook_allow"] == ["10.0.0.0/8"]
    (tmp_path / "server.yaml").write_text("webhook_allow: ['nope']\n")
    with pytest.raises(server_file.ServerFileError, match="webhook_allow"):
        server_file.load(tmp_path)
