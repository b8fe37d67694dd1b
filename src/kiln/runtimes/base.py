"""What every tensor runtime (onnx, tensorflow, torch) offers the worker.

JSON arrives as nested lists; `TensorSignature.to_tensors` turns it into named,
typed, shape-checked numpy arrays once, here, so every runtime gets the same
validation and every client the same 400 messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.datatypes import V2_TO_NUMPY, v2_name
from kiln.errors import InvalidInput, KilnError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named input or output: dims are ints, or None where any size is allowed."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": v2_name(self.dtype),
            "shape": [-1 if d is None else d for d in self.shape] if self.shape else [],
        }

    def shape_text(self) -> str:
        if self.shape is None:
            return "any shape"
        return "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"


def _cast(name: str, value: Any, spec: TensorSpec) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        array = np.asarray(value, dtype=object)
    if array.dtype.kind == "f" and spec.dtype.kind == "f":  # the common case: no checks apply
        return array.astype(spec.dtype, copy=False)
    if array.dtype == object and spec.dtype != np.object_:
        raise InvalidInput(
            f"input '{name}' is not a rectangular array of numbers: every row must have "
            f"the same length (expected shape {spec.shape_text()})"
        )
    if array.dtype.kind in "US" and spec.dtype.kind in "biuf":
        raise InvalidInput(
            f"input '{name}' must hold {spec.dtype.name} numbers, but it holds strings"
        )
    if spec.dtype.kind in "iu" and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.floor(array)):
            raise InvalidInput(
                f"input '{name}' must hold integers ({spec.dtype.name}), but it holds "
                f"fractional numbers"
            )
    try:
        return array.astype(spec.dtype, copy=False)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}' cannot be read as {spec.dtype.name}: {exc}") from None


class TensorSignature:
    """The inputs and outputs of a model, and the JSON -> tensor conversion."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.output_names = [spec.name for spec in outputs]  # read per answer: built once
        self._by_name = {spec.name: spec for spec in inputs}
        # One input (most models): its spec and rank facts, so `to_tensors` skips the
        # per-request name checks and `_fit_rank`'s general walk when the sample fits.
        self._fit = _RankFit(inputs[0]) if len(inputs) == 1 else None

    def describe(self) -> dict[str, Any]:
        return {
            "inputs": [spec.describe() for spec in self.inputs],
            "outputs": [spec.describe() for spec in self.outputs],
        }

    def to_tensors(self, sample: Any) -> tuple[dict[str, np.ndarray], bool]:
        """Named arrays from a JSON sample, and whether the batch axis was added for it."""
        fit = self._fit
        if fit is not None:
            single = fit.spec
            if not isinstance(sample, dict):
                value = sample
            elif len(sample) == 1 and single.name in sample:
                value = sample[single.name]
            else:
                return self._to_tensors(sample)
            array, added = fit.fit(_cast(single.name, value, single))
            return {single.name: array}, added
        return self._to_tensors(sample)

    def _to_tensors(self, sample: Any) -> tuple[dict[str, np.ndarray], bool]:
        names = ", ".join(f"'{s.name}'" for s in self.inputs)
        if isinstance(sample, dict) and (len(self.inputs) > 1 or self.inputs[0].name in sample):
            unknown = [key for key in sample if key not in self._by_name]
            if unknown:
                raise InvalidInput(f"unknown input '{unknown[0]}': the model's inputs are {names}")
            missing = [spec.name for spec in self.inputs if spec.name not in sample]
            if missing:
                raise InvalidInput(f"missing input '{missing[0]}': the model's inputs are {names}")
            named = sample
        elif len(self.inputs) == 1:
            named = {self.inputs[0].name: sample}
        else:
            raise InvalidInput(
                f"this model has {len(self.inputs)} inputs ({names}): send a JSON object "
                f"with one key per input"
            )
        tensors: dict[str, np.ndarray] = {}
        unbatched: set[bool] = set()
        for spec in self.inputs:
            array = _cast(spec.name, named[spec.name], spec)
            array, added = _fit_rank(spec, array)
            unbatched.add(added)
            tensors[spec.name] = array
        if len(unbatched) > 1:
            raise InvalidInput(
                "some inputs were sent with a batch axis and some without: send all of "
                "them as one instance or all of them as a batch"
            )
        return tensors, unbatched.pop()


