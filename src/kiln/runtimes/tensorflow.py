"""TensorFlow SavedModels (the `kiln-serve[tensorflow]` extra).

This module is imported only when an API uses `tensorflow:`; the registry checks
that tensorflow is importable first, so users without it get an install hint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from kiln.errors import InferenceError
from kiln.runtimes.base import TensorRuntime, TensorSignature, TensorSpec
from kiln.serving.types import WorkerSpec


def _spec(name: str, tensor_spec: Any) -> TensorSpec:
    dims = None
    if tensor_spec.shape.rank is not None:
        dims = tuple(None if d is None else int(d) for d in tensor_spec.shape.as_list())
    dtype = (
        np.dtype(np.object_) if tensor_spec.dtype == tf.string else tensor_spec.dtype.as_numpy_dtype
    )
    return TensorSpec(name, np.dtype(dtype), dims)


class TensorflowRuntime(TensorRuntime):
    """A SavedModel signature; `signature_key` picks one when the model has several."""

    def __init__(self, spec: WorkerSpec) -> None:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, spec.threads))
        model = tf.saved_model.load(spec.model_path)
        keys = sorted(model.signatures.keys())
        if spec.signature_key:
            if spec.signature_key not in model.signatures:
                raise InferenceError(
                    f"signature_key '{spec.signature_key}' is not in the model; "
                    f"available keys: {', '.join(keys)}"
                )
            key = spec.signature_key
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise InferenceError(
                f"the model has {len(keys)} signatures; set tensorflow.signature_key "
                f"in kiln.yaml to one of: {', '.join(keys)}"
            )
        self._model = model
        self._fn = model.signatures[key]
        inputs = self._fn.structured_input_signature[1]
        outputs = self._fn.structured_outputs
        self.signature = TensorSignature(
            [_spec(name, s) for name, s in sorted(inputs.items())],
            [_spec(name, s) for name, s in sorted(outputs.items())],
        )

    def handler_signature(self) -> Any:
        return {s.name: {"shape": s.shape, "type": s.dtype.name} for s in self.signature.inputs}

    def run(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self._fn(**{k: tf.constant(v) for k, v in tensors.items()})
        return [result[s.name].numpy() for s in self.signature.outputs]
