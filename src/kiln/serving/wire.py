"""What a request and its answer look like inside a batch frame.

Each item of a batch has a small msgpack header and owns `nb` consecutive
buffers of the frame: the body, the multipart parts, or one buffer per
numeric tensor (BYTES tensors travel as lists inside the header). Tensors
are sent as their raw memory and read back with `np.frombuffer`, so no
tensor is copied into JSON or pickled on its way to or from a worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.datatypes import V2_BY_DTYPE_STR, V2_TO_NUMPY, v2_name
from kiln.errors import InvalidInput, KilnError, error_from_wire
from kiln.serving.types import InferenceRequest, InferenceResponse, Part, Tensor


def _raw(array: np.ndarray) -> memoryview:
    return np.ascontiguousarray(array).data.cast("B")


def encode_tensors(tensors: list[Tensor]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Descriptors and buffers for tensors; BYTES data rides in the descriptor."""
    descs: list[dict[str, Any]] = []
    buffers: list[Any] = []
    for tensor in tensors:
        desc: dict[str, Any] = {"n": tensor.name, "dt": tensor.datatype, "s": list(tensor.shape)}
        if tensor.datatype == "BYTES":
            desc["v"] = [v if isinstance(v, bytes) else str(v).encode() for v in tensor.data]
        else:
            buffers.append(_raw(tensor.data))
        descs.append(desc)
    return descs, buffers


def decode_tensors(descs: list[dict[str, Any]], buffers: list[memoryview]) -> list[Tensor]:
    tensors: list[Tensor] = []
    numeric = iter(buffers)
    for desc in descs:
        if desc["dt"] == "BYTES":
            tensors.append(Tensor(desc["n"], "BYTES", desc["s"], list(desc["v"])))
        else:
            dtype = V2_TO_NUMPY[desc["dt"]]
            array = np.frombuffer(next(numeric), dtype=dtype).reshape(desc["s"])
            tensors.append(Tensor(desc["n"], desc["dt"], desc["s"], array))
    return tensors


def tensor_count(descs: list[dict[str, Any]]) -> int:
    return sum(1 for d in descs if d["dt"] != "BYTES")


# ----- server -> worker --------------------------------------------------------------


def encode_request(request: InferenceRequest) -> tuple[dict[str, Any], list[Any]]:
    item: dict[str, Any] = {"rid": request.request_id}
    if request.debug:
        item["dbg"] = True
    if request.protocol != "native":
        item["proto"] = request.protocol
    if request.headers:
        item["hdr"] = request.headers
    if request.query:
        item["q"] = request.query
    if request.want_tensors:
        item["wt"] = True
        if request.outputs:
            item["o"] = request.outputs
    kind = request.kind
    if kind == "tensors":
        item["k"] = kind
        item["t"], buffers = encode_tensors(request.tensors or [])
    elif kind == "parts":
        item["k"] = kind
        parts = request.parts or []
        item["p"] = [{"n": p.name, "ct": p.content_type, "f": p.filename} for p in parts]
        buffers = [p.data for p in parts]
    else:
        if kind == "raw":
            item["k"] = kind
            item["ct"] = request.content_type
        elif kind == "v2json":
            item["k"] = kind
        buffers = [request.body]
    item["nb"] = len(buffers)
    return item, buffers


def split_items(items: list[dict[str, Any]], buffers: list[Any]) -> list[list[Any]]:
    """The buffers of each item, in order."""
    out: list[list[Any]] = []
    offset = 0
    for item in items:
        count = item.get("nb", 1)
        out.append(buffers[offset : offset + count])
        offset += count
    return out


def item_parts(item: dict[str, Any], buffers: list[memoryview]) -> list[Part]:
    return [
        Part(p["n"], bytes(b), p.get("ct") or "", p.get("f"))
        for p, b in zip(item.get("p", ()), buffers, strict=True)
    ]


# ----- worker -> server --------------------------------------------------------------


def decode_outcomes(
    header: dict[str, Any], buffers: list[memoryview]
) -> list[InferenceResponse | KilnError]:
    """One outcome per item of a batch reply."""
    items = header["items"]
    outcomes: list[InferenceResponse | KilnError] = []
    for item, owned in zip(items, split_items(items, buffers), strict=True):
        stages = [tuple(s) for s in item.get("dbg", ())]
        if item.get("ok"):
            tensors = decode_tensors(item["t"], owned) if "t" in item else None
            outcomes.append(
                InferenceResponse(
                    body=bytes(owned[0]) if owned and tensors is None else b"",
                    content_type=item.get("ct", "application/json"),
                    status=item.get("st", 200),
                    headers=item.get("hd") or {},
                    debug_stages=stages,
                    batch_size=header.get("n", 1),
                    tensors=tensors,
                    tracked=item.get("tv"),
                )
            )
        else:
            err = item["err"]
            error = error_from_wire(err["type"], err["message"], err["status"])
            error.debug_stages = stages  # type: ignore[attr-defined]
            outcomes.append(error)
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
