"""Open Inference Protocol (V2) tensors: JSON and the binary tensor data extension.

A request body is a JSON header, optionally followed by raw tensor bytes when
the client sends `Inference-Header-Content-Length: N` (the first N bytes are
the JSON). Each input holds either `data` (flat or nested JSON, row-major) or
`parameters.binary_data_size` bytes of the binary tail, in input order:
numbers little-endian in their native size, BOOL one byte each, BYTES each a
4-byte little-endian length then the bytes.

The header is parsed and checked (names, datatypes, shapes) before any tensor
data is decoded, so a request can be held against the model's signature and
answered 400 naming the tensor before any model runs (`kiln.serving.v2_signature`).
No HTTP lives here: the
V2 adapter uses this module for binary requests, and the worker uses it for
JSON-only requests, which it parses, checks and answers itself. Response
bodies are built in `kiln.serving.v2_response`.

BF16: numpy has no bfloat16, so a BF16 input (binary only; JSON cannot carry
it) is widened to float32 by moving each 16-bit value into the high half of a
32-bit float, which is exact. The model is told FP32, so BF16 is accepted
wherever the signature says FP32.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from kiln.datatypes import V2_TO_NUMPY
from kiln.errors import InvalidInput
from kiln.serving.types import Tensor

DATATYPES = (*V2_TO_NUMPY, "BYTES", "BF16")
_LITTLE = {name: dtype.newbyteorder("<") for name, dtype in V2_TO_NUMPY.items()}
_UNSUPPORTED_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_DATATYPE_SET = frozenset(DATATYPES)
_NO_TAIL = memoryview(b"")


@dataclass(slots=True)
class InputHeader:
    """One input as the JSON header describes it; `data` is None for binary inputs."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    binary_size: int | None = None

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def model_datatype(self) -> str:
        """The datatype the model receives (BF16 arrives widened to FP32)."""
        return "FP32" if self.datatype == "BF16" else self.datatype


@dataclass(slots=True)
class InferBody:
    """A parsed inference request: its header fields, and the binary tail not yet decoded."""

    id: Any
    parameters: dict[str, Any]
    inputs: list[InputHeader]
    outputs: list[str] | None  # requested output names; None: all
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # explicit per-output choice
    binary_default: bool = False  # request-level `binary_data_output`
    tail: memoryview = _NO_TAIL

    def wants_binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _shape(name: str, value: Any) -> list[int]:
    if type(value) is list:
        for d in value:
            if type(d) is not int or d < 0:
                break
        else:
            return value
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(
            f"input '{name}' needs a 'shape': a list of non-negative integers, e.g. [1, 4]"
        )
    return value


def _input_header(raw: Any, index: int) -> InputHeader:
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be a JSON object with name, shape and datatype")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] needs a 'name' (a string)")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in _DATATYPE_SET:
        raise InvalidInput(
            f"input '{name}' has datatype {datatype!r}, which is not a V2 datatype; "
            f"use one of {', '.join(DATATYPES)}"
        )
    shape = _shape(name, raw.get("shape"))
    params = raw.get("parameters")
    if params is None:  # the common case: JSON data, no parameters
        if "data" in raw and datatype != "BF16":
            return InputHeader(name, datatype, shape, raw["data"], None)
        params = {}
    params = _object(params, f"the parameters of input '{name}'")
    if any(key in params for key in _UNSUPPORTED_PARAMS):
        raise InvalidInput(
            f"input '{name}' uses shared memory, which this server does not offer; "
            f"send the data in the request (JSON or binary_data_size)"
        )
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise InvalidInput(
                f"input '{name}' has both 'data' and binary_data_size: send one or the other"
            )
        return InputHeader(name, datatype, shape, None, size)
    if "data" not in raw:
        raise InvalidInput(
            f"input '{name}' has no 'data': send it as JSON, or as binary data with "
            f"parameters.binary_data_size and the Inference-Header-Content-Length header"
        )
    if datatype == "BF16":
        raise InvalidInput(
            f"input '{name}' is BF16, which JSON cannot carry: send it as binary data "
            f"(parameters.binary_data_size), or send FP32"
        )
    return InputHeader(name, datatype, shape, raw["data"], None)


