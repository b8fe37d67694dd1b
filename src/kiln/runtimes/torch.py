"""PyTorch models (the Kiln's `torch` extra, pinned to a CPU build of torch).

Three ways in, chosen by what the model file is rather than by its name:

- a `torch.export` program (`.pt2`): loads without user code, and its inputs
  and outputs (names, dtypes, dynamic dimensions) come from the program;
- a TorchScript archive (`torch.jit.save`): loads without user code; input
  names come from `forward`, dtypes and shapes from `torch.signature` in
  kiln.yaml when given (else float32 of any shape);
- an eager `nn.Module` whose code is the user's: `handler: model.py:Net` names
  the class (or a function returning the module), and the weights file is read
  with `torch.load(weights_only=True)`, which cannot run code.

A checkpoint that pickles a whole module runs arbitrary code when loaded, so it
is refused unless the API's torch block says `trusted: true`.
"""

from __future__ import annotations

import inspect
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import InferenceError, InvalidInput
from kiln.runtimes.base import (
    ModelLoadError,
    TensorRuntime,
    TensorSignature,
    TensorSpec,
    declared_signature,
)
from kiln.user_calls import keyword_args
from kiln.user_modules import import_target, split_handler
from kiln.worker_spec import WorkerSpec

_MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".torchscript", ".jit", ".bin", ".ckpt")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:  # numpy has no bfloat16: answers are widened to float32
        return np.dtype(np.float32)
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def select_device(spec: WorkerSpec) -> torch.device:
    """`compute.gpu` > 0 means CUDA; asking for a GPU that is not there is a load error."""
    if spec.gpu <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ModelLoadError(
            f"API '{spec.api}' asks for compute.gpu: {spec.gpu}, but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, {build}). Set compute.gpu: 0 to serve on the CPU, or "
            f"run Kiln on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
    if torch.cuda.device_count() < spec.gpu:
        raise ModelLoadError(
            f"API '{spec.api}' asks for compute.gpu: {spec.gpu}, but only "
            f"{torch.cuda.device_count()} GPU(s) are visible; lower compute.gpu"
        )
    return torch.device("cuda")


def _archive_kind(path: Path) -> str:
    """'export', 'script' or 'checkpoint', from the entries of the file's zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "checkpoint"  # torch.save's legacy (pre-1.6) format is not a zip
    tails = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in tails or path.suffix == ".pt2":
        return "export"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "script"
    return "checkpoint"


def _model_file(spec: WorkerSpec) -> Path | None:
    """The model file; a directory holding exactly one model file stands for it."""
    if not spec.model_path:
        return None
    path = Path(spec.model_path)
    if not path.exists():
        raise ModelLoadError(f"the model path {path} does not exist")
    if path.is_file():
        return path
    if spec.handler:
        return None  # the handler reads its own files from the directory
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _MODEL_SUFFIXES)
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ModelLoadError(
            f"the model directory {path} must hold exactly one model file "
            f"({', '.join(_MODEL_SUFFIXES)}); found: {listed}. Point torch.model at the file."
        )
    return found[0]


def _unsafe_global(exc: Exception) -> str | None:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return found.group(1) if found else None


def load_checkpoint(path: Path, spec: WorkerSpec, device: torch.device) -> Any:
    """`torch.load` with `weights_only=True`; a full pickle only when the config trusts it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        if "UnpicklingError" not in {cls.__name__ for cls in type(exc).__mro__}:
            raise ModelLoadError(
                f"cannot read the PyTorch file {path}: {_first_line(exc)}"
            ) from None
        if not spec.trusted:
            culprit = _unsafe_global(exc)
            refers = f" (it refers to {culprit})" if culprit else ""
            raise ModelLoadError(
                f"{path.name} is a full pickle checkpoint{refers}, not plain weights: loading it "
                f"runs whatever code the file contains, so Kiln does not load it by default. "
                f"If you made this file or trust where it came from, add 'trusted: true' to the "
                f"torch block of API '{spec.api}' in kiln.yaml. Safer: save a TorchScript or "
                f"torch.export program, or save model.state_dict() and name the model class "
                f"with torch.handler."
            ) from None
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a trusted pickle may still fail to import
        raise ModelLoadError(
            f"cannot load the trusted checkpoint {path}: {_first_line(exc)} (the code it "
            f"pickled must be importable: set python_path to the folder that holds it)"
        ) from None


def _call_with(target: Any, values: dict[str, Any]) -> Any:
    """Call a user class or function with the arguments it names (config, model_dir, ...)."""
    return target(**keyword_args(target, values))


def _eager_module(spec: WorkerSpec, weights: Path | None, device: torch.device) -> Any:
    target_ref, name = split_handler(spec.handler or "")
    module = import_target(target_ref)
    if name:
        entry = getattr(module, name, None)
        if entry is None:
            raise ModelLoadError(f"{module.__file__} has no '{name}' (torch.handler)")
    else:
        own = [
            v
            for v in vars(module).values()
            if inspect.isclass(v)
            and issubclass(v, torch.nn.Module)
            and v.__module__ == module.__name__
        ]
        if len(own) != 1:
            raise ModelLoadError(
                f"{module.__file__} defines {len(own)} torch.nn.Module classes: name the one "
                f"to serve, e.g. torch.handler: {Path(target_ref).name}:Net"
            )
        entry = own[0]
    model_dir = spec.model_path or ""
    if model_dir and os.path.isfile(model_dir):
        model_dir = os.path.dirname(model_dir)
    values = {
        "config": spec.config,
        "metadata": spec.metadata,
        "model_dir": model_dir,
        "model_path": spec.model_path,
        "device": device,
    }
    built = _call_with(entry, values)
    if not isinstance(built, torch.nn.Module):
        raise ModelLoadError(
            f"torch.handler {spec.handler} gave a {type(built).__name__}, not a "
            f"torch.nn.Module: name an nn.Module class or a function that returns one"
        )
    if weights is not None:
        state = load_checkpoint(weights, spec, device)
        if isinstance(state, torch.nn.Module):  # a trusted full checkpoint: take its weights
            state = state.state_dict()
        if not isinstance(state, dict):
            raise ModelLoadError(
                f"{weights.name} holds a {type(state).__name__}, not a state_dict: save "
                f"model.state_dict() with torch.save"
            )
        try:
            built.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"the weights in {weights.name} do not fit {type(built).__name__}: "
                f"{_first_line(exc)}"
            ) from None
    return built


