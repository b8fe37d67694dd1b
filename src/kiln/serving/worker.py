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

from kiln.errors import InvalidInput, KilnError
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


def _error_header(request_id: int, err: KilnError) -> dict[str, Any]:
    return {
        "id": request_id,
        "ok": False,
        "err": {"type": err.type, "message": err.message, "status": err.status},
    }


def _to_kiln_error(exc: BaseException, api: str, request_id: str) -> KilnError:
    if isinstance(exc, KilnError):
        return exc
    # The traceback goes to the log (our stderr is collected by the server), never to the client.
    sys.stderr.write(f"request {request_id} failed in API '{api}':\n{traceback.format_exc()}")
    sys.stderr.flush()
    from kiln.errors import InferenceError

    return InferenceError(f"{type(exc).__name__}: {exc}")


def handle_predict(
    pipeline: Pipeline, spec: WorkerSpec, header: dict[str, Any], body: memoryview
) -> tuple[dict[str, Any], list[bytes]]:
    """Answer one predict frame: parse, run, encode."""
    rid = header.get("rid", "")
    stages: list[tuple[str, Any]] | None = [] if header.get("dbg") else None
    context = RequestContext(
        request_id=rid,
        api=spec.api,
        version=spec.version,
        protocol=header.get("proto", "native"),
        headers=header.get("hdr") or {},
        query=header.get("q") or {},
        metadata=spec.metadata,
        config=spec.config,
    )
    try:
        try:
            payload = orjson.loads(body) if len(body) else None
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
        result = pipeline.predict(payload, context, stages)
        if spec.response_envelope == "hub" and context.protocol == "native":
            result = {"statusCode": context.status or 200, "body": {"output": result}}
        out, content_type = encode_result(result)
        reply: dict[str, Any] = {"id": header["id"], "ok": True, "ct": content_type}
        if context.status:
            reply["st"] = context.status
        if context.response_headers:
            reply["hd"] = context.response_headers
            content_type = context.response_headers.get("Content-Type")
            if content_type:
                reply["ct"] = content_type
        buffers = [out]
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        reply, buffers = _error_header(header["id"], _to_kiln_error(exc, spec.api, rid)), []
    if stages is not None:
        reply["dbg"] = [[name, preview(value)] for name, value in stages]
    return reply, buffers


def serve(channel: BlockingChannel) -> int:
    first = channel.recv()
    if first is None or first[0].get("op") != "init":
        return 2
    spec = WorkerSpec.from_wire(first[0]["spec"])
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
        if header.get("op") == "predict":
            reply, out = handle_predict(pipeline, spec, header, buffers[0] if buffers else b"")
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
