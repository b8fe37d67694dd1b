"""The request context a handler gets (`Worker._context`): every fact in its own field.

`_context` builds `RequestContext` positionally, in field order (keywords cost
more, once per request). This test names every field, so a field added to or
moved in `RequestContext` without the same change in `_context` fails here
instead of handing a handler its headers as its query.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from kiln.handlers.context import RequestContext
from kiln.serving.messages import RequestItem
from kiln.serving.worker import Worker


def test_each_fact_lands_in_its_own_field() -> None:
    worker = Worker.__new__(Worker)  # only `spec` is read: no channel, no model
    worker.spec = SimpleNamespace(api="iris", version="2", metadata={"m": 1}, config={"c": 2})  # type: ignore[assignment]
    item = RequestItem(
        "rid-1", protocol="v2", headers={"h": "1"}, query={"q": "2"}, want_tensors=True
    )
    context = worker._context(item)
    assert [f.name for f in dataclasses.fields(RequestContext)] == [
        "request_id",
        "api",
        "version",
        "protocol",
        "headers",
        "query",
        "metadata",
        "config",
        "status",
        "response_headers",
        "wants_tensors",
    ]
    assert (context.request_id, context.api, context.version) == ("rid-1", "iris", "2")
    assert context.protocol == "v2" and context.wants_tensors is True
    assert context.headers == {"h": "1"} and context.query == {"q": "2"}
    assert context.metadata == {"m": 1} and context.config == {"c": 2}
    assert context.status is None and context.response_headers == {}
    bare = worker._context(RequestItem("rid-2"))  # no headers or query: empty dicts, own ones
    assert bare.headers == {} and bare.query == {} and bare.protocol == "native"
    assert bare.response_headers is not context.response_headers
