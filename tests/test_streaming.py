"""Streamed answers on the TorchServe route: chunked and SSE, early first chunk, disconnects."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from support import KilnServer, build_linear_onnx, write

HANDLERS = """
import time

import kiln


class Slow:
    def predict(self, payload, context):
        yield "first "
        time.sleep(1)
        yield "second"


class Counter:
    def predict(self, payload, context):
        for step in range(200):
            with open(payload["path"], "a") as f:
                f.write("x")
            yield f"step {step}\\n"
            time.sleep(0.1)


class Tokens:
    def predict(self, payload, context):
        yield {"token": 1}
        yield {"token": 2}
        yield "two\\nlines"


class FailsMidway:
    def predict(self, payload, context):
        yield "ok "
        raise kiln.InvalidInput("stopped halfway: the input ran out")


class FailsFirst:
    def predict(self, payload, context):
        raise kiln.InvalidInput("nothing to stream for this input")
        yield "never"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stream-project")
    write(root / "handlers.py", HANDLERS)
    build_linear_onnx(root / "linear.onnx", np.eye(4, 2, dtype=np.float32))
    streaming = "  metadata: {streaming: true}\n"
    yaml = ""
    for name, cls, flag in (
        ("slow", "Slow", streaming),
        ("counter", "Counter", "  config: {streaming: 'true'}\n"),
        ("tokens", "Tokens", ""),
        ("fails-midway", "FailsMidway", streaming),
        ("fails-first", "FailsFirst", streaming),
    ):
        yaml += f"- kind: api\n  name: {name}\n  python: {{handler: handlers.py:{cls}}}\n{flag}"
    yaml += "- kind: api\n  name: linear\n  onnx: {model: linear.onnx}\n"
    write(root / "kiln.yaml", yaml)
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events body."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        events.append((event, "\n".join(data)))
    return events


def test_first_chunk_leaves_before_the_handler_finishes(server: KilnServer) -> None:
    started = time.monotonic()
    chunks: list[tuple[float, bytes]] = []
    with server.client.stream("POST", "/predictions/slow", content=b"go") as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
        assert response.headers["content-type"].startswith("text/plain")
        for chunk in response.iter_raw():
            chunks.append((time.monotonic() - started, chunk))
    total = time.monotonic() - started
    assert b"".join(c for _, c in chunks) == b"first second"
    first_at = chunks[0][0]
    assert chunks[0][1] == b"first "
    assert total >= 1.0
    assert first_at < total - 0.5, (first_at, total)


def test_a_client_that_disconnects_stops_the_generator(server: KilnServer, tmp_path: Path) -> None:
    progress = tmp_path / "progress.txt"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream(
            "POST", "/predictions/counter", json={"path": str(progress)}
        ) as response:
            assert response.status_code == 200
            received = b""
            for chunk in response.iter_raw():
                received += chunk
                if received.count(b"\n") >= 2:
                    break  # hang up after two steps
    time.sleep(1.0)
    settled = progress.stat().st_size
    time.sleep(1.0)
    assert progress.stat().st_size == settled  # the generator stopped
    assert settled < 30  # ... soon after the client left (200 steps would be 20 s)


def test_sse_on_request_sends_the_same_items_as_events(server: KilnServer) -> None:
    response = server.client.post(
        "/predictions/tokens", content=b"x", headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = sse_events(response.text)
    assert events == [
        ("message", '{"token":1}'),
        ("message", '{"token":2}'),
        ("message", "two\nlines"),
        ("end", "{}"),
    ]


def test_without_the_flag_or_sse_a_generator_answers_one_json_list(server: KilnServer) -> None:
    response = server.client.post("/predictions/tokens", content=b"x")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == [{"token": 1}, {"token": 2}, "two\nlines"]


def test_tensor_api_streams_its_single_answer_over_sse(server: KilnServer) -> None:
    response = server.client.post(
        "/predictions/linear", json=[[1, 2, 3, 4]], headers={"Accept": "text/event-stream"}
    )
    events = sse_events(response.text)
    assert events[0][0] == "message"
    assert orjson.loads(events[0][1]) == [[1.0, 2.0]]
    assert events[-1][0] == "end"


def test_an_error_before_the_first_chunk_is_a_normal_error_response(
    server: KilnServer,
) -> None:
    response = server.client.post("/predictions/fails-first", content=b"x")
    assert response.status_code == 400
    assert response.json() == {
        "code": 400,
        "type": "BadRequestException",
        "message": "nothing to stream for this input",
    }


def test_an_error_midway_is_an_sse_error_event(server: KilnServer) -> None:
    response = server.client.post(
        "/predictions/fails-midway", content=b"x", headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 200  # already sent with the first chunk
    events = sse_events(response.text)
    assert events[0] == ("message", "ok ")
    assert events[1][0] == "error"
    assert orjson.loads(events[1][1]) == {
        "code": 400,
        "type": "BadRequestException",
        "message": "stopped halfway: the input ran out",
    }


def test_an_error_midway_cuts_a_chunked_body_short(server: KilnServer) -> None:
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with server.client.stream("POST", "/predictions/fails-midway", content=b"x") as response:
            for chunk in response.iter_raw():
                received += chunk
    assert received == b"ok "  # the client can tell the body is incomplete
