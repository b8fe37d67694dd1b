"""KServe V1 bodies on the server: each instance is cut out of the body as it came.

The server no longer parses `{"instances": [...]}` into Python objects and encodes
each instance again (docs/performance.md); the worker parses the instance's own
bytes. Other forms still get the full parse and its error messages.
"""

from __future__ import annotations

import orjson
import pytest

from kiln.errors import InvalidInput
from kiln.protocols.kserve_v1 import instance_bodies


def test_plain_instances_are_forwarded_as_the_client_wrote_them() -> None:
    body = b'{"signature_name": "x", "instances": [ [1, 2.50, 3] , {"a": "b"}, 7 ]}'
    # the bytes as sent (spacing and "2.50" kept): nothing was parsed and encoded again
    assert instance_bodies(body) == [b"[1, 2.50, 3]", b'{"a": "b"}', b"7"]


def test_columnar_inputs_still_become_one_instance_per_row() -> None:
    body = orjson.dumps({"inputs": {"a": [1, 2], "b": ["x", "y"]}})
    assert [orjson.loads(b) for b in instance_bodies(body)] == [
        {"a": 1, "b": "x"},
        {"a": 2, "b": "y"},
    ]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"instances": [1, 2', "not valid JSON"),
        (b'{"instances": {"a": 1}}', '"instances" must be a list'),
        (b"[1, 2]", 'must be a JSON object with "instances"'),
    ],
)
def test_malformed_bodies_get_the_full_parse_and_its_message(body: bytes, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        instance_bodies(body)
