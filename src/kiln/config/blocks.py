"""The blocks inside a kiln.yaml resource: one strict pydantic model each.

Every block forbids unknown keys, because a misspelt key that is silently
ignored (``min_replica: 3``) is the most expensive kind of config bug. Values
are normalised here once (cpu in cores, memory in bytes, durations in
seconds, Cortex aliases converted) so the rest of Kiln reads plain numbers.

Checks that need the file system or the other resources (paths, endpoint
defaults, duplicates) live in :mod:`kiln.config.checks`; this module only
knows one resource at a time.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kiln.config.errors import FieldProblem
from kiln.quantities import parse_bytes, parse_cpu, parse_duration

RESERVED_NAMES: frozenset[str] = frozenset(
    {
        "ping",
        "healthz",
        "predictions",
        "explanations",
        "models",
        "v1",
        "v2",
        "metrics",
        "docs",
        "openapi.json",
        "api-description",
        "apis",
        "batch",
    }
)
RUNTIMES: tuple[str, ...] = ("onnx", "tensorflow", "torch", "sklearn", "python", "torchserve")

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENDPOINT = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_HANDLER_FILE = re.compile(r"^(?P<file>.+\.py)(?::(?P<obj>[A-Za-z_]\w*))?$")
_HANDLER_MODULE = re.compile(
    r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::(?P<obj>[A-Za-z_]\w*))?$"
)


def check_name(value: str, what: str = "API") -> str:
    """Names become URL segments and process names, so they are DNS labels."""
    if value in RESERVED_NAMES:
        raise FieldProblem(
            f"'{value}' is reserved: it would shadow Kiln's fixed route /{value}",
            f"rename it, e.g. '{value}-api' (reserved: {', '.join(sorted(RESERVED_NAMES))})",
        )
    if len(value) > 63 or not _DNS_LABEL.match(value):
        suggestion = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:63].strip("-")
        fix = "use lowercase letters, digits and '-', at most 63 characters"
        if suggestion and suggestion != value:
            fix += f", e.g. '{suggestion}'"
        raise FieldProblem(
            f"invalid {what} name {value!r}: it must be a DNS label "
            "([a-z0-9-], max 63, no leading or trailing '-')",
            fix,
        )
    return value


def check_endpoint(value: str) -> str:
    """Endpoints are URL paths served next to Kiln's fixed routes."""
    if not value.startswith("/"):
        raise FieldProblem(
            f"endpoint {value!r} must start with '/'", f"write endpoint: /{value.lstrip('/')}"
        )
    if not _ENDPOINT.match(value):
        raise FieldProblem(
            f"invalid endpoint {value!r}: use '/'-separated segments of letters, digits, "
            "'.', '_', '~' or '-', with no trailing '/'",
            "write e.g. endpoint: /shop/iris",
        )
    first = value.split("/")[1]
    if first in RESERVED_NAMES:
        raise FieldProblem(
            f"endpoint {value!r} starts with the reserved route /{first}",
            "choose a path that does not begin with a fixed route, e.g. /my-apis/...",
        )
    return value


def parse_handler_ref(value: str) -> tuple[str | None, str | None, str | None]:
    """Split ``file.py[:Name]`` or ``module.path[:Name]`` into (file, module, name)."""
    if m := _HANDLER_FILE.match(value):
        return m.group("file"), None, m.group("obj")
    if m := _HANDLER_MODULE.match(value):
        return None, m.group("module"), m.group("obj")
    raise FieldProblem(
        f"cannot read handler {value!r}",
        "write a file and class, e.g. model.py:Model, or an import path, e.g. mypkg.model:Model",
    )


def _empty_to_dict(value: Any) -> Any:
    """``config:`` with nothing after it is YAML null; treat it as an empty block."""
    return {} if value is None else value


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _HandlerRef:
    """Accessors shared by blocks whose ``handler`` is a file or module reference."""

    handler: Any

    @property
    def handler_file(self) -> str | None:
        """The ``.py`` file of the handler (absolute after load), if it is a file."""
        return parse_handler_ref(self.handler)[0] if self.handler else None

    @property
    def handler_module(self) -> str | None:
        """The import path of the handler, if it is given as ``module:Name``."""
        return parse_handler_ref(self.handler)[1] if self.handler else None

    @property
    def handler_object(self) -> str | None:
        """The class or function name after ``:``, if any."""
        return parse_handler_ref(self.handler)[2] if self.handler else None


class OnnxBlock(_Block):
    model: str
    request_handler: str | None = None


class TensorflowBlock(_Block):
    model: str
    request_handler: str | None = None
    signature_key: str | None = None


class TorchBlock(_Block, _HandlerRef):
    """TorchScript, torch.export (.pt2), or an eager module named by ``handler``.

    ``trusted`` allows full-pickle checkpoints, which run code when loaded;
    ``signature`` describes the inputs of formats that do not record them.
    """

    model: str
    handler: str | None = None
    trusted: bool = False
    signature: dict[str, Any] | None = None

    @field_validator("handler")
    @classmethod
    def _handler_form(cls, v: str | None) -> str | None:
        if v is not None:
            parse_handler_ref(v)
        return v


SKLEARN_METHODS: tuple[str, ...] = (
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
    "transform",
    "score_samples",
)


class SklearnBlock(_Block):
    """A skops file (safe), or a joblib/pickle file when ``trusted``; ``method`` is what to call.

    ``method`` is limited to inference methods so a config can never call ``fit``.
    """

    model: str
    method: str = "predict"
    trusted: bool = False

    @field_validator("method")
    @classmethod
    def _inference_method(cls, v: str) -> str:
        if v not in SKLEARN_METHODS:
            raise FieldProblem(
                f"sklearn method {v!r} is not an inference method",
                f"use one of: {', '.join(SKLEARN_METHODS)}",
            )
        return v


