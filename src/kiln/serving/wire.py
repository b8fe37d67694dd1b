"""What a request and its answer look like inside a batch frame.

Each item of a batch is a `RequestItem` (a `ReplyItem` on the way back) and
owns `buffers` consecutive buffers of the frame: the body, the multipart
parts, or one buffer per numeric tensor (BYTES tensors travel as lists inside
the header). Tensors
are sent as their raw memory and read back with `np.frombuffer`, so no
tensor is copied into JSON or pickled on its way to or from a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.datatypes import V2_BY_DTYPE_STR, V2_TO_NUMPY, v2_name
from kiln.errors import InvalidInput, KilnError, error_from_wire
from kiln.serving.ipc import FrameError
from kiln.serving.messages import (
    BatchReply,
    PartDesc,
    ReplyItem,
    RequestItem,
    TensorDesc,
    WireError,
)
from kiln.serving.types import InferenceRequest, InferenceResponse, Part, Tensor


def _raw(array: np.ndarray) -> memoryview:
    return np.ascontiguousarray(array).data.cast("B")


def encode_tensors(tensors: list[Tensor]) -> tuple[list[TensorDesc], list[Any]]:
    """Descriptors and buffers for tensors; BYTES data rides in the descriptor."""
    descs: list[TensorDesc] = []
    buffers: list[Any] = []
    for tensor in tensors:
        desc = TensorDesc(tensor.name, tensor.datatype, list(tensor.shape))
        if tensor.datatype == "BYTES":
            desc.values = [v if isinstance(v, bytes) else str(v).encode() for v in tensor.data]
        else:
            buffers.append(_raw(tensor.data))
        descs.append(desc)
    return descs, buffers


def decode_tensors(descs: list[TensorDesc], buffers: list[memoryview]) -> list[Tensor]:
    tensors: list[Tensor] = []
    numeric = iter(buffers)
    for desc in descs:
        if desc.datatype == "BYTES":
            tensors.append(Tensor(desc.name, "BYTES", desc.shape, list(desc.values or ())))
        else:
            dtype = V2_TO_NUMPY.get(desc.datatype)
            if dtype is None:
                raise InvalidInput(f"unknown tensor datatype {desc.datatype!r}")
            data = next(numeric, None)
            if data is None:
                raise FrameError(f"tensor {desc.name!r} has no buffer in the frame")
            array = np.frombuffer(data, dtype=dtype).reshape(desc.shape)
            tensors.append(Tensor(desc.name, desc.datatype, desc.shape, array))
    return tensors


# ----- server -> worker --------------------------------------------------------------


def encode_request(request: InferenceRequest) -> tuple[RequestItem, list[Any]]:
    """The item and buffers of one request; only what differs from the defaults is set."""
    item = RequestItem(request.request_id)
    if request.debug:
        item.debug = True
    if request.protocol != "native":
        item.protocol = request.protocol
    if request.headers:
        item.headers = request.headers
    if request.query:
        item.query = request.query
    if request.want_tensors:
        item.want_tensors = True
        if request.outputs:
            item.outputs = request.outputs
    if request.trace is not None:
        item.trace = request.trace.traceparent
    kind = request.kind
    buffers: list[Any]
    if kind == "tensors":
        item.kind = "tensors"
        item.tensors, buffers = encode_tensors(request.tensors or [])
        item.buffers = len(buffers)
    elif kind == "parts":
        item.kind = "parts"
        parts = request.parts or []
        item.parts = [PartDesc(p.name, p.content_type, p.filename) for p in parts]
        buffers = [p.data for p in parts]
        item.buffers = len(buffers)
    else:
        if kind == "raw":
            item.kind = "raw"
            item.content_type = request.content_type
        elif kind == "v2json":
            item.kind = "v2json"
        buffers = [request.body]
    return item, buffers


def split_items(items: Sequence[RequestItem | ReplyItem], buffers: list[Any]) -> list[list[Any]]:
    """The buffers of each item, in order; a count that does not add up is a `FrameError`."""
    out: list[list[Any]] = []
    offset = 0
    for item in items:
        count = item.buffers
        out.append(buffers[offset : offset + count])
        offset += count
    if offset != len(buffers):
        raise FrameError(f"the items account for {offset} buffers; the frame has {len(buffers)}")
    return out


def item_parts(item: RequestItem, buffers: list[memoryview]) -> list[Part]:
    return [
        Part(p.name, bytes(b), p.content_type, p.filename)
        for p, b in zip(item.parts or (), buffers, strict=True)
    ]


def wire_error(error: KilnError) -> WireError:
    return WireError(error.type, error.message, error.status)


def from_wire_error(error: WireError) -> KilnError:
    return error_from_wire(error.type, error.message, error.status)


# ----- worker -> server --------------------------------------------------------------


def decode_outcomes(
    reply: BatchReply, expected: int, buffers: list[memoryview]
) -> list[InferenceResponse | KilnError]:
    """One outcome per item of a batch reply; `FrameError` when it does not fit the batch."""
    items = reply.items
    if len(items) != expected:
        raise FrameError(f"a reply has {len(items)} outcomes for a batch of {expected}")
    outcomes: list[InferenceResponse | KilnError] = []
    for item, owned in zip(items, split_items(items, buffers), strict=True):
        stages = list(item.debug) if item.debug else []
        if item.error is None:
            tensors = decode_tensors(item.tensors, owned) if item.tensors is not None else None
            outcomes.append(
                InferenceResponse(
                    body=bytes(owned[0]) if owned and tensors is None else b"",
                    content_type=item.content_type,
                    status=item.status,
                    headers=item.headers or {},
                    debug_stages=stages,
                    batch_size=reply.batch_size,
                    tensors=tensors,
                    tracked=item.tracked,
                    handler_metrics=item.handler_metrics,
                )
            )
        else:
            error = from_wire_error(item.error)
            error.debug_stages = stages  # type: ignore[attr-defined]
            outcomes.append(error)
    timings = items[0].timings if items else None
    if timings is not None:  # a traced batch (serving/tracing.py)
        for outcome in outcomes:
            if isinstance(outcome, InferenceResponse):
                outcome.worker_timings = timings
    return outcomes


def to_output_tensors(result: Any, names: list[str] | None = None) -> list[Tensor]:
    """Typed tensors from what a handler returned: a dict of arrays, one array, or a list."""
    if isinstance(result, dict):
        items = list(result.items())
    elif (
        isinstance(result, (list, tuple))
        and names
        and len(result) == len(names)
        and all(isinstance(r, np.ndarray) for r in result)
    ):
        items = list(zip(names, result, strict=True))
    else:
        items = [((names or ["output0"])[0], result)]
    tensors = []
    for name, value in items:
        array = np.asarray(value)
        datatype = V2_BY_DTYPE_STR.get(array.dtype.str)
        if datatype is not None:  # numbers or bools (the usual answer): no checks apply
            tensors.append(Tensor(str(name), datatype, list(array.shape), array))
            continue
        if array.dtype.kind in "US":
            data = [str(v).encode() for v in array.reshape(-1)]
            tensors.append(Tensor(str(name), "BYTES", list(array.shape), data))
        elif array.dtype == object:
            flat = array.reshape(-1)
            if not all(isinstance(v, (bytes, str)) for v in flat):
                raise InvalidInput(f"output '{name}' is not a rectangular array of numbers")
            data = [v if isinstance(v, bytes) else v.encode() for v in flat]
            tensors.append(Tensor(str(name), "BYTES", list(array.shape), data))
        else:
            if array.dtype.str not in V2_BY_DTYPE_STR:
                array = array.astype(np.float64)
            tensors.append(Tensor(str(name), v2_name(array.dtype), list(array.shape), array))
    return tensors
