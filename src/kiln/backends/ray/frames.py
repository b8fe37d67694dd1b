"""Batches and their outcomes between the Ray ingress and a replica actor, as bytes.

Ray would pickle Python objects between actors; requests are what clients sent,
and nothing a client sent is ever unpickled (DESIGN.md). So a batch crosses the
Ray hop as one Kiln IPC frame (serving/ipc.py: a msgpack header plus raw
buffers, the same typed messages a worker reads), and its outcomes come back as a
`BatchReply` frame: Ray only moves `bytes`.

The ingress encodes requests (`batch_frame`) and decodes outcomes
(`outcomes_from_frame`, serving/wire.py's `decode_outcomes`); the replica actor
turns the frame back into requests for its `Replica` (`requests_from_frame`) and
its outcomes into a reply (`reply_frame`).
"""

from __future__ import annotations

from typing import Any

from kiln.errors import KilnError
from kiln.serving.ipc import FrameError, decode_frame, encode_frame
from kiln.serving.messages import FROM_WORKER, TO_WORKER, Batch, BatchReply, Explain, ReplyItem
from kiln.serving.types import InferenceRequest, InferenceResponse
from kiln.serving.wire import (
    decode_outcomes,
    decode_tensors,
    encode_request,
    encode_tensors,
    item_parts,
    split_items,
    wire_error,
)


def _join(chunks: list[Any]) -> bytes:
    return b"".join(bytes(c) if not isinstance(c, bytes) else c for c in chunks)


def batch_frame(requests: list[InferenceRequest], op: str = "batch") -> bytes:
    """The ingress side: requests -> one `Batch` (or `Explain`) frame."""
    items, buffers = [], []
    for request in requests:
        item, owned = encode_request(request)
        items.append(item)
        buffers.extend(owned)
    kind = Explain if op == "explain" else Batch
    return _join(encode_frame(kind(0, items), buffers))


def requests_from_frame(
    data: bytes, api: str, version: str | None
) -> tuple[list[InferenceRequest], str]:
    """The replica side: a batch frame -> the requests it carries, and "batch" or "explain"."""
    message, buffers = decode_frame(memoryview(data)[4:], TO_WORKER)
    if not isinstance(message, Batch | Explain):
        raise FrameError(f"expected a batch, got {type(message).__name__}")
    requests: list[InferenceRequest] = []
    for item, owned in zip(message.items, split_items(message.items, buffers), strict=True):
        request = InferenceRequest(
            api=api,
            version=version,
            request_id=item.request_id,
            body=b"",
            # A raw body keeps the client's content type, none included ("": the worker
            # then hands the handler bytes, as on one machine); JSON kinds carry none.
            content_type=item.content_type if item.kind == "raw" else "application/json",
            protocol=item.protocol,
            headers=dict(item.headers or {}),
            query=dict(item.query or {}),
            debug=item.debug,
            kind=item.kind,
            want_tensors=item.want_tensors,
            outputs=item.outputs,
        )
        if item.kind == "tensors":
            request.tensors = decode_tensors(item.tensors or [], owned)
        elif item.kind == "parts":
            request.parts = item_parts(item, owned)
        else:
            request.body = bytes(owned[0]) if owned else b""
        requests.append(request)
    return requests, "explain" if isinstance(message, Explain) else "batch"


def reply_frame(outcomes: list[InferenceResponse | KilnError]) -> bytes:
    """The replica side: its Replica's outcomes -> one `BatchReply` frame."""
    items: list[ReplyItem] = []
    buffers: list[Any] = []
    batch_size = 1
    for outcome in outcomes:
        if isinstance(outcome, KilnError):
            items.append(ReplyItem(error=wire_error(outcome)))
            continue
        batch_size = outcome.batch_size
        item = ReplyItem(
            content_type=outcome.content_type,
            status=outcome.status,
            headers=outcome.headers or None,
            tracked=outcome.tracked,
            debug=outcome.debug_stages or None,
            handler_metrics=outcome.handler_metrics,
        )
        if outcome.tensors is not None:
            item.tensors, owned = encode_tensors(outcome.tensors)
        else:
            owned = [outcome.body]
        item.buffers = len(owned)
        items.append(item)
        buffers.extend(owned)
    return _join(encode_frame(BatchReply(0, items, batch_size), buffers))


def outcomes_from_frame(data: bytes, expected: int) -> list[InferenceResponse | KilnError]:
    """The ingress side: a reply frame -> one outcome per request sent."""
    message, buffers = decode_frame(memoryview(data)[4:], FROM_WORKER)
    if not isinstance(message, BatchReply):
        raise FrameError(f"expected a reply, got {type(message).__name__}")
    return decode_outcomes(message, expected, buffers)
