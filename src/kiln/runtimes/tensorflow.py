"""TensorFlow SavedModels (the Kiln's `tensorflow` extra; TensorFlow's CPU build).

This module is imported only when an API uses `tensorflow:`. `model` may be a
SavedModel directory, a `.zip` / `.tar.gz` of one (unpacked safely by
`kiln.storage` before the worker loads it), or a seed-era (TF Serving) folder
whose numbered subfolders are versions, of which the highest is served. The
signature's input and output names, dtypes and shapes feed the V2 metadata,
the OpenAPI document and the JSON validation, as ONNX's graph does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of logs

import numpy as np  # noqa: E402
import tensorflow as tf  # type: ignore[import-untyped]  # noqa: E402 - no stubs installed

from kiln.errors import InferenceError, InvalidInput  # noqa: E402
from kiln.runtimes.base import ModelLoadError, TensorRuntime, TensorSignature, TensorSpec  # noqa: E402
from kiln.worker_spec import WorkerSpec  # noqa: E402

_MARKERS = ("saved_model.pb", "saved_model.pbtxt")


def _spec(name: str, tensor_spec: Any) -> TensorSpec:
    dims = None
    if tensor_spec.shape.rank is not None:
        dims = tuple(None if d is None else int(d) for d in tensor_spec.shape.as_list())
    dtype = (
        np.dtype(np.object_) if tensor_spec.dtype == tf.string else tensor_spec.dtype.as_numpy_dtype
    )
    return TensorSpec(name, np.dtype(dtype), dims)


def _is_saved_model(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _MARKERS)


def find_saved_model(path: Path) -> Path:
    """The SavedModel folder `path` stands for (itself, one level in, or its highest version)."""
    if not path.exists():
        raise ModelLoadError(f"the model path {path} does not exist")
    if path.is_file():  # archives were unpacked by kiln.storage before the worker got here
        raise ModelLoadError(
            f"{path.name} is a file; tensorflow.model must be a SavedModel folder "
            f"(holding saved_model.pb), a .zip or .tar.gz of one, or a folder of versions"
        )
    if _is_saved_model(path):
        return path
    folders = [p for p in path.iterdir() if p.is_dir()]
    versions = sorted((p for p in folders if p.name.isdigit()), key=lambda p: int(p.name))
    for version in reversed(versions):
        if _is_saved_model(version):
            return version
    if len(folders) == 1 and _is_saved_model(folders[0]):
        return folders[0]  # a zip whose members sit under one top folder
    if len(folders) == 1:
        return find_saved_model(folders[0])
    raise ModelLoadError(
        f"no SavedModel in {path}: expected saved_model.pb there or in a numbered version "
        f"folder (e.g. {path}/1/saved_model.pb)"
    )


class TensorflowRuntime(TensorRuntime):
    """A SavedModel signature; `signature_key` picks one when the model has several."""

    def __init__(self, spec: WorkerSpec) -> None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, spec.threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # only settable before TensorFlow starts; it keeps its own otherwise
        if spec.gpu > 0 and not tf.config.list_physical_devices("GPU"):
            raise ModelLoadError(
                f"API '{spec.api}' asks for compute.gpu: {spec.gpu}, but TensorFlow sees no "
                f"GPU (tensorflow {tf.__version__}). Set compute.gpu: 0 to serve on the CPU, "
                f"or install tensorflow[and-cuda] on a machine with an NVIDIA GPU."
            )
        folder = find_saved_model(Path(spec.model_path or ""))
        try:
            model = tf.saved_model.load(str(folder))
        except Exception as exc:  # noqa: BLE001 - TensorFlow raises many types here
            raise ModelLoadError(
                f"cannot load the SavedModel {folder}: {_first_line(exc)}"
            ) from None
        keys = sorted(model.signatures.keys())
        if not keys:
            raise ModelLoadError(
                f"the SavedModel {folder} has no serving signatures: save it with "
                f"tf.saved_model.save(module, path, signatures={{...}})"
            )
        if spec.signature_key:
            if spec.signature_key not in model.signatures:
                raise ModelLoadError(
                    f"signature_key '{spec.signature_key}' is not in the model {folder}; "
                    f"available keys: {', '.join(keys)}"
                )
            key = spec.signature_key
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise ModelLoadError(
                f"the model {folder} has {len(keys)} signatures, so Kiln needs to know which "
                f"one to serve: set signature_key in the tensorflow block of API "
                f"'{spec.api}' to one of: {', '.join(keys)}"
            )
        self.signature_key = key
        self._model = model  # keeps the functions' variables alive
        self._fn = model.signatures[key]
        inputs = self._fn.structured_input_signature[1]
        outputs = self._fn.structured_outputs
        self.signature = TensorSignature(
            [_spec(name, s) for name, s in sorted(inputs.items())],
            [_spec(name, s) for name, s in sorted(outputs.items())],
        )

    def handler_signature(self) -> Any:
        """Cortex-era request handlers read `signature[name]["shape" | "type"]`."""
        return {
            s.name: {
                "shape": [-1 if d is None else d for d in s.shape] if s.shape else [],
                "type": tf.as_dtype(s.dtype).name if s.dtype != np.object_ else "string",
            }
            for s in self.signature.inputs
        }

    def handler_prediction(self, outputs: list[Any]) -> Any:
        """Cortex's TensorFlow handlers got the prediction keyed by output name."""
        return {s.name: value for s, value in zip(self.signature.outputs, outputs, strict=False)}

    def run(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            feeds = {k: tf.constant(v) for k, v in tensors.items()}
            result = self._fn(**feeds)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise InvalidInput(f"the model rejected the input: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"the model failed: {_first_line(exc)}") from None
        return [result[s.name].numpy() for s in self.signature.outputs]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
