"""In the worker: turn a request item into the handler's payload, and a result into a reply.

Decoding follows what each protocol's users expect: JSON for the native and
V1 routes; TorchServe's rules on its routes (JSON decoded, text as str, other
content as bytes); typed arrays for V2. A JSON-only V2 request (`kind="v2json"`)
arrives as its raw body: it is parsed and held against the signature here, and
its answer is the finished V2 response body, so the server only forwards bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from kiln.datatypes import V2_BY_DTYPE_STR, V2_TO_NUMPY
from kiln.errors import InvalidInput
from kiln.handlers.context import RequestContext, TensorPayload
from kiln.serving.encoding import dumps, encode_result
from kiln.serving.messages import ReplyItem, RequestItem
from kiln.serving.types import Tensor
from kiln.serving.v2_response import encode_infer_response
from kiln.serving.v2_signature import check_signature
from kiln.serving.v2_tensors import (
    InferBody,
    InputHeader,
    decode_inputs,
    parse_infer_body,
)
from kiln.serving.wire import decode_tensors, encode_tensors, item_parts, to_output_tensors

_JSONISH = ("application/json",)


def _json(data: Any) -> Any:
    try:
        return orjson.loads(data) if len(data) else None
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None


def decode_raw(data: bytes, content_type: str, tensor_api: bool) -> Any:
    """TorchServe's decoding: JSON -> object, text/* -> str, anything else -> bytes."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in _JSONISH or ctype.endswith("+json"):
        return _json(data)
    if ctype.startswith("text/"):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("the text body is not valid UTF-8") from None
    untyped = ("", "application/octet-stream", "application/x-www-form-urlencoded")
    if tensor_api and ctype in untyped:
        try:
            return orjson.loads(data)  # `curl -T file.json` sends no JSON content type
        except orjson.JSONDecodeError:
            return data
    return data


def _tensor_payload(tensors: list[Tensor]) -> TensorPayload:
    payload = TensorPayload()
    for tensor in tensors:
        data = tensor.data
        if tensor.datatype == "BYTES":
            data = np.array(data, dtype=object).reshape(tensor.shape)
        payload[tensor.name] = data
    return payload


def decode_payload(
    item: RequestItem,
    buffers: list[memoryview],
    input_names: list[str],
    tensor_api: bool,
    signature: dict[str, Any] | None = None,
) -> tuple[Any, InferBody | None]:
    """The handler's payload, and for a `v2json` item its parsed request, whose id and
    outputs shape the answer (`encode_reply`)."""
    kind = item.kind
    if kind == "json":  # the native and V1 routes: `_payload`'s `_json`, inline
        if not buffers or not len(data := buffers[0]):
            return None, None
        try:
            return orjson.loads(data), None
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    if kind == "v2json":
        quick = _quick_v2(buffers[0], signature)
        if quick is not None:
            return quick
        body = parse_infer_body(buffers[0], None)
        check_signature(body, signature or {})
        return _tensor_payload(decode_inputs(body)), body
    return _payload(item, buffers, input_names, tensor_api), None


# ----- V2 JSON: the common request in fewer steps ---------------------------------------

_V2_ID = "id"  # the Open Inference Protocol's request id (not a short frame key)
_QUICK_HEAD = frozenset(("inputs", _V2_ID))
_QUICK_INPUT = frozenset(("name", "shape", "datatype", "data"))
_FLOATS = frozenset(("FP16", "FP32", "FP64"))
# The single-input float signature facts `_quick_v2` needs, by id(signature); the
# signature is kept so its id cannot be reused while the entry lives (one per worker).
_QUICK_SIGS: dict[int, tuple[dict[str, Any], tuple[Any, ...] | None]] = {}


