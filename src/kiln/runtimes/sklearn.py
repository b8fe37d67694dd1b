"""scikit-learn estimators (the Kiln's `sklearn` extra: scikit-learn and skops).

A `.skops` file is loaded with skops, which rebuilds only types it trusts and
names the rest; those names are shown to the user, who may trust them with
`trusted: true`. A `.joblib` / `.pkl` file is a pickle (loading it runs any
code it contains), so it loads only when the config says `trusted: true`.

The estimator is served as a tensor runtime, so batching, replicas, request
handlers and every protocol work as for ONNX: one input, `input` (float64 rows
of `n_features_in_` features), and one output named after the method
(`predict`, `predict_proba`, ...), as MLServer's sklearn runtime names them.
`predict` answers class labels, which the tracker's classification view counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
import numpy as np
import sklearn  # type: ignore[import-untyped]  # noqa: F401 - the registry checks it; untyped

from kiln.config.blocks import SKLEARN_METHODS
from kiln.errors import InferenceError, InvalidInput
from kiln.runtimes.base import ModelLoadError, TensorRuntime, TensorSignature, TensorSpec
from kiln.worker_spec import WorkerSpec

_PICKLES = (".joblib", ".pkl", ".pickle")
_SKOPS = (".skops",)


def _model_file(spec: WorkerSpec) -> Path:
    """The model file; a directory holding exactly one estimator file stands for it."""
    path = Path(spec.model_path or "")
    if not path.exists():
        raise ModelLoadError(f"the model path {path} does not exist")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in _SKOPS + _PICKLES)
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise ModelLoadError(
                f"the model directory {path} must hold exactly one .skops, .joblib or .pkl "
                f"file; found: {listed}. Point sklearn.model at the file."
            )
        path = found[0]
    if path.suffix not in _SKOPS + _PICKLES:
        raise ModelLoadError(
            f"{path.name}: the sklearn runtime reads .skops files (safe) and, when trusted, "
            f".joblib / .pkl files; save the estimator with skops.io.dump(model, 'model.skops')"
        )
    return path


def _load_skops(path: Path, spec: WorkerSpec) -> Any:
    import skops.io as sio  # type: ignore[import-untyped]  # skops ships no type hints

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - a damaged file: zip, JSON or schema errors
        raise ModelLoadError(f"cannot read the skops file {path}: {exc}") from None
    if untrusted and not spec.trusted:
        listed = "\n".join(f"  - {name}" for name in untrusted)
        raise ModelLoadError(
            f"{path.name} contains types that skops does not trust by default, because "
            f"loading them can run code:\n{listed}\nIf you made this file or trust where it "
            f"came from, add 'trusted: true' to the sklearn block of API '{spec.api}' in "
            f"kiln.yaml; their code must be importable (set python_path to its folder)."
        )
    try:
        return sio.load(path, trusted=untrusted or None)
    except Exception as exc:  # noqa: BLE001 - skops re-imports the types it rebuilds
        raise ModelLoadError(f"cannot load the skops file {path}: {exc}") from None


def _load_pickle(path: Path, spec: WorkerSpec) -> Any:
    if not spec.trusted:
        raise ModelLoadError(
            f"{path.name} is a pickle file: loading it runs whatever code it contains, so "
            f"Kiln loads it only when you say you trust it. If you made this file or trust "
            f"where it came from, add 'trusted: true' to the sklearn block of API "
            f"'{spec.api}' in kiln.yaml. Safer: save the estimator with skops "
            f"(skops.io.dump(model, 'model.skops')), which needs no trust for standard "
            f"scikit-learn types."
        )
    try:
        return joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
        raise ModelLoadError(
            f"cannot load the trusted pickle {path}: {type(exc).__name__}: {exc} (the code "
            f"it pickled must be importable: set python_path to its folder)"
        ) from None


def _output_spec(estimator: Any, method: str) -> TensorSpec:
    """Class labels keep the classes' dtype (strings become BYTES); scores are float64."""
    classes = getattr(estimator, "classes_", None)
    if method == "predict":
        if classes is not None:
            dtype = np.dtype(np.object_) if np.asarray(classes).dtype.kind in "USO" else None
            dtype = dtype or np.asarray(classes).dtype
            return TensorSpec(method, dtype, (None,))
        return TensorSpec(method, np.dtype(np.float64), None)
    if method in ("predict_proba", "predict_log_proba") and classes is not None:
        return TensorSpec(method, np.dtype(np.float64), (None, len(classes)))
    return TensorSpec(method, np.dtype(np.float64), None)


class SklearnRuntime(TensorRuntime):
    """One estimator and the method the config names (`predict` by default)."""

    def __init__(self, spec: WorkerSpec) -> None:
        path = _model_file(spec)
        loader = _load_skops if path.suffix in _SKOPS else _load_pickle
        self.estimator = loader(path, spec)
        self.method = spec.method or "predict"
        call = getattr(self.estimator, self.method, None)
        if not callable(call):
            offered = [m for m in SKLEARN_METHODS if callable(getattr(self.estimator, m, None))]
            raise ModelLoadError(
                f"{type(self.estimator).__name__} has no {self.method}() (sklearn.method); "
                f"it offers: {', '.join(offered) or 'none of the inference methods'}"
            )
        self._call = call
        features = getattr(self.estimator, "n_features_in_", None)
        self.signature = TensorSignature(
            [TensorSpec("input", np.dtype(np.float64), (None, features))],
            [_output_spec(self.estimator, self.method)],
        )

    def run(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = tensors["input"]
        try:
            result = self._call(rows)
        except ValueError as exc:
            raise InvalidInput(f"the model rejected the input: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"the model failed: {_first_line(exc)}") from None
        result = np.asarray(result)
        if result.dtype.kind in "US":  # string labels: Python str, so V2 answers BYTES
            result = result.astype(object)
        return [result]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
