"""The one internal request/response pair every protocol adapter speaks.

Adapters translate HTTP into an `InferenceRequest` and an `InferenceResponse`
back into HTTP; the worker transport and the runtimes never see HTTP. The body
travels as the raw bytes the client sent, so JSON is parsed exactly once, in
the worker, and never re-encoded between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Re-exported: serving's modules read WorkerSpec here (its home is the leaf kiln.worker_spec).
from kiln.worker_spec import WorkerSpec


@dataclass(slots=True)
class Part:
    """One part of a multipart body (TorchServe's `curl -F data=@file`)."""

    name: str
    data: bytes
    content_type: str = ""
    filename: str | None = None


@dataclass(slots=True)
class Tensor:
    """A typed tensor (Open Inference Protocol): numeric data is a numpy array, BYTES a list."""

    name: str
    datatype: str
    shape: list[int]
    data: Any  # np.ndarray for numeric datatypes, list[bytes] for BYTES


@dataclass(slots=True)
class InferenceRequest:
    """One request for one API version, as the worker will receive it."""

    api: str
    version: str | None
    request_id: str
    body: bytes
    content_type: str = "application/json"
    protocol: str = "native"
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    debug: bool = False
    deadline: float | None = None  # time.monotonic() value after which the answer is useless
    # How the worker turns the request into the handler's payload:
    #   "json"    the body is JSON (native, V1 routes); 400 when it is not
    #   "raw"     decoded as TorchServe does, by content_type: JSON -> object,
    #             text/* -> str, anything else -> bytes
    #   "parts"   multipart: `parts`, each decoded like "raw"
    #   "tensors" typed tensors (V2): `tensors`, given to tensor runtimes as they are
    #   "v2json"  a V2 JSON request body (no binary data): the worker parses it, checks
    #             it against the signature and answers with the V2 response body
    kind: str = "json"
    parts: list[Part] | None = None
    tensors: list[Tensor] | None = None
    want_tensors: bool = False  # answer with typed output tensors (V2)
    outputs: list[str] | None = None  # the output names a V2 client asked for
    trace: Any = None  # serving/tracing.py RequestTrace when this request is traced


@dataclass(slots=True)
class InferenceResponse:
    """The worker's answer: already-encoded body bytes plus what HTTP needs."""

    body: bytes
    content_type: str = "application/json"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    debug_stages: list[tuple[str, str]] = field(default_factory=list)
    batch_size: int = 1  # how many requests shared the model call (observability)
    tensors: list[Tensor] | None = None  # when the request asked for typed tensors
    tracked: list[Any] | None = None  # prediction-monitoring values (tracker:)
    handler_metrics: list[Any] | None = None  # [name, kind, value, unit]: context.metrics
    # The worker's wall-clock ns [received, model start, model end, encoded] (traced batches)
    worker_timings: list[int] | None = None


__all__ = ["InferenceRequest", "InferenceResponse", "Part", "Tensor", "WorkerSpec"]
