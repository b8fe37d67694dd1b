"""KServe's V1 protocol (TensorFlow-Serving style) on Kiln's inference port.

    GET  /v1/models              {"models": [names]}
    GET  /v1/models/{m}          {"name": m, "ready": true}; 503 while not ready
    POST /v1/models/{m}:predict  {"instances": [...]} or {"inputs": ...} -> {"predictions": [...]}
    POST /v1/models/{m}:explain  same body -> {"explanations": [...]}

Each instance's explanation is TorchServe's: the handler's `explain()` answer
as it is, or the built-in explainer's bare attribution lists (one per input,
shaped like the instance); `?format=kiln` gives Kiln's explanation objects.

Every instance is its own request to the API, as TorchServe's KServe envelope
does: the instances are submitted together, so the dynamic batcher groups
them (with `batching:` on, into one model call), and their answers come back
in order. An error in any instance fails the call with that error. Errors
are `{"error": "message"}`. These routes use the API's default version.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson

from kiln.errors import InvalidInput, KilnError, NotFound, Unavailable
from kiln.protocols.errors import kserve_error
from kiln.protocols.http import Request, Send, send_bytes, send_json
from kiln.protocols.torchserve import check_explanation_format, find_group, method_not_allowed
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ServedApi
from kiln.serving.types import InferenceRequest, InferenceResponse

_PREFIX = "/v1/models"
_SYSTEM = "kiln"
_FORWARDED_HEADERS = ("user-agent", "x-request-id")
_ACTIONS = {"predict": "predictions", "explain": "explanations"}


def instances_of(document: Any) -> list[Any]:
    """The instances of a V1 body: `instances` rows, or TF-Serving's columnar `inputs`.

    `{"inputs": {"a": [a1, a2], "b": [b1, b2]}}` (named columns of one length)
    becomes the rows `{"a": a1, "b": b1}` and `{"a": a2, "b": b2}`; a list of
    `inputs` is rows already; any other `inputs` value is one instance.
    """
    if not isinstance(document, dict) or not ("instances" in document or "inputs" in document):
        raise InvalidInput(
            'the body must be a JSON object with "instances": [...] (one item per '
            'instance) or "inputs": ... (columnar), e.g. {"instances": [[1, 2, 3]]}'
        )
    if "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise InvalidInput(
                f'"instances" must be a list with one item per instance, '
                f"got {type(instances).__name__}"
            )
        return instances
    inputs = document["inputs"]
    if isinstance(inputs, list):
        return inputs
    if isinstance(inputs, dict) and inputs and all(isinstance(v, list) for v in inputs.values()):
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) == 1:
            count = lengths.pop()
            return [{name: column[i] for name, column in inputs.items()} for i in range(count)]
    return [inputs]


class _Instances(msgspec.Struct):
    """`{"instances": [...]}` with each instance left as its JSON text (`instance_bodies`)."""

    instances: list[msgspec.Raw]


_INSTANCES = msgspec.json.Decoder(_Instances)


def instance_bodies(body: bytes) -> list[bytes]:
    """Each instance of a V1 body as JSON text, for the worker to parse (as native bodies).

    The usual `{"instances": [...]}` is only scanned: each instance's bytes are cut out
    as they came, never parsed into Python objects and encoded again (an mlp instance of
    256 numbers: 13 us -> 2 us of the server's time). Anything else (columnar
    `inputs`, a malformed body) is parsed in full by `instances_of`, which says what
    is wrong.
    """
    try:
        return [bytes(raw) for raw in _INSTANCES.decode(body).instances]
    except msgspec.DecodeError:  # ValidationError included: not the plain form
        pass
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    return [orjson.dumps(instance) for instance in instances_of(document)]


def answer_json(response: InferenceResponse) -> bytes:
    """One instance's answer as JSON text, to splice into the list of answers.

    JSON answers are used as the worker encoded them (never parsed again);
    text becomes a JSON string; bytes become `{"b64": ...}` (TF-Serving's form).
    """
    ctype = response.content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return response.body or b"null"
    if ctype.startswith("text/"):
        return orjson.dumps(response.body.decode("utf-8", "replace"))
    return orjson.dumps({"b64": base64.b64encode(response.body).decode("ascii")})


class KServeV1:
    """`/v1/models...` in KServe V1's shapes."""

    owns = ("v1",)  # first path segments only this adapter serves (app.py routes them here)

    def __init__(self, plane: DataPlane, log: Any) -> None:
        self.plane = plane
        self.log = log

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return kserve_error(err, request_id)

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        path = request.path.rstrip("/")
        if path == _PREFIX:
            return self._list, _SYSTEM
        if not path.startswith(_PREFIX + "/"):
            return None
        rest = path[len(_PREFIX) + 1 :]
        name, _, action = rest.partition(":")
        if "/" in rest or not name or (action and action not in _ACTIONS):
            return self._bad_path, _SYSTEM
        group = find_group(call.view, name)
        api_name = group.name if group is not None else _SYSTEM

        async def handler(req: Request, send: Send, call: Call) -> int:
            found = find_group(call.view, name)
            if found is None:
                raise NotFound(f"Model with name {name} does not exist.")
            served = self.plane.pick(call, found, None, req.headers) if action else found.default
            if not action:
                return await self._status(req, send, call, served, name)
            return await self._infer(req, send, call, served, action)

        return handler, api_name

    async def _bad_path(self, request: Request, send: Send, call: Call) -> int:
        raise NotFound(
            f"no route {request.path}; V1 routes are /v1/models, /v1/models/{{name}}, "
            f"/v1/models/{{name}}:predict and /v1/models/{{name}}:explain"
        )

    async def _list(self, request: Request, send: Send, call: Call) -> int:
        if request.method not in ("GET", "HEAD"):
            raise method_not_allowed(request, ("GET",))
        await send_json(send, 200, {"models": list(call.view.groups)}, request.request_id)
        return 200

    async def _status(
        self, request: Request, send: Send, call: Call, served: ServedApi, name: str
    ) -> int:
        if request.method not in ("GET", "HEAD"):
            raise method_not_allowed(request, ("GET",))
        if served.state != "ready":
            error = self.plane.shown_error(call, served)
            detail = f": {error}" if error else ""
            raise Unavailable(
                f"Model with name {name} is not ready ({served.state}{detail})", retry_after=1
            )
        await send_json(send, 200, {"name": name, "ready": True}, request.request_id)
        return 200

    async def _infer(
        self, request: Request, send: Send, call: Call, served: ServedApi, action: str
    ) -> int:
        if request.method != "POST":
            raise method_not_allowed(request, ("POST",))
        if action == "explain":
            check_explanation_format(request)
        plane = self.plane
        plane.admit(call, served.name)
        body = await request.body(served.api.serving.max_request_bytes)
        given = request.headers
        headers = {k: given[k] for k in _FORWARDED_HEADERS if k in given}
        requests = [
            InferenceRequest(
                api=served.name,
                version=served.version,
                request_id=request.request_id,
                body=instance,
                content_type="application/json",
                protocol="v1",
                headers=headers,
                query=dict(request.query),
                kind="json",
            )
            for instance in instance_bodies(body)
        ]
        method = plane.predict if action == "predict" else plane.explain
        if len(requests) == 1:
            # The common case: one instance is awaited in this task. Gathering it would cost
            # a task, a semaphore and three more event-loop turns (~0.1 ms at c=1 on the
            # reference box, docs/performance.md) for the same answer.
            answers = [await method(call, served, requests[0])]
        else:

            def one(inference: InferenceRequest) -> Awaitable[InferenceResponse]:
                return method(call, served, inference)

            window = max(
                1, min(len(requests), max(2 * served.max_batch_size, 32), served.queue.max_size)
            )
            answers = await _in_order(one, requests, window)
        key = _ACTIONS[action].encode()
        payload = b'{"' + key + b'":[' + b",".join(answer_json(a) for a in answers) + b"]}"
        await send_bytes(send, 200, payload, "application/json", request.request_id)
        return 200


async def _in_order(
    call: Callable[[InferenceRequest], Awaitable[InferenceResponse]],
    requests: list[InferenceRequest],
    window: int,
) -> list[InferenceResponse]:
    """Run every request with at most `window` in flight; answers in order, first error wins.

    All instances are in the API's queue together (so they batch), but a very
    long list does not fill the queue alone and push other clients into 503s.
    """
    gate = asyncio.Semaphore(window)

    async def one(inference: InferenceRequest) -> InferenceResponse:
        async with gate:
            return await call(inference)

    outcomes = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]
