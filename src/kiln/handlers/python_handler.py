"""The `python:` runtime: the user's class or function, loaded once per worker."""

from __future__ import annotations

import inspect
import os
from typing import Any

from kiln.handlers.user_code import adapt_call, find_entry
from kiln.user_calls import keyword_args
from kiln.user_modules import import_target, split_handler
from kiln.worker_spec import WorkerSpec


class PythonHandler:
    """Any user entry point, seen through one interface: `predict(payload, context)`."""

    def __init__(self, spec: WorkerSpec) -> None:
        model_dir = spec.model_path or ""
        if model_dir:
            os.environ["MODEL_DIR"] = model_dir  # before import: module-level loading reads it
        target, name = split_handler(spec.handler or "")
        entry = find_entry(import_target(target), name)
        values = {"config": spec.config, "metadata": spec.metadata, "job_spec": None}
        self.declared_signature: dict[str, Any] | None = spec.signature
        self._explain = None
        self._predict_batch = None
        if inspect.isclass(entry):
            instance = _construct(entry, spec, values)
            if callable(getattr(instance, "load", None)):
                instance.load(model_dir, spec.config)
            self.declared_signature = getattr(instance, "signature", None) or spec.signature
            self._predict_fn = instance.predict
            if callable(getattr(instance, "predict_batch", None)):
                self._predict_batch = instance.predict_batch
            if callable(getattr(instance, "explain", None)):
                self._explain = adapt_call(instance.explain, values)
        elif inspect.ismodule(entry):  # Cortex v0.10 predictor module
            if callable(getattr(entry, "init", None)):
                adapt_call(entry.init, {"model_path": model_dir, **values})({"payload": model_dir})
            self._predict_fn = entry.predict
        else:
            self._predict_fn = entry
        self.is_async = inspect.iscoroutinefunction(self._predict_fn)
        self._predict = adapt_call(self._predict_fn, values)

    @property
    def has_explain(self) -> bool:
        return self._explain is not None

    def explain(self, payload: Any, context: Any) -> Any:
        assert self._explain is not None
        return self._explain({"payload": payload, "context": context})

    @property
    def has_batch(self) -> bool:
        return self._predict_batch is not None

    def predict_batch(self, payloads: list[Any], contexts: list[Any]) -> Any:
        assert self._predict_batch is not None
        return self._predict_batch(payloads, contexts)

    def predict(self, payload: Any, context: Any) -> Any:
        return self._predict(
            {
                "payload": payload,
                "context": context,
                "query_params": context.query,
                "headers": context.headers,
            }
        )


def _construct(cls: type, spec: WorkerSpec, values: dict[str, Any]) -> Any:
    """The handler class, given what its constructor names (kiln/user_calls.py rules)."""
    offered = {"model_dir": spec.model_path, "model_path": spec.model_path, **values}
    return cls(**keyword_args(cls, offered))
