"""Does an Open Inference Protocol (V2) request fit the model's declared signature?

`check_signature` answers 400 naming the tensor (an unknown or missing input, a
datatype or shape the model does not take, an unknown requested output) before
any tensor data is decoded or any model runs. The V2 adapter and the gRPC
service call it on binary requests; the worker calls it on the JSON requests it
parses itself. A signature is prepared once (`_Checks`: lookups instead of
per-request scans) and kept while its dict lives.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import InvalidInput
from kiln.serving.v2_tensors import InferBody, InputHeader


class _Checks:
    """A signature prepared for `check_signature`: lookups instead of per-request scans."""

    __slots__ = ("inputs", "names", "outputs", "known_outputs")

    def __init__(self, signature: dict[str, Any]) -> None:
        declared = signature.get("inputs") or []
        # name -> (the declared spec, its datatype or None, (axis, dim) pairs that must
        # match, rank or None): rank None leaves the shape unchecked
        self.inputs: dict[str, tuple[dict[str, Any], Any, tuple[tuple[int, int], ...], Any]] = {}
        for spec in declared:
            shape = spec.get("shape")
            fixed = tuple(
                (axis, dim) for axis, dim in enumerate(shape or ()) if dim is not None and dim >= 0
            )
            self.inputs[spec["name"]] = (
                spec,
                spec.get("datatype"),
                fixed,
                len(shape) if shape else None,
            )
        self.names = ", ".join(f"'{n}'" for n in self.inputs)
        self.outputs = frozenset(o["name"] for o in signature.get("outputs") or [])
        self.known_outputs = ", ".join(f"'{o['name']}'" for o in signature.get("outputs") or [])


# id(signature) -> (the signature, its checks). A worker's signature is one dict for the
# life of its replica, so this holds a few entries; the signature is kept so that its id
# cannot be reused by another dict while the entry lives.
_CHECKS: dict[int, tuple[dict[str, Any], _Checks]] = {}


def _checks_for(signature: dict[str, Any]) -> _Checks:
    entry = _CHECKS.get(id(signature))
    if entry is not None and entry[0] is signature:
        return entry[1]
    checks = _Checks(signature)
    if len(_CHECKS) >= 64:
        _CHECKS.clear()
    _CHECKS[id(signature)] = (signature, checks)
    return checks


def check_signature(body: InferBody, signature: dict[str, Any]) -> None:
    """400 naming the tensor when the request does not fit the model's declared signature.

    A signature with no inputs (a Python handler that declares none) accepts anything;
    a declared input without a datatype or shape leaves that part unchecked.
    """
    checks = _checks_for(signature)
    by_name = checks.inputs
    if by_name:
        for spec in body.inputs:
            if spec.name not in by_name:
                raise InvalidInput(
                    f"unknown input '{spec.name}': the model's inputs are {checks.names}"
                )
        # Input names are unique and all known here, so equal counts mean none is missing.
        if len(body.inputs) != len(by_name):
            sent = {spec.name for spec in body.inputs}
            for name in by_name:
                if name not in sent:
                    raise InvalidInput(
                        f"missing input '{name}': the model's inputs are {checks.names}"
                    )
        for spec in body.inputs:
            want, datatype, fixed, rank = by_name[spec.name]
            if datatype and spec.datatype != datatype:
                _check_input(spec, want)  # raises, with the message
            if rank is not None:
                shape = spec.shape
                if len(shape) != rank:
                    _check_input(spec, want)
                for axis, dim in fixed:
                    if shape[axis] != dim:
                        _check_input(spec, want)
    if checks.outputs and body.outputs:
        for name in body.outputs:
            if name not in checks.outputs:
                raise InvalidInput(
                    f"unknown output '{name}': the model's outputs are {checks.known_outputs}"
                )


def _check_input(spec: InputHeader, want: dict[str, Any]) -> None:
    datatype = want.get("datatype")
    if datatype and spec.model_datatype != datatype:
        extra = " (BF16 is accepted where the model takes FP32)" if datatype == "FP32" else ""
        raise InvalidInput(
            f"input '{spec.name}' has datatype {spec.datatype}, but the model takes "
            f"{datatype}: send {datatype} data{extra}"
        )
    shape = want.get("shape")
    if not shape:  # unknown rank
        return
    expected = "[" + ", ".join("-1" if d is None or d < 0 else str(d) for d in shape) + "]"
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input '{spec.name}' has shape {spec.shape}, but the model takes {expected} "
            f"(rank {len(shape)}); -1 is any size"
        )
    for axis, (dim, got) in enumerate(zip(shape, spec.shape, strict=True)):
        if dim is not None and dim >= 0 and dim != got:
            raise InvalidInput(
                f"input '{spec.name}' has shape {spec.shape}, but the model takes {expected}: "
                f"dimension {axis} must be {dim}"
            )
