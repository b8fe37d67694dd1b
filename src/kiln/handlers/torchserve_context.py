"""TorchServe's `context`, as a handler's `handle(data, context)` and `initialize(context)` see it.

TorchServe hands handlers one context per batch: the model's facts
(`system_properties`, `manifest`, `model_yaml_config`), the batch's request ids
and headers, a per-request status and headers the handler may set, and
`metrics`. Kiln builds the same object from its own request contexts
(torchserve_handler.py) so handlers written for TorchServe run unchanged; the
`ts` shim (kiln/compat/shim_packages/ts) re-exports these classes as
`ts.context.Context` and `ts.utils.util.PredictionException`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SERVER_NAME = "Kiln"


class PredictionException(Exception):
    """Raised by a handler to answer with `error_code` and `message` (TorchServe's contract)."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


class Metrics:
    """`context.metrics`: what a handler records, collected per batch for Kiln's /metrics.

    Each call keeps (name, kind, value, unit); the worker sends them with the batch's
    reply and the server adds counters to `kiln_handler_metric_total` and sets
    times, sizes and percentages on `kiln_handler_metric` (control/metrics.py).
    Dimensions and the request index are accepted and not kept: Prometheus labels
    must be known in advance, and TorchServe's defaults (ModelName, Level) are the
    `api` and `version` labels already.
    """

    def __init__(self) -> None:
        self.recorded: list[list[Any]] = []

    def _add(self, name: str, kind: str, value: Any, unit: str) -> None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name!r} needs a number, got {value!r}") from None
        self.recorded.append([str(name), kind, number, str(unit)])

    def add_counter(self, name: str, value: Any, idx: Any = None, dimensions: Any = None) -> None:
        self._add(name, "counter", value, "count")

    def add_time(
        self, name: str, value: Any, idx: Any = None, unit: str = "ms", dimensions: Any = None
    ) -> None:
        self._add(name, "gauge", value, unit)

    def add_size(
        self, name: str, value: Any, idx: Any = None, unit: str = "MB", dimensions: Any = None
    ) -> None:
        self._add(name, "gauge", value, unit)

    def add_percent(
        self, name: str, value: Any, idx: Any = None, dimensions: Any = None, **_: Any
    ) -> None:
        self._add(name, "gauge", value, "percent")

    def add_metric(
        self,
        name: str,
        value: Any,
        unit: str = "count",
        idx: Any = None,
        dimensions: Any = None,
        metric_type: Any = None,
    ) -> None:
        """TorchServe's generic form; a `metric_type` of COUNTER adds, anything else sets."""
        kind = "counter" if "COUNTER" in str(metric_type or "").upper() else "gauge"
        self._add(name, kind, value, unit)

    def drain(self) -> list[list[Any]]:
        """What was recorded since the last drain (the worker takes it once per batch)."""
        out, self.recorded = self.recorded, []
        return out


class RequestProcessor:
    """One request of a batch: its headers, and the status and headers of its answer."""

    def __init__(self, request_header: dict[str, Any]) -> None:
        self._request_header = request_header
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}

    def get_request_property(self, key: str) -> Any:
        found = self._request_header.get(key)
        return found if found is not None else self._request_header.get(key.lower())

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = int(code)
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


Intermediate = Callable[[list[Any], Any, str, int], None]


class Context:
    """The model's facts and, during `handle`, the batch's requests (TorchServe's Context)."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any],
        batch_size: int,
        gpu: int | None,
        mms_version: str,
        limit_max_image_pixels: bool = True,
        metrics: Metrics | None = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": SERVER_NAME,
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] | None = None
        self.metrics = metrics if metrics is not None else Metrics()
        self.model_yaml_config = model_yaml_config or {}
        self.cl_socket = None
        self.stopping_criteria = None
        # Kiln's own: whether full-pickle weights may load (the block's `trusted:`), and
        # where send_intermediate_predict_response sends (set only while streaming).
        self.kiln_trusted = False
        self.kiln_intermediate: Intermediate | None = None

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    def get_request_id(self, idx: int = 0) -> str | None:
        return None if self.request_ids is None else self.request_ids.get(idx)

    def _processor(self, idx: int) -> RequestProcessor:
        if not self.request_processor:
            raise RuntimeError("there is no request outside handle(): headers exist per request")
        return self.request_processor[idx]

    def get_request_header(self, idx: int, key: str) -> Any:
        return self._processor(idx).get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self._processor(idx).get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        processor = self._processor(idx)
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        """The HTTP status of request `idx`'s answer (its body is still what handle returns)."""
        if self.request_processor:
            self.request_processor[idx].report_status(code, reason_phrase=phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self.request_processor or []:
            processor.report_status(code, reason_phrase=phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self._processor(idx).get_response_headers()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._processor(idx).add_response_property(key, value)