def _quick_signature(signature: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """(name, datatype, dtype, rank, fixed (axis, dim) pairs) of a signature with one
    float input of known rank, else None (the general path serves every request)."""
    if signature is None:
        return None
    entry = _QUICK_SIGS.get(id(signature))
    if entry is not None and entry[0] is signature:
        return entry[1]
    facts: tuple[Any, ...] | None = None
    inputs = signature.get("inputs") or []
    if len(inputs) == 1:
        spec = inputs[0]
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if isinstance(name, str) and name and datatype in _FLOATS and shape:
            fixed = tuple((a, d) for a, d in enumerate(shape) if d is not None and d >= 0)
            facts = (name, datatype, V2_TO_NUMPY[datatype], len(shape), fixed)
    if len(_QUICK_SIGS) >= 64:
        _QUICK_SIGS.clear()
    _QUICK_SIGS[id(signature)] = (signature, facts)
    return facts


def _quick_v2(
    data: memoryview, signature: dict[str, Any] | None
) -> tuple[TensorPayload, InferBody] | None:
    """The payload and parsed body of the usual V2 JSON request, or None for any other.

    Usual: `{"inputs": [one input of exactly name, shape, datatype, data]}` (an "id"
    allowed) that fits a one-input float signature; what `parse_infer_body`,
    `check_signature` and `decode_inputs` would make of it, in one pass. It never
    raises for a bad request: anything unusual or wrong returns None, and the
    general path parses the body again and words the error.
    """
    facts = _quick_signature(signature)
    if facts is None:
        return None
    name, datatype, dtype, rank, fixed = facts
    try:
        head = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(head) is not dict or not head.keys() <= _QUICK_HEAD:
        return None
    request_id = head.get(_V2_ID)
    raw_inputs = head.get("inputs")
    if (
        (request_id is not None and type(request_id) is not str)
        or type(raw_inputs) is not list
        or len(raw_inputs) != 1
    ):
        return None
    raw = raw_inputs[0]
    if type(raw) is not dict or raw.keys() != _QUICK_INPUT:
        return None
    shape = raw["shape"]
    if raw["name"] != name or raw["datatype"] != datatype or type(shape) is not list:
        return None
    if len(shape) != rank:
        return None
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return None
    for axis, dim in fixed:
        if shape[axis] != dim:
            return None
    try:
        array = np.asarray(raw["data"])
    except Exception:  # noqa: BLE001 - the general path says what is wrong
        return None
    if array.dtype.kind not in "fiu" or array.size != math.prod(shape):
        return None
    payload = TensorPayload()
    payload[name] = array.astype(dtype).reshape(shape)
    body = InferBody(request_id, {}, [InputHeader(name, datatype, shape, raw["data"])], None)
    return payload, body


def _payload(
    item: RequestItem, buffers: list[memoryview], input_names: list[str], tensor_api: bool
) -> Any:
    kind = item.kind
    if kind == "json":
        return _json(buffers[0]) if buffers else None
    if kind == "raw":
        return decode_raw(bytes(buffers[0]), item.content_type, tensor_api)
    if kind == "parts":
        values = [decode_raw(p.data, p.content_type, tensor_api) for p in item_parts(item, buffers)]
        if len(input_names) > 1 and len(values) > 1:
            # A model with several inputs takes the parts in order (seed 004's multi-input model).
            return dict(zip(input_names, values, strict=False)) if tensor_api else values
        return values[-1] if values else None  # single-input APIs take the last part
    if kind == "tensors":
        return _tensor_payload(decode_tensors(item.tensors or [], buffers))
    raise InvalidInput(f"unknown request kind {kind!r}")


def _v2_response(
    result: Any, context: RequestContext, body: InferBody, output_names: list[str]
) -> tuple[ReplyItem, list[Any]]:
    """The finished V2 response body of a `v2json` item, as the V2 adapter would build it."""
    head: dict[str, Any] = {"model_name": context.api}
    if context.version is not None:
        head["model_version"] = context.version
    head["id"] = body.id if body.id is not None else context.request_id
    outputs = _quick_outputs(result, body)
    if outputs is not None:
        head["outputs"] = outputs
        return ReplyItem(buffers=1), [orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)]
    tensors = _wanted(to_output_tensors(result, output_names), body.outputs)
    payload, header_length = encode_infer_response(head, tensors, body.wants_binary)
    reply = ReplyItem(buffers=1)
    if header_length is not None:
        reply.content_type = "application/octet-stream"
        reply.headers = {"Inference-Header-Content-Length": str(header_length)}
    return reply, [payload]


def _quick_outputs(result: Any, body: InferBody) -> list[dict[str, Any]] | None:
    """The JSON outputs of the usual answer (a dict of numeric arrays, all outputs, no
    binary data) as `to_output_tensors` and `encode_infer_response` would write them,
    or None for any other answer, which takes that general way."""
    if type(result) is not dict or body.outputs or body.binary_outputs or body.binary_default:
        return None
    outputs: list[dict[str, Any]] = []
    for name, value in result.items():
        if type(value) is not np.ndarray:
            return None
        datatype = V2_BY_DTYPE_STR.get(value.dtype.str)
        if datatype is None:
            return None
        outputs.append(
            {
                "name": str(name),
                "datatype": datatype,
                "shape": list(value.shape),
                "data": value.ravel(),
            }
        )
    return outputs


def _wanted(tensors: list[Tensor], wanted: list[str] | None) -> list[Tensor]:
    if not wanted:
        return tensors
    unknown = [n for n in wanted if n not in {t.name for t in tensors}]
    if unknown:
        raise InvalidInput(
            f"unknown output '{unknown[0]}': the outputs are " + ", ".join(t.name for t in tensors)
        )
    return [t for t in tensors if t.name in wanted]


def encode_reply(
    result: Any,
    context: RequestContext,
    envelope: str,
    item: RequestItem,
    output_names: list[str],
    v2_body: InferBody | None = None,
) -> tuple[ReplyItem, list[Any]]:
    """The reply item and buffers of one successful item (`v2_body`: from `decode_payload`)."""
    if v2_body is not None:
        return _v2_response(result, context, v2_body, output_names)
    if not (
        item.want_tensors
        or context.status
        or context.response_headers
        or envelope == "hub"
        or isinstance(result, (bytes, bytearray, memoryview))
    ):  # the usual JSON answer: what the general way below makes of it, in one step
        return ReplyItem(buffers=1), [dumps(result)]
    reply = ReplyItem()
    buffers: list[Any]
    if item.want_tensors:
        tensors = _wanted(to_output_tensors(result, output_names), item.outputs)
        reply.tensors, buffers = encode_tensors(tensors)
    else:
        if envelope == "hub" and context.protocol == "native":
            result = {"statusCode": context.status or 200, "body": {"output": result}}
        body, reply.content_type = encode_result(result)
        buffers = [body]
    if context.status:
        reply.status = context.status
    if context.response_headers:
        headers = dict(context.response_headers)
        for name in [n for n in headers if n.lower() in ("content-type", "content-length")]:
            value = headers.pop(name)
            if name.lower() == "content-type":
                reply.content_type = value  # the one Content-Type of the answer
        if headers:
            reply.headers = headers
    reply.buffers = len(buffers)
    return reply, buffers


def encode_chunk(value: Any) -> tuple[bytes, str]:
    """One streamed item: bytes as they are, str as UTF-8 text, anything else as JSON."""
    if isinstance(value, str):
        return value.encode(), "text/plain; charset=utf-8"
    return encode_result(value)
