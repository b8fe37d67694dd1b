"""Clients that leave: their requests are dropped before dispatch, or their answers discarded.

End to end through `kiln serve`'s inference port: 50 raw clients send to a slow
API with one replica and close their sockets at once; the handler records every
request it runs, and the metrics port counts the cancellations.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest
from support import KilnServer, write

HANDLER = """
import time


def predict(payload, context):
    with open(payload["path"], "a") as log:
        log.write("ran\\n")
    time.sleep(payload.get("sleep", 0.5))
    return "done"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cancel-project")
    write(root / "h.py", HANDLER)
    write(
        root / "kiln.yaml",
        "- kind: api\n  name: slow\n  python: {handler: h.py}\n"
        "  compute: {min_replicas: 1, max_replicas: 1}\n",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def raw_request(url: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def cancelled(server: KilnServer) -> dict[str, float]:
    text = httpx.get(str(server.metrics_url), timeout=10).text
    found = re.findall(r'kiln_requests_cancelled_total\{api="slow",where="(\w+)"\} (\S+)', text)
    return {where: float(value) for where, value in found}


def ran(path: Path) -> int:
    return path.read_text().count("ran") if path.exists() else 0


def test_fifty_clients_that_leave_are_not_run(server: KilnServer, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    body = orjson.dumps({"path": str(runs), "sleep": 0.5})
    sockets = [raw_request(server.url, body) for _ in range(50)]
    deadline = time.monotonic() + 10
    while ran(runs) == 0 and time.monotonic() < deadline:  # the first one is running
        time.sleep(0.05)
    for sock in sockets:
        sock.close()
    time.sleep(2.0)  # what was already in the worker finishes; nothing more starts
    settled = ran(runs)
    counts = cancelled(server)
    assert settled <= 4, settled  # the one running and the one waiting in the worker
    assert counts.get("queued", 0) >= 45, counts
    assert counts.get("running", 0) >= 1, counts
    assert counts.get("queued", 0) + counts.get("running", 0) == 50, counts
    # The API still answers the clients that stay.
    response = server.client.post("/slow", json={"path": str(runs), "sleep": 0})
    assert response.status_code == 200 and response.json() == "done"
    assert ran(runs) == settled + 1


def test_keep_alive_and_pipelining_still_answer_every_request(
    server: KilnServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    body = orjson.dumps({"path": str(runs), "sleep": 0})
    head = b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    one = head + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(one * 3)  # three pipelined requests on one connection
        received = b""
        deadline = time.monotonic() + 10
        while received.count(b'"done"') < 3 and time.monotonic() < deadline:
            received += sock.recv(65536)
    assert received.count(b"HTTP/1.1 200") == 3
    assert ran(runs) == 3


def test_a_half_closed_client_counts_as_gone(server: KilnServer, tmp_path: Path) -> None:
    """EOF from the client is a disconnect, as in uvicorn: the request is cancelled."""
    runs = tmp_path / "runs.txt"
    before = cancelled(server)
    blocker = raw_request(server.url, orjson.dumps({"path": str(runs), "sleep": 1.0}))
    deadline = time.monotonic() + 10
    while ran(runs) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    queued = [
        raw_request(server.url, orjson.dumps({"path": str(runs), "sleep": 0})) for _ in range(4)
    ]
    time.sleep(0.2)
    for sock in queued:
        sock.shutdown(socket.SHUT_WR)
    time.sleep(2.0)
    after = cancelled(server)
    for sock in [blocker, *queued]:
        sock.close()
    gone = sum(after.values()) - sum(before.values())
    assert gone >= 4, (before, after)
    assert ran(runs) <= 2  # the blocker and at most the one waiting behind it in the worker
