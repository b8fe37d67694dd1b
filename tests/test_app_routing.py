"""Which adapter the inference app asks first (protocols/app.py `_route`).

Adapters that declare `owns` (first path segments reserved for their protocol,
config/blocks.py RESERVED_NAMES) get such paths first and the others are not
asked; any other path is offered to every adapter in order, and a path its owner
declines still goes through the whole list.
"""

from __future__ import annotations

from typing import Any

from kiln.protocols.app import InferenceApp
from kiln.protocols.http import Request
from kiln.serving.router import Registry


class Recording:
    """An adapter that claims the paths in `claims` and records every path it is offered."""

    def __init__(self, name: str, claims: set[str], owns: tuple[str, ...] = ()) -> None:
        self.name, self.claims, self.owns = name, claims, owns
        self.offered: list[str] = []

    def route(self, request: Request, call: Any) -> tuple[Any, str] | None:
        self.offered.append(request.path)
        return (self.name, "kiln") if request.path in self.claims else None

    def render_error(self, err: Any, request_id: str) -> dict[str, Any]:
        return {}


def request(path: str) -> Request:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    return Request(scope, None)  # type: ignore[arg-type]


def test_owned_segments_go_to_their_owner_and_the_rest_scan_in_order() -> None:
    native = Recording("native", {"/mlp"})
    torchserve = Recording("ts", {"/predictions/mlp"}, owns=("predictions", "ping"))
    v2 = Recording("v2", {"/v2/models/mlp/infer"}, owns=("v2",))
    app = InferenceApp(Registry(), log=None, adapters=[native, torchserve, v2])  # type: ignore[list-item]
    call = app.plane.call(None)

    routed, adapter = app._route(request("/v2/models/mlp/infer"), call)
    assert routed == ("v2", "kiln") and adapter is v2
    assert native.offered == [] and torchserve.offered == []  # not asked at all

    routed, adapter = app._route(request("/predictions/mlp"), call)
    assert adapter is torchserve and native.offered == [] and v2.offered == ["/v2/models/mlp/infer"]

    routed, adapter = app._route(request("/mlp"), call)  # no owner: every adapter, in order
    assert adapter is native and native.offered == ["/mlp"]

    routed, adapter = app._route(request("/v2/nothing"), call)  # declined by its owner
    assert routed is None and adapter is None
    assert native.offered[-1] == "/v2/nothing" and torchserve.offered[-1] == "/v2/nothing"
    assert v2.offered.count("/v2/nothing") == 2  # first as the owner, then in the scan
