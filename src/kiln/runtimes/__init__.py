"""Model formats. Each runtime lives in its own module and imports its framework lazily.

`load_runtime` is the registry: it maps the `runtime` of a worker spec to the
module that serves it, so `import kiln` never pulls in onnxruntime, tensorflow
or torch, and a missing framework is a clear "install kiln-serve[extra]".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.runtimes.base import TensorRuntime
    from kiln.serving.types import WorkerSpec

# runtime name -> (module, class, the extra that installs its framework, the framework's module)
_REGISTRY: dict[str, tuple[str, str, str, str]] = {
    "onnx": ("kiln.runtimes.onnx", "OnnxRuntime", "onnx", "onnxruntime"),
    "tensorflow": ("kiln.runtimes.tensorflow", "TensorflowRuntime", "tensorflow", "tensorflow"),
}

TENSOR_RUNTIMES = frozenset(_REGISTRY)


class MissingFramework(KilnError):
    """The framework a runtime needs is not installed."""

    status = 503
    type = "MissingFramework"


def load_runtime(spec: WorkerSpec) -> TensorRuntime:
    """Load the model of `spec` with the runtime its config names."""
    module_name, class_name, extra, framework = _REGISTRY[spec.runtime]
    try:
        importlib.import_module(framework)
    except ImportError as exc:
        raise MissingFramework(
            f"API '{spec.api}' uses the {spec.runtime} runtime, but {framework} is not "
            f"installed ({exc}). Install it with: pip install 'kiln-serve[{extra}]'"
        ) from None
    runtime_cls = getattr(importlib.import_module(module_name), class_name)
    return runtime_cls(spec)
