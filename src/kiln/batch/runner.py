"""Inside a batch worker: what runs one batch, behind one small interface.

Two kinds, chosen by the BatchAPI's kiln.yaml entry:

- ``predictor``: the user's ``PythonPredictor`` (Cortex's contract):
  ``__init__(self, config, job_spec)``, ``predict(self, payload, batch_id)`` with
  the batch's items as a list, optional ``on_job_complete(self)``. Parameters are
  passed by name and only when declared, so older predictors without
  ``job_spec`` or ``batch_id`` run too. The return value is ignored unless the job
  has an ``output``: then it must be a list with one result per item.
- ``pipeline``: an API with a runtime block (onnx, tensorflow, torch, sklearn,
  python handler); each item goes through the same pipeline a realtime request
  does (pre_inference, the model, post_inference) and one model call per batch.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from kiln.errors import InferenceError, KilnError


class BatchFailed(KilnError):
    """A batch could not be run; the message says which item or rule failed."""

    type = "BatchFailed"


class Runner:
    """Runs batches; `results` are per item (None when the predictor returned nothing)."""

    has_results = False

    def run(self, items: list[Any], batch_id: str) -> list[Any] | None:
        raise NotImplementedError

    def on_job_complete(self) -> None:
        return None


def _call(func: Any, values: dict[str, Any]) -> Any:
    """Call `func` with the values it declares (by name), or all of them if it takes **kw."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func(**values)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return func(**values)
    positional = [
        p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if any(p.name not in values for p in positional if p.default is p.empty):
        # Names we do not know (e.g. `def predict(self, batch, id)`): pass in Cortex's order.
        ordered = list(values.values())[: len(positional)]
        return func(*ordered)
    return func(**{name: values[name] for name in params if name in values})


class PredictorRunner(Runner):
    def __init__(self, path: str, config: dict[str, Any], job_spec: dict[str, Any]) -> None:
        from kiln.user_modules import import_file

        module = import_file(path)
        cls = getattr(module, "PythonPredictor", None)
        if cls is None or not inspect.isclass(cls):
            raise InferenceError(
                f"{path} defines no PythonPredictor class; a BatchAPI predictor is a class "
                f"PythonPredictor with __init__(self, config, job_spec) and "
                f"predict(self, payload, batch_id)"
            )
        self.predictor = _call(cls, {"config": config, "job_spec": job_spec})
        if not callable(getattr(self.predictor, "predict", None)):
            raise InferenceError(f"PythonPredictor in {path} has no predict(payload, batch_id)")

    def run(self, items: list[Any], batch_id: str) -> list[Any] | None:
        result = _call(self.predictor.predict, {"payload": items, "batch_id": batch_id})
        if result is None:
            return None
        if isinstance(result, tuple):
            result = list(result)
        return result if isinstance(result, list) else [result]

    def on_job_complete(self) -> None:
        hook = getattr(self.predictor, "on_job_complete", None)
        if callable(hook):
            hook()


class PipelineRunner(Runner):
    has_results = True

    def __init__(
        self, worker_spec: dict[str, Any], batch_size: int, config: dict[str, Any]
    ) -> None:
        import dataclasses

        from kiln.handlers.pipeline import build_pipeline
        from kiln.serving.worker_load import add_site_dirs, local_model
        from kiln.worker_spec import WorkerSpec

        spec = WorkerSpec.from_wire(worker_spec)
        spec = dataclasses.replace(spec, max_batch_size=max(batch_size, 1), config=config)
        if spec.python_path and spec.python_path not in sys.path:
            sys.path.insert(0, spec.python_path)
        add_site_dirs(spec.site_dirs)
        self.spec = local_model(spec)
        self.pipeline = build_pipeline(self.spec)

    def run(self, items: list[Any], batch_id: str) -> list[Any]:
        from kiln.handlers.context import RequestContext

        contexts = [
            RequestContext(
                request_id=f"{batch_id}:{i}",
                api=self.spec.api,
                protocol="batch",
                metadata=self.spec.metadata,
                config=self.spec.config,
            )
            for i in range(len(items))
        ]
        results = self.pipeline.predict_batch(items, contexts, [None] * len(items))
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                message = result.message if isinstance(result, KilnError) else repr(result)
                raise BatchFailed(f"item {i} of batch {batch_id} failed: {message}")
        return results


def load_runner(plan: dict[str, Any], job_spec: dict[str, Any], batch_size: int) -> Runner:
    """Build what the job's plan names (raises whatever loading user code raises)."""
    config = job_spec.get("config") or {}
    from kiln.serving.worker_load import add_site_dirs

    add_site_dirs(plan.get("site_dirs") or [])  # the project's environment (requirements.txt)
    if plan["kind"] == "predictor":
        if plan.get("python_path") and plan["python_path"] not in sys.path:
            sys.path.insert(0, plan["python_path"])
        return PredictorRunner(plan["predictor_path"], config, job_spec)
    return PipelineRunner(plan["worker_spec"], batch_size, config)
