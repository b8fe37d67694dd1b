"""What a worker process needs to load one API version: plain data, sent as msgpack.

It lives below every package that reads it (the runtimes and handlers inside the
worker, serving's placement and replicas in the server, batch workers), so none
of them imports another's package for it. It imports nothing of Kiln.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    serialized_file: str | None = None  # torchserve: the archive's --serialized-file
    model_file: str | None = None  # torchserve: the archive's --model-file
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
    # Busy-poll limit between requests, microseconds (serving/polling.py); 0: block at once.
    poll_us: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