def parse_infer_body(body: bytes | memoryview, header_length: str | None) -> InferBody:
    """The request's JSON header, checked; tensor data stays undecoded until `decode_inputs`."""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length!r}, but the body has "
                f"{len(body)} bytes: it must be the length of the JSON header at the start"
            )
        split = int(header_length)
    else:
        split = len(body)
    try:
        head = orjson.loads(body if split == len(body) else memoryview(body)[:split])
    except orjson.JSONDecodeError as exc:
        hint = (
            ""
            if header_length is not None
            else "; with binary tensor data, send the Inference-Header-Content-Length header"
        )
        raise InvalidInput(f"the request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(head, dict):
        raise InvalidInput('the request body must be a JSON object: {"inputs": [...]}')
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("the request 'id' must be a string")
    parameters = head.get("parameters")
    parameters = {} if parameters is None else _object(parameters, "the request parameters")
    raw_inputs = head.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput(
            'the request needs "inputs": a list of {"name", "shape", "datatype", "data"}'
        )
    inputs = [_input_header(raw, i) for i, raw in enumerate(raw_inputs)]
    if len(inputs) > 1 and len({spec.name for spec in inputs}) != len(inputs):
        seen: set[str] = set()
        for spec in inputs:
            if spec.name in seen:
                raise InvalidInput(f"input '{spec.name}' is given twice: send each input once")
            seen.add(spec.name)
    body_info = InferBody(request_id, parameters, inputs, None)
    if parameters:
        body_info.binary_default = _bool(
            parameters.get("binary_data_output", False), "binary_data_output"
        )
    raw_outputs = head.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput('"outputs" must be a list of {"name", "parameters"}')
        body_info.outputs = []
        for index, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidInput(f"outputs[{index}] needs a 'name' (a string)")
            name = raw["name"]
            params = _object(raw.get("parameters"), f"the parameters of output '{name}'")
            if params.get("classification"):
                raise InvalidInput(
                    f"output '{name}' asks for classification, which this server does not "
                    f"offer: request the raw output and rank it on the client"
                )
            if any(key in params for key in _UNSUPPORTED_PARAMS):
                raise InvalidInput(
                    f"output '{name}' asks for shared memory, which this server does not offer"
                )
            if "binary_data" in params:
                body_info.binary_outputs[name] = _bool(params["binary_data"], "binary_data")
            body_info.outputs.append(name)
        body_info.outputs = list(dict.fromkeys(body_info.outputs)) or None
    body_info.tail = memoryview(body)[split:] if split < len(body) else _NO_TAIL
    declared = 0
    for spec in inputs:
        if spec.binary_size:
            declared += spec.binary_size
    if declared != len(body_info.tail):
        binary = [s.name for s in inputs if s.binary_size is not None]
        if not binary:
            raise InvalidInput(
                f"the request has {len(body_info.tail)} bytes after its JSON header, but no "
                f"input declares binary_data_size"
            )
        raise InvalidInput(
            f"inputs {', '.join(repr(n) for n in binary)} declare {declared} bytes of binary "
            f"data, but {len(body_info.tail)} bytes follow the JSON header; send the "
            f"Inference-Header-Content-Length header with the JSON header's length"
        )
    return body_info


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"the parameter {what} must be true or false")
    return value


# ----- inputs -> tensors ---------------------------------------------------------------


def decode_inputs(body: InferBody) -> list[Tensor]:
    """Typed tensors from the JSON data and the binary tail, each checked against its shape."""
    tensors: list[Tensor] = []
    offset = 0
    for spec in body.inputs:
        if spec.binary_size is None:
            tensors.append(_from_json(spec))
        else:
            chunk = body.tail[offset : offset + spec.binary_size]
            offset += spec.binary_size
            tensors.append(_from_binary(spec, chunk))
    return tensors


