"""The worker process: loads one API version and answers requests from the server.

Started as `python -m kiln.serving.worker FD` with one end of a socketpair. It
runs all user code, so a handler that crashes takes down this process only;
the server sees the socket close, fails the requests in flight with 503 and
starts a new worker. The worker exits when the server goes away (socket EOF,
or the parent-death signal on Linux), so no worker outlives its server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

import orjson

from kiln.errors import InferenceError, InvalidInput, KilnError
from kiln.handlers.context import RequestContext
from kiln.handlers.pipeline import Pipeline, build_pipeline
from kiln.serving.encoding import dumps, encode_result, preview
from kiln.serving.ipc import BlockingChannel
from kiln.serving.types import WorkerSpec

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the server dies, even while user code is busy."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _to_kiln_error(exc: BaseException, api: str, request_id: str) -> KilnError:
    if isinstance(exc, KilnError):
        return exc
    if exc.__traceback__ is None:  # an exception *returned* for one item, never raised
        return InferenceError(f"{type(exc).__name__}: {exc}")
    # The traceback goes to the log (our stderr is collected by the server), never to the client.
    trace = "".join(traceback.format_exception(exc))
    sys.stderr.write(f"request {request_id} failed in API '{api}':\n{trace}")
    sys.stderr.flush()
    return InferenceError(f"{type(exc).__name__}: {exc}")


def _context(spec: WorkerSpec, item: dict[str, Any]) -> RequestContext:
    return RequestContext(
        request_id=item.get("rid", ""),
        api=spec.api,
        version=spec.version,
        protocol=item.get("proto", "native"),
        headers=item.get("hdr") or {},
        query=item.get("q") or {},
        metadata=spec.metadata,
        config=spec.config,
    )


def _encode_item(
    spec: WorkerSpec, result: Any, context: RequestContext
) -> tuple[dict[str, Any], bytes]:
    if spec.response_envelope == "hub" and context.protocol == "native":
        result = {"statusCode": context.status or 200, "body": {"output": result}}
    out, content_type = encode_result(result)
    reply: dict[str, Any] = {"ok": True, "ct": content_type}
    if context.status:
        reply["st"] = context.status
    if context.response_headers:
        reply["hd"] = context.response_headers
        override = context.response_headers.get("Content-Type")
        if override:
            reply["ct"] = override
    return reply, out


def handle_batch(
    pipeline: Pipeline, spec: WorkerSpec, header: dict[str, Any], bodies: list[memoryview]
) -> tuple[dict[str, Any], list[bytes]]:
    """Answer one batch frame: parse each body, run the batch, encode each answer.

    Every item gets its own reply slot: a body that is not JSON, an exception
    returned for one item, or an answer that cannot be encoded fails that item
    alone; the others are answered normally.
    """
    items: list[dict[str, Any]] = header["items"]
    count = len(items)
    contexts = [_context(spec, item) for item in items]
    stages: list[list[tuple[str, Any]] | None] = [[] if it.get("dbg") else None for it in items]
    outcomes: list[Any] = [None] * count
    runnable: list[int] = []
    for index, body in enumerate(bodies):
        try:
            outcomes[index] = orjson.loads(body) if len(body) else None
            runnable.append(index)
        except orjson.JSONDecodeError as exc:
            outcomes[index] = InvalidInput(f"the request body is not valid JSON: {exc}")
    if runnable:
        try:
            results = pipeline.predict_batch(
                [outcomes[i] for i in runnable],
                [contexts[i] for i in runnable],
                [stages[i] for i in runnable],
            )
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = _to_kiln_error(exc, spec.api, contexts[runnable[0]].request_id)
            results = [error] * len(runnable)
        for index, result in zip(runnable, results, strict=True):
            outcomes[index] = result
    replies: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for index in range(count):
        outcome = outcomes[index]
        body = b""
        error: KilnError | None = None
        if isinstance(outcome, BaseException):
            error = _to_kiln_error(outcome, spec.api, contexts[index].request_id)
        else:
            try:
                reply, body = _encode_item(spec, outcome, contexts[index])
            except Exception as exc:  # noqa: BLE001 - encoding user values may fail
                error = _to_kiln_error(exc, spec.api, contexts[index].request_id)
        if error is not None:
            reply = {
                "ok": False,
                "err": {"type": error.type, "message": error.message, "status": error.status},
            }
        if stages[index] is not None:
            reply["dbg"] = [[name, preview(value)] for name, value in stages[index]]
        replies.append(reply)
        buffers.append(body)
    return {"id": header["id"], "items": replies, "n": count}, buffers


def serve(channel: BlockingChannel) -> int:
    first = channel.recv()
    if first is None or first[0].get("op") != "init":
        return 2
    spec = WorkerSpec.from_wire(first[0]["spec"])
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, spec.cpus)
        except OSError:
            pass  # a container may not allow it; threads still follow compute.cpu
    if spec.python_path and spec.python_path not in sys.path:
        sys.path.insert(0, spec.python_path)
    started = time.monotonic()
    try:
        pipeline = build_pipeline(spec)
        signature = pipeline.signature()
        dumps(signature)
    except BaseException as exc:  # noqa: BLE001 - loading user code may raise anything
        if isinstance(exc, KilnError):
            message = exc.message
        else:
            traceback.print_exc()
            message = f"{type(exc).__name__}: {exc}"
        channel.send({"op": "failed", "error": message})
        return 3
    channel.send(
        {
            "op": "ready",
            "pid": os.getpid(),
            "signature": signature,
            "load_s": round(time.monotonic() - started, 3),
        }
    )
    while True:
        frame = channel.recv()
        if frame is None:
            return 0
        header, buffers = frame
        if header.get("op") == "batch":
            reply, out = handle_batch(pipeline, spec, header, buffers)
            channel.send(reply, out)
        elif header.get("op") == "stop":
            return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    channel = BlockingChannel(sock)
    try:
        return serve(channel)
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
