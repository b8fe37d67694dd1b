"""ModelInfer messages <-> Kiln's tensors: the gRPC side of the Open Inference Protocol.

A request's tensors arrive either all raw (`raw_input_contents`, one entry per
input in input order: little-endian numbers, BOOL one byte each, BYTES each a
4-byte little-endian length then the bytes; what tritonclient sends) or all
typed (`InferInputTensor.contents`, the repeated field of the datatype). Raw
data is decoded by the same code as REST's binary tensor extension
(`kiln.serving.v2_tensors.decode_inputs`), and both are held against the
model's signature with `check_signature` before anything is queued, so a bad
tensor gets the same message on both transports. Answers carry every output in
`raw_output_contents`, as Triton answers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from kiln.datatypes import V2_TO_NUMPY
from kiln.errors import InvalidInput
from kiln.serving.types import Tensor
from kiln.serving.v2_response import binary_data
from kiln.serving.v2_tensors import DATATYPES, InferBody, InputHeader, decode_inputs

# datatype -> the InferTensorContents field that carries it typed (FP16 and BF16: raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def parameter_value(param: Any) -> Any:
    """An InferParameter's value (bool, int, str or float), None when unset."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def parameters(mapping: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in mapping.items()}


def parse_request(request: Any) -> InferBody:
    """The request's header as REST's parser would have it (names, datatypes, shapes)."""
    raw = request.raw_input_contents
    if not request.inputs:
        raise InvalidInput("the request needs inputs: name, datatype, shape and data")
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents: "
            f"send one raw entry per input, in input order"
        )
    inputs: list[InputHeader] = []
    seen: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{index}] needs a name")
        if name in seen:
            raise InvalidInput(f"input '{name}' is given twice: send each input once")
        seen.add(name)
        datatype = tensor.datatype
        if datatype not in DATATYPES:
            raise InvalidInput(
                f"input '{name}' has datatype {datatype!r}, which is not a V2 datatype; "
                f"use one of {', '.join(DATATYPES)}"
            )
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{name}' has shape {shape}: dimensions must be >= 0")
        if any(key in tensor.parameters for key in _SHARED_MEMORY):
            raise InvalidInput(
                f"input '{name}' uses shared memory, which this server does not offer; "
                f"send the data in the request"
            )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{name}' has contents and the request has raw_input_contents: "
                    f"send every input raw, or every input typed"
                )
            inputs.append(InputHeader(name, datatype, shape, None, len(raw[index])))
            continue
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            raise InvalidInput(
                f"input '{name}' is {datatype}, which has no typed contents field: send it "
                f"in raw_input_contents"
            )
        inputs.append(InputHeader(name, datatype, shape, getattr(tensor.contents, field)))
    outputs = list(dict.fromkeys(o.name for o in request.outputs)) or None
    for out in request.outputs:
        if any(key in out.parameters for key in _SHARED_MEMORY):
            raise InvalidInput(
                f"output '{out.name}' asks for shared memory, which this server does not offer"
            )
        if "classification" in out.parameters:
            raise InvalidInput(
                f"output '{out.name}' asks for classification, which this server does not "
                f"offer: request the raw output and rank it on the client"
            )
    body = InferBody(request.id or None, parameters(request.parameters), inputs, outputs)
    if raw:
        body.tail = memoryview(b"".join(raw))
    return body


def decode(body: InferBody) -> list[Tensor]:
    """Typed tensors, each checked against its shape (raw: REST's binary decoder)."""
    if body.inputs and body.inputs[0].binary_size is not None:
        return decode_inputs(body)
    return [_typed(spec) for spec in body.inputs]


def _typed(spec: InputHeader) -> Tensor:
    count = math.prod(spec.shape)
    values = spec.data
    if len(values) != count:
        raise InvalidInput(
            f"input '{spec.name}' has shape {spec.shape}, which holds {count} elements, "
            f"but its contents have {len(values)}: make the shape match the data"
        )
    if spec.datatype == "BYTES":
        return Tensor(spec.name, "BYTES", list(spec.shape), list(values))
    dtype = V2_TO_NUMPY[spec.datatype]
    try:
        array = np.array(values, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype)
        raise InvalidInput(
            f"input '{spec.name}' is {spec.datatype}, but its contents hold numbers outside "
            f"[{info.min}, {info.max}]"
        ) from None
    return Tensor(spec.name, spec.datatype, list(spec.shape), array.reshape(spec.shape))


def deadline(body: InferBody, time_remaining: float | None, limit_s: float) -> float | None:
    """When the answer stops being useful: the client's gRPC deadline, Triton's `timeout`
    parameter (microseconds), never past the API's response timeout."""
    waits = [] if time_remaining is None else [time_remaining]
    timeout = body.parameters.get("timeout")
    if timeout is not None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidInput("the parameter timeout must be a positive integer (microseconds)")
        waits.append(timeout / 1e6)
    if not waits:
        return None
    return time.monotonic() + min(min(waits), limit_s)


def fill_response(response: Any, tensors: list[Tensor]) -> Any:
    """Add each tensor to a ModelInferResponse: its metadata, its data raw."""
    for tensor in tensors:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        response.raw_output_contents.append(binary_data(tensor))
    return response
