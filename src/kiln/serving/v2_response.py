"""Open Inference Protocol (V2) response bodies: tensors -> JSON or binary outputs.

Split out of `kiln.serving.v2_tensors`, which parses and checks requests, because
answering is a separate step with its own encodings: the body is
`{"model_name", "model_version", "id", "outputs"}` as JSON, and each output is
either inline `data` (flat, row-major; BYTES as UTF-8 text) or, when the client
asked for binary data, `parameters.binary_data_size` bytes appended after the
JSON header (numbers little-endian, BOOL one byte each, BYTES each a 4-byte
little-endian length then the bytes). No HTTP lives here: the V2 adapter and
the worker both answer through `encode_infer_response`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from kiln.errors import InvalidInput
from kiln.serving.types import Tensor


def _json_data(tensor: Tensor) -> Any:
    if tensor.datatype == "BYTES":
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in tensor.data]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output '{tensor.name}' holds bytes that are not UTF-8 text, which JSON "
                f'cannot carry: request it as binary data (outputs: [{{"name": '
                f'"{tensor.name}", "parameters": {{"binary_data": true}}}}])'
            ) from None
    data = tensor.data
    if type(data) is np.ndarray:
        return data.ravel()  # a view when already contiguous, else a C-order copy
    return np.ascontiguousarray(data).reshape(-1)


def binary_data(tensor: Tensor) -> bytes:
    """One output's bytes as V2 binary data carries them (REST's binary outputs, gRPC's
    raw_output_contents): BYTES elements length-prefixed, numbers little-endian."""
    if tensor.datatype == "BYTES":
        parts: list[bytes] = []
        for value in tensor.data:
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    array = np.asarray(tensor.data)
    if array.dtype == np.bool_:
        return array.astype(np.uint8).tobytes()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def encode_infer_response(
    head: dict[str, Any], tensors: list[Tensor], binary: Callable[[str], bool]
) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary outputs follow it, else None)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in tensors:
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary(tensor.name):
            raw = binary_data(tensor)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = _json_data(tensor)
        outputs.append(out)
    head["outputs"] = outputs
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)