def _count_error(spec: InputHeader, got: int) -> InvalidInput:
    return InvalidInput(
        f"input '{spec.name}' has shape {spec.shape}, which holds {spec.count} elements, "
        f"but its data has {got}: make the shape match the data"
    )


def _flatten_strings(name: str, data: Any) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, str):
            out.append(value.encode())
        else:
            raise InvalidInput(
                f"input '{name}' is BYTES, so its JSON data must be strings; "
                f"got {type(value).__name__}"
            )
    return out


def _from_json(spec: InputHeader) -> Tensor:
    name, datatype = spec.name, spec.datatype
    if datatype == "BYTES":
        values = _flatten_strings(name, spec.data)
        if len(values) != spec.count:
            raise _count_error(spec, len(values))
        return Tensor(name, "BYTES", list(spec.shape), values)
    try:
        array = np.asarray(spec.data)
    except (ValueError, TypeError):
        array = None
    if array is None or (kind := array.dtype.kind) == "O":
        raise InvalidInput(
            f"input '{name}' data is not a rectangular array of {datatype} values: nested "
            f"lists must all have the same length, or send a flat list"
        )
    if array.size != spec.count:
        raise _count_error(spec, int(array.size))
    target = V2_TO_NUMPY[datatype]
    if kind in "US":
        raise InvalidInput(f"input '{name}' is {datatype}, but its data holds strings")
    if target.kind == "b":
        if kind != "b" and array.size:
            raise InvalidInput(f"input '{name}' is BOOL: its data must be true or false values")
    elif kind == "b" and array.size:
        raise InvalidInput(f"input '{name}' is {datatype}, but its data holds true/false values")
    elif target.kind in "iu" and array.size:
        if kind == "f" and not np.all(np.isfinite(array) & (array == np.floor(array))):
            raise InvalidInput(
                f"input '{name}' is {datatype}, but its data holds fractional numbers"
            )
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input '{name}' is {datatype}, but its data holds numbers outside "
                f"[{info.min}, {info.max}]"
            )
    return Tensor(name, datatype, list(spec.shape), array.astype(target).reshape(spec.shape))


def _from_binary(spec: InputHeader, chunk: memoryview) -> Tensor:
    name, datatype, shape = spec.name, spec.datatype, list(spec.shape)
    if datatype == "BYTES":
        values = _split_bytes(name, chunk)
        if len(values) != spec.count:
            raise _count_error(spec, len(values))
        return Tensor(name, "BYTES", shape, values)
    itemsize = 2 if datatype == "BF16" else _LITTLE[datatype].itemsize
    if len(chunk) != spec.count * itemsize:
        raise InvalidInput(
            f"input '{name}' has shape {shape} of {datatype}, which is "
            f"{spec.count * itemsize} bytes, but its binary_data_size is {len(chunk)}"
        )
    if datatype == "BF16":
        halves = np.frombuffer(chunk, dtype="<u2")
        widened = (halves.astype(np.uint32) << 16).view(np.float32)
        return Tensor(name, "FP32", shape, widened.reshape(shape))
    if datatype == "BOOL":
        array = np.frombuffer(chunk, dtype=np.uint8) != 0
    else:
        array = np.frombuffer(chunk, dtype=_LITTLE[datatype])
        if not array.dtype.isnative:
            array = array.astype(V2_TO_NUMPY[datatype])
    return Tensor(name, datatype, shape, array.reshape(shape))


def _split_bytes(name: str, chunk: memoryview) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    values: list[bytes] = []
    data = bytes(chunk)
    offset, end = 0, len(data)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(
                f"input '{name}': BYTES binary data ends inside an element's 4-byte length"
            )
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"input '{name}': a BYTES element says {length} bytes, but only "
                f"{end - offset} remain in its binary data"
            )
        values.append(data[offset : offset + length])
        offset += length
    return values
