"""What a worker runs for a batch of requests: hooks, the model, and the debug trace.

Tensor runtimes follow the seed-era flow (raw sample -> pre_inference ->
inference -> post_inference) per item, with the model called once per group
of items whose tensors stack (same dtype and same shape past the batch axis):
items of different lengths are grouped, never padded, so no model sees rows
it was not sent. Python handlers get `predict_batch` when they define it and
`predict` per item otherwise. Every item keeps its own outcome: a failure is
an exception in that item's slot, never the whole batch's.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from itertools import accumulate
from typing import Any, cast

import numpy as np

from kiln.errors import InferenceError, NotImplementedByApi
from kiln.handlers.context import RequestContext, TensorPayload
from kiln.handlers.cortex_predictor import CortexPredictorHandler, predictor_class_name
from kiln.handlers.explain import feature_ablation, shaped_for
from kiln.handlers.python_handler import PythonHandler
from kiln.handlers.request_hooks import RequestHooks
from kiln.runtimes import TENSOR_RUNTIMES, load_runtime
from kiln.worker_spec import WorkerSpec

Stages = list[tuple[str, Any]] | None
# One item of a batch on its way to the model: (index, named tensors, whether the batch
# axis was added for it, its rows), the rows counted once.
Member = tuple[int, dict[str, np.ndarray], bool, int]


class BatchLengthMismatch(InferenceError):
    """`predict_batch` did not return one result per request: no answer can be matched
    to its request, so every request of the batch gets this 500 (and the log says why)."""

    def __init__(self, results: Any, expected: int) -> None:
        if isinstance(results, (list, tuple)):
            self.returned = f"{len(results)} results"
        else:
            self.returned = f"a {type(results).__name__}, not a list,"
        self.expected = expected
        super().__init__(
            f"predict_batch returned {self.returned} for {expected} requests; it must "
            f"return a list with one result per request, in order"
        )


class Pipeline:
    """Base: built (loaded) once, then `predict_batch` per batch of requests."""

    is_tensor = False
    can_explain = False

    def signature(self) -> dict[str, Any]:
        return {"inputs": [], "outputs": []}

    def explain(self, payload: Any, context: RequestContext) -> Any:
        raise NotImplementedByApi(
            f"API '{context.api}' has no explanations: add an explain(payload, context) "
            f"method to its handler class"
        )

    def stream(self, payload: Any, context: RequestContext) -> Iterator[Any]:
        """Items to stream: what a generator handler yields, else the one answer."""
        yield from self.predict_batch([payload], [context], [None])

    def predict_batch(
        self, payloads: list[Any], contexts: list[RequestContext], stages: list[Stages]
    ) -> list[Any]:
        raise NotImplementedError


class TensorPipeline(Pipeline):
    is_tensor = True
    can_explain = True

    def __init__(self, spec: WorkerSpec) -> None:
        self.runtime = load_runtime(spec)
        self.hooks = RequestHooks(
            spec.request_handler, self.runtime.handler_signature(), spec.metadata
        )
        self.max_rows = max(1, spec.max_batch_size)

    def signature(self) -> dict[str, Any]:
        return self.runtime.signature.describe()

    def _prepare(self, payload: Any, stages: Stages) -> tuple[dict[str, np.ndarray], bool]:
        sample = payload
        if stages is not None:
            stages.append(("raw sample", sample))
        if isinstance(payload, TensorPayload):  # V2: typed tensors go straight to the model
            return self.runtime.signature.to_tensors(payload)
        if self.hooks.pre is not None:
            sample = self.hooks.pre(sample)
            if stages is not None:
                stages.append(("after pre_inference", sample))
        return self.runtime.signature.to_tensors(sample)

    def _finish(
        self, outputs: list[Any], unbatched: bool, stages: Stages, context: RequestContext
    ) -> Any:
        if stages is not None:
            stages.append(("after inference", outputs))
        names = self.runtime.signature.output_names
        if context.wants_tensors:
            if unbatched:
                outputs = [o[0] if isinstance(o, np.ndarray) and o.ndim else o for o in outputs]
            return dict(zip(names, outputs, strict=False))
        if self.hooks.post is not None:
            result = self.hooks.post(self.runtime.handler_prediction(outputs))
            if stages is not None:
                stages.append(("after post_inference", result))
            return result
        if len(outputs) == 1:  # most models: no list, no dict
            value = outputs[0]
            return value[0] if unbatched and isinstance(value, np.ndarray) and value.ndim else value
        if unbatched:
            outputs = [o[0] if isinstance(o, np.ndarray) and o.ndim else o for o in outputs]
        return dict(zip(names, outputs, strict=False))

    def predict_batch(
        self, payloads: list[Any], contexts: list[RequestContext], stages: list[Stages]
    ) -> list[Any]:
        results: list[Any] = [None] * len(payloads)
        groups: dict[tuple[Any, ...], list[Member]] = {}
        key: tuple[Any, ...]
        unbatched_at = [False] * len(payloads)
        prepare = self._prepare
        # No hook and no debug trace: `_prepare` would only call `to_tensors`.
        direct = self.runtime.signature.to_tensors if self.hooks.pre is None else None
        for index, payload in enumerate(payloads):
            stage = stages[index]
            try:
                if direct is not None and stage is None:
                    tensors, unbatched = direct(payload)
                else:
                    tensors, unbatched = prepare(payload, stage)
            except Exception as exc:  # noqa: BLE001 - hooks are user code
                results[index] = exc
                continue
            unbatched_at[index] = unbatched
            if len(tensors) == 1:  # one input: its key and rows without a loop
                ((name, a),) = tensors.items()
                shape = a.shape
                key = ((name, a.dtype.str, shape[1:]),)
                member = (index, tensors, unbatched, shape[0] if shape else 1)
            else:
                key = tuple([(name, a.dtype.str, a.shape[1:]) for name, a in tensors.items()])
                member = (index, tensors, unbatched, _rows(tensors))
            group = groups.get(key)
            if group is None:
                groups[key] = [member]
            else:
                group.append(member)
        finish = self._finish
        for members in groups.values():
            for index, outputs in self._run_group(members):
                if isinstance(outputs, BaseException):
                    results[index] = outputs
                    continue
                try:
                    results[index] = finish(
                        outputs, unbatched_at[index], stages[index], contexts[index]
                    )
                except Exception as exc:  # noqa: BLE001 - hooks are user code
                    results[index] = exc
        return results

    def _run_group(self, members: list[Member]) -> list[tuple[int, Any]]:
        """Run items with stackable tensors as few model calls as `max_batch_size` rows allow."""
        out: list[tuple[int, Any]] = []
        chunk: list[Member] = []
        rows = 0
        for member in members:
            member_rows = member[3]
            if chunk and rows + member_rows > self.max_rows:
                out.extend(self._run_chunk(chunk))
                chunk, rows = [], 0
            chunk.append(member)
            rows += member_rows
        if chunk:
            out.extend(self._run_chunk(chunk))
        return out

    def _run_chunk(self, chunk: list[Member]) -> list[tuple[int, Any]]:
        if len(chunk) == 1:
            index, tensors = chunk[0][0], chunk[0][1]
            try:
                return [(index, self.runtime.run(tensors))]
            except Exception as exc:  # noqa: BLE001
                return [(index, exc)]
        names = list(chunk[0][1])
        stacked = {n: np.concatenate([m[1][n] for m in chunk], axis=0) for n in names}
        counts = [m[3] for m in chunk]
        try:
            outputs = self.runtime.run(stacked)
        except Exception:  # noqa: BLE001 - find the bad item: run each alone
            return [item for member in chunk for item in self._run_chunk([member])]
        total = sum(counts)
        if not all(isinstance(o, np.ndarray) and o.ndim and o.shape[0] == total for o in outputs):
            # Outputs that do not follow the batch axis cannot be split back: run items alone.
            return [item for member in chunk for item in self._run_chunk([member])]
        bounds = [0, *accumulate(counts)]  # Python ints: slicing with them is the cheapest
        return [
            (m[0], [o[bounds[i] : bounds[i + 1]] for o in outputs]) for i, m in enumerate(chunk)
        ]

    def explain(self, payload: Any, context: RequestContext) -> Any:
        tensors, unbatched = self._prepare(payload, None)
        names = [spec.name for spec in self.runtime.signature.inputs]
        return shaped_for(feature_ablation(self.runtime.run, tensors), context, names, unbatched)


def _rows(tensors: dict[str, np.ndarray]) -> int:
    first = next(iter(tensors.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


class PythonPipeline(Pipeline):
    def __init__(self, spec: WorkerSpec, handler: PythonHandler | None = None) -> None:
        self.handler = handler or PythonHandler(spec)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.can_explain = self.handler.has_explain

    def _run_async(self, awaitable: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    def explain(self, payload: Any, context: RequestContext) -> Any:
        if not self.handler.has_explain:
            return super().explain(payload, context)
        return self._settle(self.handler.explain(payload, context))

    def stream(self, payload: Any, context: RequestContext) -> Iterator[Any]:
        result = self.handler.predict(payload, context)
        if inspect.isasyncgen(result):
            while True:
                try:
                    yield self._run_async(result.__anext__())
                except StopAsyncIteration:
                    return
        if inspect.isawaitable(result):
            result = self._run_async(result)
        if inspect.isgenerator(result) or isinstance(result, Iterator):
            yield from result
        else:
            yield result

    def signature(self) -> dict[str, Any]:
        return self.handler.declared_signature or {"inputs": [], "outputs": []}

    def _settle(self, result: Any) -> Any:
        if inspect.isasyncgen(result):
            agen, result = result, []
            while True:
                try:
                    result.append(self._run_async(agen.__anext__()))
                except StopAsyncIteration:
                    break
        if inspect.isawaitable(result):
            result = self._run_async(result)
        if inspect.isgenerator(result):
            result = list(result)  # plain routes get every chunk; streaming routes stream them
        return result

    def predict_batch(
        self, payloads: list[Any], contexts: list[RequestContext], stages: list[Stages]
    ) -> list[Any]:
        for payload, stage in zip(payloads, stages, strict=True):
            if stage is not None:
                stage.append(("raw sample", payload))
        if self.handler.has_batch and len(payloads) > 1:
            results = self._settle(self.handler.predict_batch(payloads, contexts))
            if not isinstance(results, (list, tuple)) or len(results) != len(payloads):
                raise BatchLengthMismatch(results, len(payloads))
            results = list(results)
        else:
            results = []
            for payload, context in zip(payloads, contexts, strict=True):
                try:
                    results.append(self._settle(self.handler.predict(payload, context)))
                except Exception as exc:  # noqa: BLE001 - user code
                    results.append(exc)
        for result, stage in zip(results, stages, strict=True):
            if stage is not None and not isinstance(result, BaseException):
                stage.append(("after inference", result))
        return results


def build_pipeline(spec: WorkerSpec) -> Pipeline:
    """Tensor runtimes (onnx, tensorflow, torch, sklearn) share one pipeline; python and
    torchserve have their own."""
    if spec.runtime in TENSOR_RUNTIMES:
        predictor = predictor_class_name(spec)  # Cortex's ONNXPredictor / TensorFlowPredictor
        if predictor is not None:
            return PythonPipeline(spec, CortexPredictorHandler(spec, predictor))
        return TensorPipeline(spec)
    if spec.runtime == "python":
        return PythonPipeline(spec)
    if spec.runtime == "torchserve":  # duck-typed: it does not import this module
        from kiln.handlers.torchserve_handler import TorchServePipeline

        return cast(Pipeline, TorchServePipeline(spec))
    raise InferenceError(f"API '{spec.api}' names an unknown runtime '{spec.runtime}'")
