"""`ts.torch_handler.base_handler.BaseHandler`: TorchServe's default handler, on Kiln.

It loads the model the way TorchServe's does, from the context's manifest and model
folder: with a `modelFile` (an eager `nn.Module` class, the only class that file
defines) plus a state_dict as the serialized file, or a TorchScript serialized file,
or an ONNX file through onnxruntime. A serialized file that is a full pickle
(`torch.save(model)`) runs code when loaded, so it loads only when the API's
`torchserve:` block says `trusted: true`; otherwise loading fails saying so.

Torch (and onnxruntime) come through Kiln's runtime modules, the one place each
framework is imported (tests/test_architecture.py).

`handle` runs preprocess -> inference -> postprocess on the batch (a list of request
dicts), or `explain_handle` when the request header `explain` is "True" (Kiln's
/explanations routes set it), or `describe_handle` for `describe`; it records
`HandlerTime` on `context.metrics`.
"""

from __future__ import annotations

import abc
import importlib
import os
import time
from pathlib import Path
from typing import Any

from ..utils.util import PredictionException, list_classes_from_module, load_label_mapping

_UNTRUSTED = (
    "{path} is a full pickle (torch.save(model)), which runs code when it is loaded; "
    "Kiln loads it only when kiln.yaml's torchserve block says `trusted: true`. Set that "
    "if you trust the file, or save the model as TorchScript (torch.jit.script(model)"
    ".save(...)) or as a state_dict with a model_file"
)


class BaseHandler(abc.ABC):  # noqa: B024 - TorchServe's class is abstract without methods
    """Load a TorchScript or eager (state_dict) model; `handle` each batch with it."""

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, str] | None = None
        self.device: Any = None
        self.initialized = False
        self.context: Any = None
        self.model_pt_path: str | None = None
        self.manifest: dict[str, Any] | None = None
        self.map_location: str | None = None
        self.explain = False
        self.target = 0
        self.model_yaml_config: dict[str, Any] = {}

    # ----- loading ---------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Pick the device, load the model the manifest names, read index_to_name.json."""
        from kiln.runtimes.torch import torch

        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        properties = context.system_properties
        gpu = properties.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            self.map_location = "cuda"
            self.device = torch.device(f"cuda:{gpu}")
        else:
            self.map_location = "cpu"
            self.device = torch.device("cpu")
        self.manifest = context.manifest
        model_dir = properties.get("model_dir") or "."
        facts = (self.manifest or {}).get("model", {})
        serialized = facts.get("serializedFile")
        self.model_pt_path = os.path.join(model_dir, serialized) if serialized else None
        self._trusted = bool(getattr(context, "kiln_trusted", False))
        model_file = facts.get("modelFile")
        if model_file:
            self.model = self._load_pickled_model(model_dir, model_file, self.model_pt_path)
            self.model.to(self.device)
            self.model.eval()
        elif self.model_pt_path and self.model_pt_path.endswith(".onnx"):
            from kiln.runtimes.onnx import ort

            self.model = ort.InferenceSession(self.model_pt_path)
        elif self.model_pt_path:
            self.model = self._load_torchscript_model(self.model_pt_path)
            self.model.eval()
        else:
            raise RuntimeError(
                f"No model weights could be loaded: {model_dir} names no serialized file; "
                "put one .pt file there, or set serialized_file under torchserve: in kiln.yaml"
            )
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        from kiln.runtimes.torch import torch

        try:
            return torch.jit.load(model_pt_path, map_location=self.device)
        except RuntimeError:
            if not getattr(self, "_trusted", False):
                raise RuntimeError(_UNTRUSTED.format(path=model_pt_path)) from None
        model = torch.load(model_pt_path, map_location=self.device, weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise RuntimeError(
                f"{model_pt_path} holds a {type(model).__name__}, not a model; a state_dict "
                "needs a model_file naming the nn.Module class"
            )
        return model

    def _load_pickled_model(
        self, model_dir: str, model_file: str, model_pt_path: str | None
    ) -> Any:
        """The one class `model_file` defines, with the state_dict in `model_pt_path`."""
        from kiln.runtimes.torch import torch

        if not os.path.isfile(os.path.join(model_dir, model_file)):
            raise RuntimeError(f"Missing the model file {model_file} in {model_dir}")
        module = importlib.import_module(Path(model_file).stem)  # model_dir is on sys.path
        classes = list_classes_from_module(module)
        if len(classes) != 1:
            names = ", ".join(c.__name__ for c in classes) or "none"
            raise ValueError(
                f"Expected only one class as model definition in {model_file}, found: {names}"
            )
        model = classes[0]()
        if model_pt_path:
            trusted = getattr(self, "_trusted", False)
            try:
                state = torch.load(
                    model_pt_path, map_location=self.device, weights_only=not trusted
                )
            except Exception as exc:
                if type(exc).__name__ != "UnpicklingError":  # weights_only refused a global
                    raise
                raise RuntimeError(_UNTRUSTED.format(path=model_pt_path)) from None
            if isinstance(state, torch.nn.Module):
                state = state.state_dict()
            model.load_state_dict(state)
        return model

    # ----- the stages a subclass overrides ---------------------------------------------

    def preprocess(self, data: Any) -> Any:
        from kiln.runtimes.torch import torch

        return torch.as_tensor(data, device=self.device)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        from kiln.runtimes.torch import torch

        with torch.inference_mode():
            return self.model(data.to(self.device), *args, **kwargs)

    def postprocess(self, data: Any) -> Any:
        return data.tolist()

    def handle(self, data: list[Any], context: Any) -> Any:
        """One batch: describe, explain or predict, and the time it took as HandlerTime."""
        started = time.time()
        self.context = context
        if self._is_describe():
            output = [self.describe_handle()]
        else:
            prepared = self.preprocess(data)
            if self._is_explain():
                output = self.explain_handle(prepared, data)
            else:
                output = self.postprocess(self.inference(prepared))
        elapsed_ms = round((time.time() - started) * 1000, 2)
        context.metrics.add_time("HandlerTime", elapsed_ms, None, "ms")
        return output

    def explain_handle(self, data_preprocess: Any, raw_data: list[Any]) -> Any:
        """Explanations from `get_insights(tensor, input, target)` for the first request."""
        row = raw_data[0] if raw_data else {}
        inputs = target = None
        if isinstance(row, dict):
            inputs = row.get("data") or row.get("body")
            target = row.get("target")
        return self.get_insights(data_preprocess, inputs, target or 0)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any) -> Any:
        raise PredictionException(
            f"{type(self).__name__} has no explanations: override get_insights "
            "(or explain_handle) in the handler",
            501,
        )

    def describe_handle(self) -> Any:
        return None

    def get_device(self) -> Any:
        return self.device

    def _header_is_true(self, name: str) -> bool:
        context = self.context
        if context is None or not getattr(context, "request_processor", None):
            return False
        return context.get_request_header(0, name) == "True"

    def _is_explain(self) -> bool:
        self.explain = self._header_is_true("explain")
        return self.explain

    def _is_describe(self) -> bool:
        return self._header_is_true("describe")
