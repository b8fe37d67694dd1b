"""Model formats. Each runtime lives in its own module and imports its framework lazily.

`load_runtime` is the registry: it maps the `runtime` of a worker spec to the
module that serves it, so `import kiln` never pulls in onnxruntime, tensorflow
or torch, and a missing framework is a clear hint to install Kiln's extra for it
(Kiln is installed from its repository, not PyPI: `install_hint`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from kiln.errors import KilnError, install_hint

if TYPE_CHECKING:
    from kiln.runtimes.base import TensorRuntime
    from kiln.worker_spec import WorkerSpec

# runtime name -> (module, class, the extra that installs its framework, the framework's module)
_REGISTRY: dict[str, tuple[str, str, str, str]] = {
    "onnx": ("kiln.runtimes.onnx", "OnnxRuntime", "onnx", "onnxruntime"),
    "tensorflow": ("kiln.runtimes.tensorflow", "TensorflowRuntime", "tensorflow", "tensorflow"),
    "torch": ("kiln.runtimes.torch", "TorchRuntime", "torch", "torch"),
    "sklearn": ("kiln.runtimes.sklearn", "SklearnRuntime", "sklearn", "sklearn"),
}

TENSOR_RUNTIMES = frozenset(_REGISTRY)


class MissingFramework(KilnError):
    """The framework a runtime needs is not installed."""

    status = 503
    type = "MissingFramework"


def load_runtime(spec: WorkerSpec) -> TensorRuntime:
    """Load the model of `spec` with the runtime its config names.

    The runtime module imports its framework itself (so it can set the
    framework's environment first); an ImportError on the way in becomes an
    install hint naming the extra.
    """
    module_name, class_name, extra, framework = _REGISTRY[spec.runtime]
    try:
        if importlib.util.find_spec(framework) is None:
            raise ImportError(f"No module named '{framework}'")
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingFramework(
            f"API '{spec.api}' uses the {spec.runtime} runtime, but {framework} is not "
            f"installed or cannot be imported ({exc}). Install it with: {install_hint(extra)}"
        ) from None
    runtime_cls = getattr(module, class_name)
    return runtime_cls(spec)