class _RankFit:
    """`_fit_rank` for one spec with its facts worked out once: a fitting array costs a
    few comparisons; anything else goes to `_fit_rank`, which raises with the message."""

    __slots__ = ("spec", "rank", "addable", "fixed")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        shape = spec.shape
        self.rank = None if shape is None else len(shape)
        self.addable = shape is not None and len(shape) >= 1 and shape[0] in (None, 1)
        self.fixed = tuple((a, d) for a, d in enumerate(shape or ()) if d is not None)

    def fit(self, array: np.ndarray) -> tuple[np.ndarray, bool]:
        rank = self.rank
        if rank is None:
            return array, False
        ndim = array.ndim
        if ndim == rank:
            fitted, added = array, False
        elif ndim == rank - 1 and self.addable:
            fitted, added = array[np.newaxis, ...], True
        else:
            return _fit_rank(self.spec, array)
        shape = fitted.shape
        for axis, dim in self.fixed:
            if shape[axis] != dim:
                return _fit_rank(self.spec, array)
        return fitted, added


def _fit_rank(spec: TensorSpec, array: np.ndarray) -> tuple[np.ndarray, bool]:
    if spec.shape is None:
        return array, False
    rank = len(spec.shape)
    sent = list(array.shape)
    added = False
    if array.ndim == rank - 1 and rank >= 1 and spec.shape[0] in (None, 1):
        array = array[np.newaxis, ...]
        added = True
    if array.ndim != rank:
        raise InvalidInput(
            f"input '{spec.name}' has the wrong shape: expected {spec.shape_text()} "
            f"(rank {rank}), got {list(array.shape)} (rank {array.ndim})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if want is not None and want != got:
            if added:
                one = "[" + spec.shape_text()[1:].split(", ", 1)[-1]
                raise InvalidInput(
                    f"input '{spec.name}' has the wrong shape: expected {spec.shape_text()} "
                    f"for a batch or {one} for one instance, got {sent}"
                )
            raise InvalidInput(
                f"input '{spec.name}' has the wrong shape: expected {spec.shape_text()}, "
                f"got {sent} (dimension {axis} must be {want})"
            )
    return array, added


class InvalidSignature(KilnError):
    """A signature written in kiln.yaml or on a handler class cannot be read."""

    status = 500
    type = "InvalidSignature"


class ModelLoadError(KilnError):
    """The model file cannot be loaded: missing, of an unknown format, or refused as unsafe."""

    status = 503
    type = "ModelLoadError"


class TensorRuntime:
    """Base of tensor runtimes: a loaded model with a signature and a `run`."""

    signature: TensorSignature

    def handler_signature(self) -> Any:
        """What seed-era request handlers receive as `signature`."""
        return self.signature.inputs

    def handler_prediction(self, outputs: list[Any]) -> Any:
        """What `post_inference` receives: the outputs in signature order (ONNX's list)."""
        return outputs

    def run(self, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


_FROM_V2 = {**V2_TO_NUMPY, "BYTES": np.dtype(np.object_)}


def declared_signature(declared: Any, where: str) -> TensorSignature:
    """A signature written in kiln.yaml or on a handler class, in V2 metadata form.

    Formats that do not record their inputs (TorchScript, eager torch modules)
    take the user's word for them: `{"inputs": [{"name", "datatype", "shape"}],
    "outputs": [...]}`, with -1 for a dimension of any size. `where` names the
    place it was written, for the error message.
    """
    if not isinstance(declared, dict) or not isinstance(declared.get("inputs"), list):
        raise InvalidSignature(
            f"{where} must be a mapping with an 'inputs' list (and optionally 'outputs'), "
            f'e.g. {{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [-1, 4]}}]}}'
        )
    return TensorSignature(
        [_declared_spec(item, f"{where}.inputs[{i}]") for i, item in enumerate(declared["inputs"])],
        [
            _declared_spec(item, f"{where}.outputs[{i}]")
            for i, item in enumerate(declared.get("outputs") or [])
        ],
    )


def _declared_spec(item: Any, where: str) -> TensorSpec:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidSignature(f"{where} must be a mapping with a 'name'")
    datatype = str(item.get("datatype", "FP32")).upper()
    if datatype not in _FROM_V2:
        raise InvalidSignature(
            f"{where}: unknown datatype {item.get('datatype')!r}; use one of "
            f"{', '.join(sorted(_FROM_V2))}"
        )
    shape = item.get("shape")
    if shape is not None and (
        not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape)
    ):
        raise InvalidSignature(f"{where}: shape must be a list of whole numbers, -1 for any size")
    dims = None if shape is None else tuple(None if d == -1 else d for d in shape)
    return TensorSpec(item["name"], _FROM_V2[datatype], dims)
