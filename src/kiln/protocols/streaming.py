"""Streamed responses: HTTP/1.1 chunked bodies and Server-Sent Events.

A streamed answer is sent chunk by chunk as the handler yields (ASGI
`more_body=True`), so the first chunk leaves while the handler still works.
The response starts only once the first chunk exists: a handler that fails
before yielding anything still gets a proper error response. While the
stream runs, a watcher waits for the client to hang up; when it does, the
stream is cancelled, which tells the worker to close the user's generator,
so no model keeps generating for nobody.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from kiln.errors import KilnError
from kiln.protocols.http import Receive, Request, Send

SSE = "text/event-stream"
CLIENT_CLOSED = 499  # nginx's code for "the client went away"; only ever logged


def wants_sse(request: Request) -> bool:
    """True when the client asked for Server-Sent Events (`Accept: text/event-stream`)."""
    return SSE in request.headers.get("accept", "").lower()


def sse_event(data: bytes, content_type: str = "text/plain", event: str | None = None) -> bytes:
    """One SSE event for a chunk: text and JSON as `data:` lines, other bytes as base64.

    Binary chunks cannot travel as SSE text; they become `event: bytes` with the
    base64 of the chunk as data, so nothing is silently mangled.
    """
    ctype = content_type.split(";", 1)[0].strip().lower()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or (ctype == "application/octet-stream" and not _printable(text)):
        text = base64.b64encode(data).decode("ascii")
        event = event or "bytes"
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode("utf-8")


def _printable(text: str) -> bool:
    return all(ch.isprintable() or ch in "\n\r\t" for ch in text)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client closes the connection (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def stream_response(
    request: Request,
    send: Send,
    chunks: AsyncIterator[tuple[bytes, str]],
    *,
    sse: bool,
    error_body: Callable[[KilnError], dict[str, Any]],
) -> int:
    """Send `chunks` as they come; returns the status for the request log.

    Errors before the first chunk propagate (the caller renders them as a normal
    error response). An error mid-stream cannot change the status any more: with
    SSE it becomes an `event: error` carrying the protocol's error body; with a
    chunked body it propagates and the server cuts the connection without the
    terminating chunk, so the client sees an incomplete body, never a clean one.
    """
    pump = asyncio.create_task(_pump(request, send, chunks, sse, error_body))
    gone = asyncio.create_task(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        if pump in done:
            return pump.result()
        pump.cancel()  # the client hung up: stop the handler's generator
        with contextlib.suppress(asyncio.CancelledError, KilnError):
            await pump
        return CLIENT_CLOSED
    finally:
        for task in (pump, gone):
            if not task.done():
                task.cancel()
        with contextlib.suppress(BaseException):
            await gone
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


async def _pump(
    request: Request,
    send: Send,
    chunks: AsyncIterator[tuple[bytes, str]],
    sse: bool,
    error_body: Callable[[KilnError], dict[str, Any]],
) -> int:
    started = False
    try:
        async for data, content_type in chunks:
            if not started:
                await _start(send, request.request_id, SSE if sse else content_type)
                started = True
            body = sse_event(data, content_type) if sse else data
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})
    except KilnError as err:
        if not started or not sse:
            raise
        event = sse_event(orjson.dumps(error_body(err)), "application/json", "error")
        await send({"type": "http.response.body", "body": event, "more_body": False})
        return err.status
    if not started:  # the handler yielded nothing: an empty, still streamed, answer
        await _start(send, request.request_id, SSE if sse else "text/plain; charset=utf-8")
    tail = sse_event(b"{}", "application/json", "end") if sse else b""
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    return 200


async def _start(send: Send, request_id: str, content_type: str) -> None:
    # No content-length: the server frames the body with Transfer-Encoding: chunked.
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"x-request-id", request_id.encode("latin-1")),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),  # ask proxies (nginx) not to hold chunks back
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
