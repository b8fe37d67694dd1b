"""What user code receives with each request: the `context`, and typed payloads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestContext:
    """Facts about the request, and the two ways user code can shape its response."""

    request_id: str
    api: str
    version: str | None = None
    protocol: str = "native"
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    wants_tensors: bool = False  # a V2 client: answer with named arrays, skip the JSON hooks

    def set_status(self, code: int) -> None:
        """Answer with this HTTP status instead of 200."""
        if not 100 <= int(code) <= 599:
            raise ValueError(f"HTTP status must be between 100 and 599, got {code}")
        self.status = int(code)

    def set_header(self, name: str, value: str) -> None:
        """Add a response header (for example a Content-Type for bytes you return)."""
        self.response_headers[str(name)] = str(value)


class TensorPayload(dict):  # type: ignore[type-arg]
    """Named numpy arrays from a typed (V2) request: tensor runtimes skip the JSON hooks.

    Serving's worker builds it (serving/payloads.py) and the pipeline tells it from a
    JSON payload by its type, so it lives with the context, below both."""