def _forward_names(forward: Any) -> list[str]:
    """Input names from `forward`: TorchScript keeps its schema, eager code its signature."""
    schema = getattr(forward, "schema", None)
    if schema is not None:  # the first argument is the module itself (type __torch__.Name)
        return [a.name for a in schema.arguments if not str(a.type).startswith("__torch__")]
    params = inspect.signature(forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _export_signature(program: Any) -> TensorSignature:
    """Names, dtypes and dims of a torch.export program; symbolic dims are any size."""
    user_inputs = list(program.graph_signature.user_inputs)
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for name in user_inputs:
        value = by_name[name].meta.get("val")
        dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        inputs.append(TensorSpec(name, _numpy_dtype(value.dtype), dims))
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") for a in output_node.args[0]]
    spec = program.call_spec.out_spec
    context = getattr(spec, "context", None)
    if isinstance(context, list) and all(isinstance(k, str) for k in context):
        names = list(context)  # the module returns a dict: its keys name the outputs
    else:
        names = _output_names(len(values))
    outputs = [
        TensorSpec(
            name, _numpy_dtype(v.dtype), tuple(d if isinstance(d, int) else None for d in v.shape)
        )
        for name, v in zip(names, values, strict=False)
        if v is not None and hasattr(v, "dtype")
    ]
    return TensorSignature(inputs, outputs)


class TorchRuntime(TensorRuntime):
    """One loaded module on the chosen device; intra-op threads come from `compute.cpu`."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(max(1, spec.threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # only settable before torch starts its pool; harmless when already set
        self.device = select_device(spec)
        self._declared = spec.signature is not None
        path = _model_file(spec)
        kind = _archive_kind(path) if path is not None else "eager"
        if kind == "checkpoint" and spec.handler:
            kind = "eager"
        if kind == "export":
            try:
                program = torch.export.load(str(path))
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(
                    f"cannot load the torch.export program {path}: {_first_line(exc)}"
                ) from None
            self.module = program.module().to(self.device)
            self.signature = _export_signature(program)
            self.kind = "torch.export"
            return
        if kind == "script":
            try:
                self.module = torch.jit.load(str(path), map_location=self.device)
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(
                    f"cannot load the TorchScript file {path}: {_first_line(exc)}"
                ) from None
            self.kind = "TorchScript"
        elif kind == "eager" or path is None:  # no model file is always "eager"
            self.module = _eager_module(spec, path, self.device).to(self.device)
            self.kind = "eager"
        else:
            self.module = self._trusted_module(spec, path)
            self.kind = "pickled module"
        self.module.eval()
        self.signature = self._signature(spec)

    def _trusted_module(self, spec: WorkerSpec, path: Path) -> Any:
        loaded = load_checkpoint(path, spec, self.device)
        if isinstance(loaded, torch.nn.Module):
            return loaded.to(self.device)
        raise ModelLoadError(
            f"{path.name} holds only weights (a {type(loaded).__name__}), not a model: Kiln "
            f"needs the model's code. Name the nn.Module class that these weights fit with "
            f"torch.handler (e.g. handler: model.py:Net), or save a TorchScript "
            f"(torch.jit.save) or torch.export (.pt2) program instead."
        )

    def _signature(self, spec: WorkerSpec) -> TensorSignature:
        declared = spec.signature or getattr(self.module, "signature", None)
        if isinstance(declared, dict):
            self._declared = True
            return declared_signature(declared, f"the signature of API '{spec.api}'")
        names = _forward_names(self.module.forward)
        count = 1
        schema = getattr(self.module.forward, "schema", None)
        if schema is not None and schema.returns:
            returned = schema.returns[0].type
            count = len(returned.elements()) if hasattr(returned, "elements") else 1
        return TensorSignature(
            [TensorSpec(name, np.dtype(np.float32), None) for name in names],
            [TensorSpec(name, np.dtype(np.float32), None) for name in _output_names(count)],
        )

    def _to_arrays(self, result: Any) -> list[np.ndarray]:
        if isinstance(result, torch.Tensor):
            values: list[Any] = [result]
        elif isinstance(result, dict):
            names = [s.name for s in self.signature.outputs]
            if set(names) != set(result):
                names = list(result)
                self._rename_outputs(names)
            values = [result[name] for name in names]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        else:
            raise InferenceError(
                f"the model returned a {type(result).__name__}; it must return a tensor, a "
                f"tuple of tensors or a dict of tensors"
            )
        if len(values) != len(self.signature.outputs) and not isinstance(result, dict):
            self._rename_outputs(_output_names(len(values)))
        arrays = []
        for value in values:
            if not isinstance(value, torch.Tensor):
                raise InferenceError(f"the model returned a {type(value).__name__}, not a tensor")
            if value.dtype == torch.bfloat16:
                value = value.float()
            arrays.append(value.detach().cpu().numpy())
        return arrays

    def _rename_outputs(self, names: list[str]) -> None:
        if self._declared:
            raise InferenceError(
                f"the model returned {len(names)} outputs, but its signature declares "
                f"{len(self.signature.outputs)}: fix the signature's outputs"
            )
        outputs = [TensorSpec(n, np.dtype(np.float32), None) for n in names]
        self.signature = TensorSignature(self.signature.inputs, outputs)

    def run(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = []
        for spec in self.signature.inputs:
            array = tensors[spec.name]
            if not array.flags.writeable or not array.flags.c_contiguous:
                array = np.ascontiguousarray(array).copy()
            args.append(torch.from_numpy(array).to(self.device))
        try:
            with torch.inference_mode():
                result = self.module(*args)
        except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
            if "out of memory" in str(exc):
                raise InferenceError(f"the model ran out of memory: {_first_line(exc)}") from None
            raise InvalidInput(f"the model rejected the input: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"the model failed: {_first_line(exc)}") from None
        return self._to_arrays(result)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
