"""The one internal request/response pair every protocol adapter speaks.

Adapters translate HTTP into an `InferenceRequest` and an `InferenceResponse`
back into HTTP; the worker transport and the runtimes never see HTTP. The body
travels as the raw bytes the client sent, so JSON is parsed exactly once, in
the worker, and never re-encoded between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass(slots=True)
class WorkerSpec:
    """What a worker process needs to load one API version; plain data, sent as msgpack."""

    api: str
    version: str | None
    runtime: str
    model_path: str | None = None
    request_handler: str | None = None
    handler: str | None = None
    signature_key: str | None = None
    method: str = "predict"
    trusted: bool = False
    signature: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    python_path: str | None = None
    threads: int = 1
    cpus: list[int] | None = None  # CPU affinity of this replica
    gpu: int = 0  # compute.gpu: runtimes that can use a GPU pick CUDA when > 0
    max_batch_size: int = 1
    response_envelope: str = "none"
    tracker_key: str | None = None
    tracker_type: str | None = None  # "classification" | "regression" | None
    # Whether a 500 from user code carries the exception's message (worker.to_kiln_error).
    expose_errors: bool = False
    # The project's Python environment (kiln.environments): folders appended to sys.path
    # before user code is imported. The worker needs nothing else of the environment.
    site_dirs: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class TensorPayload(dict):  # type: ignore[type-arg]
    """Named numpy arrays from a typed (V2) request: tensor runtimes skip the JSON hooks."""
