"""ONNX models through onnxruntime (the Kiln's `onnx` extra)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]  # onnxruntime ships no type hints

from kiln.errors import InferenceError, InvalidInput
from kiln.runtimes.base import TensorRuntime, TensorSignature, TensorSpec
from kiln.worker_spec import WorkerSpec

_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _spec(arg: Any) -> TensorSpec:
    dtype = np.dtype(_ONNX_TYPES.get(arg.type, np.object_))
    shape = arg.shape
    dims = (
        None if shape is None else tuple(d if isinstance(d, int) and d > 0 else None for d in shape)
    )
    return TensorSpec(arg.name, dtype, dims)


class OnnxRuntime(TensorRuntime):
    """One onnxruntime session; intra-op threads come from `compute.cpu`."""

    def __init__(self, spec: WorkerSpec) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, spec.threads)
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                spec.model_path, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"cannot load ONNX model {spec.model_path}: {exc}") from None
        self.signature = TensorSignature(
            [_spec(a) for a in self.session.get_inputs()],
            [_spec(a) for a in self.session.get_outputs()],
        )
        self._output_names = [o.name for o in self.session.get_outputs()]

    def handler_signature(self) -> Any:
        # Seed-era handlers read `signature[0].name` etc. on onnxruntime NodeArgs.
        return self.session.get_inputs()

    def run(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(self._output_names, tensors)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise InvalidInput(f"the model rejected the input: {_first_line(exc)}") from None
        except Exception as exc:
            raise InferenceError(f"the model failed: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
