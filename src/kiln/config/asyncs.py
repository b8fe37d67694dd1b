"""The ``async:`` block of a ``kind: AsyncAPI`` entry (Cortex's AsyncAPI).

An AsyncAPI is a realtime API (every field of ``kind: api``) whose endpoint
answers ``POST`` with 202 and an id at once and runs the request from a durable
queue; ``GET {endpoint}/{id}`` reads its status and result (kiln.control.asyncs).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from kiln.config.blocks import _Block
from kiln.config.errors import FieldProblem
from kiln.quantities import parse_duration

DAY_S = 86400.0
_DAYS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*d\s*$")


def parse_ttl(value: object) -> float:
    """A duration that may also be written in days (``7d``): results are kept for days."""
    if isinstance(value, str):
        days = _DAYS.match(value)
        if days:
            return float(days.group(1)) * DAY_S
    return parse_duration(value)


class AsyncBlock(_Block):
    """How long results are kept, and where completions are announced."""

    result_ttl: float = Field(default=7 * DAY_S, gt=0)
    """Seconds a finished request's result stays readable (``7d``, ``12h``, ``30m``)."""
    webhook: str | None = None
    """An http(s) URL POSTed once with ``{id, status, result | error, timestamp}`` when a
    request finishes. Loopback, link-local and private addresses are refused unless the
    server allows them (``--webhook-allow CIDR``)."""

    _ttl = field_validator("result_ttl", mode="before")(lambda v: parse_ttl(v))

    @field_validator("webhook", mode="before")
    @classmethod
    def _webhook(cls, v: object) -> object:
        if v is None or v == "":
            return None
        if not isinstance(v, str):
            return v  # pydantic reports the type
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FieldProblem(
                f"webhook {v!r} is not an http(s) URL",
                "write a URL such as https://hooks.example.com/kiln",
            )
        if parts.username or parts.password:
            raise FieldProblem(
                "the webhook URL carries credentials (user:password@)",
                "put a token in the URL's path or query instead",
            )
        return v
