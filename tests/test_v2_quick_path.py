"""The worker's quick paths for the usual V2 JSON request and answer (serving/payloads.py
`_quick_v2`, `_quick_outputs`) give what the general path (parse, check against the
signature, decode; to_output_tensors, encode_infer_response) gives, and leave every other
request or answer, good or bad, to the general path and its messages."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from kiln.errors import InvalidInput
from kiln.handlers.context import RequestContext
from kiln.serving.messages import RequestItem
from kiln.serving.payloads import _quick_outputs, _quick_v2, _v2_response, _wanted, decode_payload
from kiln.serving.v2_response import encode_infer_response
from kiln.serving.v2_signature import check_signature
from kiln.serving.v2_tensors import decode_inputs, parse_infer_body
from kiln.serving.wire import to_output_tensors

SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}
ITEM = RequestItem("req-1", kind="v2json", buffers=1, protocol="v2", want_tensors=True)


def _general(body: bytes) -> tuple[dict[str, np.ndarray], Any]:
    parsed = parse_infer_body(memoryview(body), None)
    check_signature(parsed, SIGNATURE)
    return {t.name: t.data for t in decode_inputs(parsed)}, parsed


def _decode(body: bytes) -> tuple[Any, Any]:
    return decode_payload(ITEM, [memoryview(body)], ["x"], True, SIGNATURE)


def _input(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "shape": [2, 4], "datatype": "FP32", **fields}


GOOD = [
    {"inputs": [_input(data=list(range(8)))]},
    {"inputs": [_input(data=[[0.5, 1, 2, 3], [4, 5, 6, 7.25]])]},
    {"id": "abc", "inputs": [_input(shape=[1, 4], data=[1e30, -2.5, 0, 3])]},
    {"id": None, "inputs": [_input(shape=[0, 4], data=[])]},
]


@pytest.mark.parametrize("request_body", GOOD)
def test_quick_path_matches_the_general_path(request_body: dict[str, Any]) -> None:
    body = orjson.dumps(request_body)
    quick = _quick_v2(memoryview(body), SIGNATURE)
    assert quick is not None, "the usual request takes the quick path"
    payload, parsed = quick
    tensors, general = _general(body)
    assert list(payload) == list(tensors)
    for name, array in tensors.items():
        assert payload[name].dtype == array.dtype
        assert payload[name].shape == array.shape
        assert np.array_equal(payload[name], array)
    assert parsed == general


UNUSUAL_BUT_GOOD = [
    {"inputs": [_input(data=list(range(8)))], "outputs": [{"name": "y"}]},
    {"inputs": [_input(data=list(range(8)), parameters={})]},
    {"inputs": [_input(data=list(range(8)))], "parameters": {"binary_data_output": True}},
    {"inputs": [_input(data=list(range(8)))], "extra": 1},
]


@pytest.mark.parametrize("request_body", UNUSUAL_BUT_GOOD)
def test_other_requests_take_the_general_path(request_body: dict[str, Any]) -> None:
    body = orjson.dumps(request_body)
    assert _quick_v2(memoryview(body), SIGNATURE) is None
    payload, parsed = _decode(body)
    tensors, general = _general(body)
    assert np.array_equal(payload["x"], tensors["x"])
    assert parsed == general


BAD = [
    b"not json",
    b"[1, 2]",
    b'{"inputs": []}',
    b'{"id": 5, "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1]}]}',
    orjson.dumps({"inputs": [_input(name="z", data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(datatype="FP64", data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(datatype="FP3", data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(shape=[2, 3], data=list(range(6)))]}),
    orjson.dumps({"inputs": [_input(shape=[8], data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(shape=[2, -4], data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(shape=[2, True], data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(shape="2x4", data=list(range(8)))]}),
    orjson.dumps({"inputs": [_input(data=list(range(7)))]}),
    orjson.dumps({"inputs": [_input(data=[[1, 2, 3, 4], [5, 6, 7]])]}),
    orjson.dumps({"inputs": [_input(data=["a"] * 8)]}),
    orjson.dumps({"inputs": [_input(data=[True] * 8)]}),
    orjson.dumps({"inputs": [_input(data=None)]}),
    orjson.dumps({"inputs": [_input()]}),
    orjson.dumps({"inputs": [_input(data=list(range(8))), _input(data=list(range(8)))]}),
]


@pytest.mark.parametrize("body", BAD)
def test_bad_requests_get_the_general_paths_error(body: bytes) -> None:
    assert _quick_v2(memoryview(body), SIGNATURE) is None
    with pytest.raises(InvalidInput) as general:
        _general(body)
    with pytest.raises(InvalidInput) as worker:
        _decode(body)
    assert str(worker.value) == str(general.value)


def _general_answer(result: Any, body: Any) -> bytes:
    head: dict[str, Any] = {"model_name": "m", "id": body.id or "req-1"}
    tensors = _wanted(to_output_tensors(result, ["y"]), body.outputs)
    return encode_infer_response(head, tensors, body.wants_binary)[0]


ANSWERS = [
    {"y": np.arange(8, dtype=np.float32).reshape(2, 4)[:, ::2]},  # not contiguous
    {"y": np.array([[1.5, -2]], dtype=np.float64), "z": np.array([True, False])},
    {"y": np.array([3], dtype=np.int64), "z": np.zeros((0, 2), dtype=np.uint8)},
    {},
]


@pytest.mark.parametrize("result", ANSWERS)
@pytest.mark.parametrize("request_body", [GOOD[0], GOOD[2]])
def test_quick_answer_matches_the_general_encoding(
    result: dict[str, Any], request_body: dict[str, Any]
) -> None:
    _, body = _decode(orjson.dumps(request_body))
    context = RequestContext("req-1", "m", protocol="v2", wants_tensors=True)
    reply, buffers = _v2_response(result, context, body, ["y"])
    assert buffers == [_general_answer(result, body)]
    assert (reply.content_type, reply.headers, reply.buffers) == ("application/json", None, 1)


@pytest.mark.parametrize(
    "result",
    [{"y": np.array(["a", "b"])}, {"y": [1.0, 2.0]}, np.zeros(2, np.float32)],
)
def test_other_answers_take_the_general_encoding(result: Any) -> None:
    _, body = _decode(orjson.dumps(GOOD[0]))
    context = RequestContext("req-1", "m", protocol="v2", wants_tensors=True)
    assert _quick_outputs(result, body) is None
    assert _v2_response(result, context, body, ["y"])[1] == [_general_answer(result, body)]


def test_requested_or_binary_outputs_take_the_general_encoding() -> None:
    result = {"y": np.ones((1, 2), np.float32), "z": np.zeros((1, 2), np.float32)}
    for request_body in (
        {**GOOD[0], "outputs": [{"name": "y"}]},
        {**GOOD[0], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        {**GOOD[0], "parameters": {"binary_data_output": True}},
    ):
        _, body = _decode(orjson.dumps(request_body))
        context = RequestContext("req-1", "m", protocol="v2", wants_tensors=True)
        assert _quick_outputs(result, body) is None
        assert _v2_response(result, context, body, ["y"])[1] == [_general_answer(result, body)]
