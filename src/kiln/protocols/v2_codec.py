"""The HTTP side of Open Inference Protocol (V2) tensors: request compression.

The tensor encodings themselves are in `kiln.serving.v2_tensors` (parsing,
signature checks) and `kiln.serving.v2_response` (response bodies), shared
with the worker, which answers JSON-only V2 requests itself.
"""

from __future__ import annotations

import zlib

from kiln.errors import InvalidInput, PayloadTooLarge
from kiln.serving.v2_response import encode_infer_response
from kiln.serving.v2_signature import check_signature
from kiln.serving.v2_tensors import (
    DATATYPES,
    InferBody,
    InputHeader,
    decode_inputs,
    parse_infer_body,
)

__all__ = [
    "DATATYPES",
    "InferBody",
    "InputHeader",
    "check_signature",
    "decode_inputs",
    "decompress",
    "encode_infer_response",
    "parse_infer_body",
]


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate request body (tritonclient's request compression), within `limit`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(
            f"Content-Encoding '{encoding}' is not supported: send the body uncompressed, "
            f"or compressed with gzip or deflate"
        )
    inflater = zlib.decompressobj(wbits=47)  # 47: accept a gzip or a zlib header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {encoding} request body cannot be decompressed: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"the decompressed request body is over this API's limit of {limit} bytes; "
            f"send less data per request or raise serving.max_request_bytes in kiln.yaml"
        )
    return out
