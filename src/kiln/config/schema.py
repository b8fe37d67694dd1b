"""The kiln.yaml resources: ``kind: api`` (``RealtimeAPI``), ``AsyncAPI``, ``BatchAPI``,
``deployment``.

Each resource is validated on its own here; the blocks it is made of live in
:mod:`kiln.config.blocks`. Cortex aliases (``predictor``, ``networking``) are
converted into their Kiln equivalents at validation time, so code reading an
ApiSpec only ever sees one shape. Checks that need the file system or the
other resources live in :mod:`kiln.config.checks`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kiln.config.asyncs import AsyncBlock
from kiln.config.batch import JobsBlock
from kiln.config.blocks import (
    _VERSION,
    RESERVED_NAMES,
    RUNTIMES,
    Auth,
    Autoscaling,
    Batching,
    Compute,
    Networking,
    OnnxBlock,
    PredictorBlock,
    PythonBlock,
    ServerSideBatching,
    ServingOptions,
    SklearnBlock,
    TensorflowBlock,
    TorchBlock,
    Tracker,
    _Block,
    _empty_to_dict,
    check_endpoint,
    check_name,
    parse_handler_ref,
)
from kiln.config.errors import FieldProblem
from kiln.config.policy import check_env
from kiln.config.torchserve import TorchServeBlock
from kiln.config.traffic import ShadowBlock, check_header, parse_traffic

__all__ = [
    "RESERVED_NAMES",
    "RUNTIMES",
    "ApiSpec",
    "AsyncApiSpec",
    "Auth",
    "Autoscaling",
    "BatchApiSpec",
    "Batching",
    "Compute",
    "Deployment",
    "Networking",
    "OnnxBlock",
    "PredictorBlock",
    "PythonBlock",
    "ServerSideBatching",
    "ServingOptions",
    "SklearnBlock",
    "TensorflowBlock",
    "TorchBlock",
    "Tracker",
    "check_endpoint",
    "check_name",
    "parse_handler_ref",
]


class Deployment(_Block):
    kind: Literal["deployment"]
    name: str
    env: dict[str, str] = Field(default_factory=dict)
    """Variables every API of the deployment's workers get (an API's own ``env:`` wins)."""

    _name = field_validator("name")(lambda v: check_name(v, "deployment"))
    _env = field_validator("env", mode="before")(lambda v: check_env(v))


class _Resource(_Block):
    """Fields shared by realtime and batch APIs."""

    name: str
    endpoint: str | None = None
    python_path: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    compute: Compute = Field(default_factory=Compute)
    networking: Networking | None = None
    env: dict[str, str] = Field(default_factory=dict)
    """Variables the API's workers get; after loading, the deployment's ``env:`` is merged
    under them (the project's ``.env`` is not: see ``Project.worker_env``)."""
    _aliases: dict[str, str] = PrivateAttr(default_factory=dict)
    _dotenv: dict[str, str] = PrivateAttr(default_factory=dict)  # the project's .env, at load

    _name = field_validator("name")(lambda v: check_name(v))
    _env = field_validator("env", mode="before")(lambda v: check_env(v))
    _endpoint = field_validator("endpoint")(lambda v: None if v is None else check_endpoint(v))
    _blocks = field_validator("config", "compute", mode="before")(lambda v: _empty_to_dict(v))

    def _take_networking(self) -> None:
        if self.networking is None:
            return
        if self.networking.endpoint is not None:
            if self.endpoint is not None:
                raise FieldProblem(
                    "endpoint is set twice (endpoint and networking.endpoint)",
                    "keep only one of them",
                    field="networking.endpoint",
                )
            self.endpoint = check_endpoint(self.networking.endpoint)
            self._aliases["endpoint"] = "networking.endpoint"
        self.networking = None

    @property
    def aliases(self) -> dict[str, str]:
        """Fields filled from a Cortex alias, mapped to where the user wrote them."""
        return self._aliases

    @property
    def worker_env(self) -> dict[str, str]:
        """What this API's workers get from their deployment (``ServedApi.extra_env``): its
        ``env:`` over the deployment's ``env:`` over the project's ``.env``. Never the
        server's environment; not part of ``model_dump`` (``.env`` values stay out of
        reports)."""
        return {**self._dotenv, **self.env}


class ApiSpec(_Resource):
    """A realtime API (``kind: api``; Cortex ``kind: RealtimeAPI`` is accepted)."""

    kind: Literal["api"] = "api"
    version: str | None = None
    default: bool | None = None
    onnx: OnnxBlock | None = None
    tensorflow: TensorflowBlock | None = None
    torch: TorchBlock | None = None
    sklearn: SklearnBlock | None = None
    python: PythonBlock | None = None
    torchserve: TorchServeBlock | None = None
    predictor: PredictorBlock | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    tracker: Tracker | None = None
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    batching: Batching | None = None
    serving: ServingOptions = Field(default_factory=ServingOptions)
    auth: Auth = Field(default_factory=Auth)
    response_envelope: Literal["none", "hub"] = "none"
    network: Literal["none", "egress"] = "none"
    """`egress`: the API's workers may open outbound connections (plans allow it or not)."""
    traffic: dict[str, int] | None = None
    """Weights of the API's versions for unversioned requests (on one entry only)."""
    shadow: ShadowBlock | None = None
    """Mirror a percent of unversioned requests to a version; its answers are dropped."""
    traffic_sticky_header: str | None = None
    """A header whose value keeps one client on one version of the split."""

    _traffic = field_validator("traffic", mode="before")(lambda v: parse_traffic(v))
    _sticky = field_validator("traffic_sticky_header", mode="before")(lambda v: check_header(v))

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        return "api" if v == "RealtimeAPI" else v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not _VERSION.match(v):
            raise FieldProblem(
                f"invalid version {v!r}: it appears in URLs",
                "use letters, digits, '.', '_' or '-', e.g. version: \"2\"",
            )
        return v

    _more_blocks = field_validator("metadata", "autoscaling", "serving", "auth", mode="before")(
        lambda v: _empty_to_dict(v)
    )
    _envelope = field_validator("response_envelope", mode="before")(
        lambda v: "none" if v is None else v
    )

    @model_validator(mode="after")
    def _one_runtime(self) -> ApiSpec:
        self._take_networking()
        given = _runtime_blocks(self)
        if not given:
            raise FieldProblem(
                "no runtime block: the API does not say how to run its model",
                "add exactly one of: onnx, tensorflow, torch, sklearn, python, torchserve "
                "(or a Cortex predictor block)",
            )
        if len(given) > 1:
            raise FieldProblem(
                f"more than one runtime block ({', '.join(given)})",
                f"keep exactly one of {', '.join(given)}; split the rest into separate APIs",
                field=given[1],
            )
        if self.predictor is not None:
            self._convert_predictor(self.predictor)
        return self

    def _convert_predictor(self, p: PredictorBlock) -> None:
        """Turn a Cortex predictor block into the equivalent Kiln runtime block."""
        al = self._aliases
        if p.type == "python":
            self.python = PythonBlock(handler=p.path, model=p.model)
            al.update({"python.handler": "predictor.path", "python.model": "predictor.model"})
        elif p.type == "onnx":
            self.onnx = OnnxBlock(model=p.model or "", request_handler=p.path)
            al.update({"onnx.model": "predictor.model", "onnx.request_handler": "predictor.path"})
        else:
            self.tensorflow = TensorflowBlock(
                model=p.model or "", request_handler=p.path, signature_key=p.signature_key
            )
            al.update(
                {
                    "tensorflow.model": "predictor.model",
                    "tensorflow.request_handler": "predictor.path",
                }
            )
        self.config = {**p.config, **self.config}
        if p.python_path is not None and self.python_path is None:
            self.python_path = p.python_path
            al["python_path"] = "predictor.python_path"
        if p.server_side_batching is not None and self.batching is None:
            ssb = p.server_side_batching
            self.batching = Batching(
                max_batch_size=ssb.max_batch_size, max_batch_delay_ms=ssb.batch_interval * 1000
            )
        self.predictor = None

    @property
    def runtime(self) -> str:
        """Which runtime serves this API: onnx, tensorflow, torch, sklearn or python."""
        for name in RUNTIMES:
            if getattr(self, name) is not None:
                return name
        raise ValueError(f"api {self.name!r} has no runtime block")

    @property
    def runtime_block(
        self,
    ) -> OnnxBlock | TensorflowBlock | TorchBlock | SklearnBlock | PythonBlock | TorchServeBlock:
        """The one runtime block that is set."""
        return getattr(self, self.runtime)

    @property
    def model_path(self) -> str | None:
        """Absolute model path (after load), or None when the runtime has none."""
        return getattr(self.runtime_block, "model", None)

    @property
    def request_handler_path(self) -> str | None:
        """Absolute request handler file for onnx/tensorflow APIs, else None."""
        return getattr(self.runtime_block, "request_handler", None)

    @property
    def display_version(self) -> str:
        """The version as shown to people; empty when the API is unversioned."""
        return self.version or ""


class AsyncApiSpec(ApiSpec):
    """Cortex's ``kind: AsyncAPI``: every field of ``kind: api`` plus ``async:``.

    It is served like a realtime API (its replicas, handlers, runtimes, scaling), so
    everything that takes an ``ApiSpec`` takes it; only its endpoint differs: ``POST``
    answers 202 ``{"id"}`` and the request runs from the state store's durable queue
    (kiln.control.asyncs), ``GET {endpoint}/{id}`` reads the status and result.
    """

    kind: Literal["AsyncAPI"] = "AsyncAPI"  # type: ignore[assignment]
    async_: AsyncBlock = Field(default_factory=AsyncBlock, alias="async")

    model_config = ConfigDict(**{**ApiSpec.model_config, "populate_by_name": True})

    _async_block = field_validator("async_", mode="before")(lambda v: _empty_to_dict(v))


class BatchApiSpec(_Resource):
    """A Cortex-style batch API (``kind: BatchAPI``), served by :mod:`kiln.batch`.

    Either ``predictor: {type: python, path}`` naming a ``PythonPredictor`` class
    (Cortex's contract), or one runtime block (onnx, tensorflow, torch, sklearn,
    python; a Cortex ``predictor`` of type onnx/tensorflow converts to one): then each
    batch runs through the model and its handlers, and results go to the job's output.
    """

    kind: Literal["BatchAPI"] = "BatchAPI"
    predictor: PredictorBlock | None = None
    onnx: OnnxBlock | None = None
    tensorflow: TensorflowBlock | None = None
    torch: TorchBlock | None = None
    sklearn: SklearnBlock | None = None
    python: PythonBlock | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    jobs: JobsBlock = Field(default_factory=JobsBlock)
    network: Literal["none", "egress"] = "none"
    """`egress`: the job workers may open outbound connections (plans allow it or not)."""

    _more_blocks = field_validator("metadata", "jobs", mode="before")(lambda v: _empty_to_dict(v))

    @model_validator(mode="after")
    def _one_runner(self) -> BatchApiSpec:
        self._take_networking()
        given = _runtime_blocks(self)
        if not given:
            raise FieldProblem(
                "no predictor: the BatchAPI does not say how to run a batch",
                "add predictor: {type: python, path: predictor.py} with a PythonPredictor "
                "class, or a runtime block such as onnx: {model: model.onnx}",
            )
        if len(given) > 1:
            raise FieldProblem(
                f"more than one predictor or runtime block ({', '.join(given)})",
                f"keep exactly one of {', '.join(given)}",
                field=given[1],
            )
        p = self.predictor
        if p is not None:
            self.config = {**p.config, **self.config}
            if p.python_path is not None and self.python_path is None:
                self.python_path = p.python_path
                self._aliases["python_path"] = "predictor.python_path"
            if p.type == "onnx":
                self.onnx = OnnxBlock(model=p.model or "", request_handler=p.path)
                self.predictor = None
            elif p.type == "tensorflow":
                self.tensorflow = TensorflowBlock(
                    model=p.model or "", request_handler=p.path, signature_key=p.signature_key
                )
                self.predictor = None
        return self

    @property
    def runtime(self) -> str:
        """ "predictor" for a PythonPredictor class, else the runtime serving the model."""
        if self.predictor is not None:
            return "predictor"
        return next(name for name in RUNTIMES if getattr(self, name) is not None)

    @property
    def runtime_block(self) -> Any:
        """The runtime block (None for a PythonPredictor)."""
        return None if self.predictor is not None else getattr(self, self.runtime)


def _runtime_blocks(spec: Any) -> list[str]:
    """The runtime blocks (and a Cortex `predictor`) a resource sets, in schema order."""
    given = [r for r in RUNTIMES if getattr(spec, r, None) is not None]
    if getattr(spec, "predictor", None) is not None:
        given.append("predictor")
    return given
