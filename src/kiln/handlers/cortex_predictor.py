"""Cortex's predictor-era ONNX and TensorFlow predictor classes (Cortex v0.13 to v0.30).

    predictor: {type: onnx, path: predictor.py, model: model.onnx}

serves `predictor.py` as a predictor class when the file defines `ONNXPredictor`
(`TensorFlowPredictor` for `type: tensorflow`), as Cortex's docs of that era define them:

    class ONNXPredictor:
        def __init__(self, onnx_client, config): ...
        def predict(self, payload): ... self.client.predict(model_input) ...

A file without the class keeps the seed-era meaning of `path` (request handlers:
`pre_inference` / `post_inference`), so config maps `predictor:` to the runtime
block either way and the worker decides here, from the file's source, without
importing it twice.

The clients wrap the API's own Kiln runtime (kiln.runtimes): the model is loaded
once, by the same code as any `onnx:` / `tensorflow:` API, and the input goes
through the runtime's signature (names, dtypes, shapes, the same 400s). They
answer as Cortex's did: `onnx_client.predict` the list of output arrays
(onnxruntime's `session.run`), `tensorflow_client.predict` a dict of output name
to a flat list of values (TF Serving's response, as Cortex simplified it).
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import InvalidInput
from kiln.handlers.python_handler import PythonHandler
from kiln.handlers.user_code import adapt_call
from kiln.runtimes import load_runtime
from kiln.runtimes.base import TensorRuntime, TensorSignature
from kiln.user_calls import keyword_args
from kiln.user_modules import import_file
from kiln.worker_spec import WorkerSpec

PREDICTOR_CLASSES = {"onnx": "ONNXPredictor", "tensorflow": "TensorFlowPredictor"}
CLIENT_NAMES = {"onnx": "onnx_client", "tensorflow": "tensorflow_client"}


def predictor_class_name(spec: WorkerSpec) -> str | None:
    """`ONNXPredictor` / `TensorFlowPredictor` when the API's `path` file defines it at
    top level (a class, an import or an assignment); None keeps request-handler mode."""
    wanted = PREDICTOR_CLASSES.get(spec.runtime)
    if wanted is None or not spec.request_handler:
        return None
    try:
        tree = ast.parse(Path(spec.request_handler).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None  # importing it as request handlers reports the problem properly
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == wanted:
            return wanted
        if isinstance(node, ast.Import | ast.ImportFrom):
            if any((a.asname or a.name.rsplit(".", 1)[-1]) == wanted for a in node.names):
                return wanted
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == wanted for t in node.targets):
                return wanted
    return None


class _ModelClient:
    """What both Cortex clients share: one API's model, reached through its runtime."""

    def __init__(self, runtime: TensorRuntime, api: str) -> None:
        self._runtime = runtime
        self._api = api

    @property
    def input_signature(self) -> dict[str, Any]:
        """The model's inputs by name: `{"shape": [...], "type": "<V2 datatype>"}`."""
        return {
            spec["name"]: {"shape": spec["shape"], "type": spec["datatype"]}
            for spec in self._runtime.signature.describe()["inputs"]
        }

    def _run(self, model_input: Any, model_name: str | None) -> list[np.ndarray]:
        if model_name not in (None, self._api):
            raise InvalidInput(
                f"this API serves one model, '{self._api}', not '{model_name}': "
                f"call predict(model_input) without model_name"
            )
        signature = self._runtime.signature
        try:
            tensors, _ = signature.to_tensors(model_input)
        except InvalidInput:
            reshaped = _cortex_reshape(signature, model_input)
            if reshaped is None:
                raise
            tensors = reshaped
        return self._runtime.run(tensors)


class ONNXClient(_ModelClient):
    """Cortex's `onnx_client`."""

    def predict(
        self, model_input: Any, model_name: str | None = None, model_version: str = "latest"
    ) -> list[np.ndarray]:
        """The model's outputs for `model_input` (one value, or a dict by input name)."""
        return self._run(model_input, model_name)


class TensorFlowClient(_ModelClient):
    """Cortex's `tensorflow_client`."""

    def predict(
        self, model_input: Any, model_name: str | None = None, model_version: str = "latest"
    ) -> dict[str, list[Any]]:
        """Output name -> its values as one flat list (Cortex's TF Serving answer)."""
        outputs = self._run(model_input, model_name)
        specs = self._runtime.signature.outputs
        return {spec.name: _flat(value) for spec, value in zip(specs, outputs, strict=False)}


def _flat(value: Any) -> list[Any]:
    items = np.asarray(value).ravel().tolist()
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in items]


def _cortex_reshape(signature: TensorSignature, model_input: Any) -> dict[str, np.ndarray] | None:
    """Cortex's own fallback: each input reshaped to its signature's shape, unknown
    dimensions read as 1 (a flat list of 784 numbers for a [N, 1, 28, 28] image)."""
    if isinstance(model_input, dict):
        named = model_input
    elif len(signature.inputs) == 1:
        named = {signature.inputs[0].name: model_input}
    else:
        return None
    if set(named) != {spec.name for spec in signature.inputs}:
        return None
    tensors = {}
    for spec in signature.inputs:
        if spec.shape is None:
            return None
        shape = tuple(1 if d is None else d for d in spec.shape)
        try:
            array = np.asarray(named[spec.name], dtype=spec.dtype)
        except (ValueError, TypeError):
            return None
        if array.size != math.prod(shape):
            return None
        tensors[spec.name] = array.reshape(shape)
    return tensors


class CortexPredictorHandler(PythonHandler):
    """An `ONNXPredictor` / `TensorFlowPredictor` seen as a Python handler, so the
    Python pipeline serves it (JSON / text / bytes payloads, async, generators)."""

    def __init__(self, spec: WorkerSpec, class_name: str) -> None:  # noqa: D107
        runtime = load_runtime(spec)
        client_cls = ONNXClient if spec.runtime == "onnx" else TensorFlowClient
        client = client_cls(runtime, spec.api)
        client_name = CLIENT_NAMES[spec.runtime]
        values = {
            "config": spec.config,
            "metadata": spec.metadata,
            "job_spec": None,
            client_name: client,
        }
        cls = getattr(import_file(spec.request_handler or ""), class_name)
        instance = cls(**_constructor_args(cls, values, client_name))
        self.declared_signature = runtime.signature.describe()
        self._predict_fn = instance.predict
        self._predict_batch = None
        self._explain = None
        if callable(getattr(instance, "explain", None)):
            self._explain = adapt_call(instance.explain, values)
        self.is_async = inspect.iscoroutinefunction(self._predict_fn)
        self._predict = adapt_call(self._predict_fn, values)


def _constructor_args(cls: type, values: dict[str, Any], client_name: str) -> dict[str, Any]:
    """Cortex passes the client and `config` by name; a first argument named otherwise
    (`client`) still gets the client (kiln/user_calls.py's constructor rule)."""
    return keyword_args(
        cls,
        values,
        first=client_name,
        hint=f"Cortex's signature is __init__(self, {client_name}, config)",
    )
