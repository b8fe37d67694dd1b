"""What a worker runs for one request: hooks, the model, and the debug trace.

Tensor runtimes follow the seed-era flow (raw sample -> pre_inference ->
inference -> post_inference); Python handlers are called as they are.
`stages` collects the four values for `?debug=true`.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import numpy as np

from kiln.handlers.context import RequestContext
from kiln.handlers.python_handler import PythonHandler
from kiln.handlers.request_hooks import RequestHooks
from kiln.runtimes import TENSOR_RUNTIMES, load_runtime
from kiln.serving.types import WorkerSpec

Stages = list[tuple[str, Any]] | None


class Pipeline:
    """Base: `load` once, then `predict` per request."""

    def signature(self) -> dict[str, Any]:
        return {"inputs": [], "outputs": []}

    def predict(self, payload: Any, context: RequestContext, stages: Stages) -> Any:
        raise NotImplementedError


class TensorPipeline(Pipeline):
    def __init__(self, spec: WorkerSpec) -> None:
        self.runtime = load_runtime(spec)
        self.hooks = RequestHooks(
            spec.request_handler, self.runtime.handler_signature(), spec.metadata
        )

    def signature(self) -> dict[str, Any]:
        return self.runtime.signature.describe()

    def predict(self, payload: Any, context: RequestContext, stages: Stages) -> Any:
        sample = payload
        if stages is not None:
            stages.append(("raw sample", sample))
        if self.hooks.pre is not None:
            sample = self.hooks.pre(sample)
            if stages is not None:
                stages.append(("after pre_inference", sample))
        tensors, unbatched = self.runtime.signature.to_tensors(sample)
        outputs = self.runtime.run(tensors)
        if stages is not None:
            stages.append(("after inference", outputs))
        if self.hooks.post is not None:
            result = self.hooks.post(outputs)
            if stages is not None:
                stages.append(("after post_inference", result))
            return result
        return self._format(outputs, unbatched)

    def _format(self, outputs: list[Any], unbatched: bool) -> Any:
        if unbatched:
            outputs = [o[0] if isinstance(o, np.ndarray) and o.ndim else o for o in outputs]
        if len(outputs) == 1:
            return outputs[0]
        return {
            spec.name: out
            for spec, out in zip(self.runtime.signature.outputs, outputs, strict=False)
        }


class PythonPipeline(Pipeline):
    def __init__(self, spec: WorkerSpec) -> None:
        self.handler = PythonHandler(spec)
        self._loop: asyncio.AbstractEventLoop | None = None

    def signature(self) -> dict[str, Any]:
        return self.handler.declared_signature or {"inputs": [], "outputs": []}

    def predict(self, payload: Any, context: RequestContext, stages: Stages) -> Any:
        if stages is not None:
            stages.append(("raw sample", payload))
        result = self.handler.predict(payload, context)
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            result = self._loop.run_until_complete(result)
        if inspect.isgenerator(result):
            result = list(result)  # streaming routes come later; plain routes get every chunk
        if stages is not None:
            stages.append(("after inference", result))
        return result


def build_pipeline(spec: WorkerSpec) -> Pipeline:
    if spec.runtime in TENSOR_RUNTIMES:
        return TensorPipeline(spec)
    if spec.runtime == "python":
        return PythonPipeline(spec)
    from kiln.runtimes import MissingFramework

    raise MissingFramework(
        f"API '{spec.api}' uses the {spec.runtime} runtime, which this version of Kiln "
        f"does not serve yet; use a python: handler that loads the model instead"
    )
