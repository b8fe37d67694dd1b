"""Placeholder adapter: being written (issue 3)."""

from __future__ import annotations

from typing import Any

from kiln.errors import KilnError
from kiln.protocols.errors import native_error


class KServeV1:
    def __init__(self, registry: Any, log: Any) -> None:
        self.registry = registry
        self.log = log

    def route(self, request: Any) -> None:
        return None

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return native_error(err, request_id)