class PythonBlock(_Block, _HandlerRef):
    handler: str
    model: str | None = None
    signature: dict[str, Any] | None = None

    @field_validator("handler")
    @classmethod
    def _handler_form(cls, v: str) -> str:
        parse_handler_ref(v)
        return v


class ServerSideBatching(_Block):
    """Cortex predictor-era batching; converted into ``batching``."""

    max_batch_size: int = Field(ge=1)
    batch_interval: float = 0.0

    _dur = field_validator("batch_interval", mode="before")(lambda v: parse_duration(v))


class PredictorBlock(_Block):
    """Cortex predictor-era block (``predictor: {type, path, ...}``)."""

    type: Literal["python", "onnx", "tensorflow"]
    path: str
    model: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    python_path: str | None = None
    signature_key: str | None = None
    server_side_batching: ServerSideBatching | None = None

    _cfg = field_validator("config", mode="before")(lambda v: _empty_to_dict(v))

    @model_validator(mode="after")
    def _model_needed(self) -> PredictorBlock:
        if self.type in ("onnx", "tensorflow") and not self.model:
            raise FieldProblem(
                f"a {self.type} predictor needs a model",
                "add model: <path to the model>",
                field="model",
            )
        return self


class Tracker(_Block):
    key: str | None = None
    model_type: Literal["classification", "regression"]


class Compute(_Block):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=100, ge=1)
    init_replicas: int | None = Field(default=None, ge=0)
    target_cpu_utilization: int = Field(default=80, ge=1, le=100)
    cpu: float = 0.2
    gpu: int = 0
    mem: int | None = None

    _cpu = field_validator("cpu", mode="before")(lambda v: parse_cpu(v))

    @field_validator("gpu", mode="before")
    @classmethod
    def _whole_gpus(cls, v: Any) -> Any:
        if isinstance(v, float) and not v.is_integer():
            raise FieldProblem(
                f"gpu must be a whole number of GPUs; a fraction like {v} is not supported",
                "use gpu: 1 (or gpu: 0 for none)",
            )
        if isinstance(v, bool) or (isinstance(v, int | float) and v < 0):
            raise FieldProblem(f"gpu must be 0 or a positive whole number, got {v!r}", "use gpu: 1")
        return v

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> int | None:
        return None if v is None else parse_bytes(v)

    @model_validator(mode="after")
    def _replica_order(self) -> Compute:
        if self.init_replicas is None:
            # An API that may scale to zero still starts warm unless told otherwise
            # (`init_replicas: 0`), like Knative's initial scale of 1.
            self.init_replicas = max(self.min_replicas, 1)
        if self.min_replicas > self.max_replicas:
            raise FieldProblem(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})",
                "make min_replicas <= max_replicas",
                field="min_replicas",
            )
        if not self.min_replicas <= self.init_replicas <= self.max_replicas:
            raise FieldProblem(
                f"init_replicas ({self.init_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})",
                "make min_replicas <= init_replicas <= max_replicas",
                field="init_replicas",
            )
        return self


class Autoscaling(_Block):
    """Concurrency autoscaler knobs; durations are stored in seconds."""

    target_replica_concurrency: float | None = Field(default=None, gt=0)
    max_replica_concurrency: int = Field(default=1024, ge=1)
    window: float = 60.0
    downscale_stabilization_period: float = 300.0
    upscale_stabilization_period: float = 60.0
    max_downscale_factor: float = Field(default=0.75, gt=0, le=1)
    max_upscale_factor: float = Field(default=1.5, gt=1)
    downscale_tolerance: float = Field(default=0.05, ge=0)
    upscale_tolerance: float = Field(default=0.05, ge=0)
    idle_timeout: float | None = None
    cold_start_timeout: float = 60.0

    @field_validator(
        "window",
        "downscale_stabilization_period",
        "upscale_stabilization_period",
        "idle_timeout",
        "cold_start_timeout",
        mode="before",
    )
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("window")
    @classmethod
    def _window_step(cls, v: float) -> float:
        if v <= 0 or round(v * 1000) % 10000 != 0:
            raise FieldProblem(
                "window must be a positive multiple of 10s "
                f"(load is sampled every 10s), got {v:g}s",
                "use e.g. window: 10s, 20s or 60s",
            )
        return v


class Batching(_Block):
    """Dynamic batching, counted in rows."""

    max_batch_size: int = Field(default=1, ge=1)
    max_batch_delay_ms: float = Field(default=0.0, ge=0)


class ServingOptions(_Block):
    startup_timeout_s: float = Field(default=120.0, gt=0)
    response_timeout_s: float = Field(default=120.0, gt=0)
    max_retry_timeout_s: float = Field(default=300.0, ge=0)
    max_queue_size: int = Field(default=100, ge=1)
    max_request_bytes: int = 32 * 1024 * 1024
    # On `kiln server`, a 500 from the API's code names the exception's type and the
    # request id only; true also sends its message (`kiln serve` always does).
    expose_errors: bool = False

    _dur = field_validator(
        "startup_timeout_s", "response_timeout_s", "max_retry_timeout_s", mode="before"
    )(lambda v: parse_duration(v))
    _bytes = field_validator("max_request_bytes", mode="before")(
        lambda v: parse_bytes(v, what="request")
    )


class Auth(_Block):
    required: bool | None = None


class Networking(_Block):
    """Cortex predictor-era ``networking``; its endpoint moves to ``endpoint``."""

    endpoint: str | None = None
    api_gateway: Literal["public", "none"] | None = None
