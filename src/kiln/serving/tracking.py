"""Prediction monitoring, worker side: pull the tracked value out of an answer.

Seed-era `tracker: {key, model_type}` tracks the final response (after
post_inference): the `key` field of an object, or the response itself. On V2
traffic the output named by `key` (or the only output) is tracked. A missing
key or a value of the wrong type never changes the client's answer: it is
reported once per worker as a warning and skipped.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kiln.errors import InvalidInput

_warned: set[str] = set()


def _warn_once(api: str, message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"tracker warning for API '{api}': {message}\n")
        sys.stderr.flush()


def _scalars(value: Any) -> list[Any]:
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    if isinstance(value, np.generic):
        return [value.item()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for item in value:
            out.extend(_scalars(item))
        return out
    return [value]


def tracked_values(
    api: str, result: Any, key: str | None, model_type: str
) -> list[str | float] | None:
    """The values to count for one answer, or None (with a warning) when there are none."""
    if isinstance(result, dict):
        if key is None:
            if len(result) != 1:
                _warn_once(api, "the response is an object: set tracker.key to the field to track")
                return None
            value = next(iter(result.values()))
        elif key in result:
            value = result[key]
        else:
            _warn_once(api, f"the response has no field '{key}' (tracker.key)")
            return None
    elif isinstance(result, list) and key is not None:
        picked = [r[key] for r in result if isinstance(r, dict) and key in r]
        if not picked:
            _warn_once(api, f"the response has no field '{key}' (tracker.key)")
            return None
        value = picked
    else:
        value = result
    values = _scalars(value)
    if model_type == "classification":
        good = [v for v in values if isinstance(v, (str, int)) and not isinstance(v, bool)]
        if len(good) != len(values):
            _warn_once(api, "classification tracking needs string or integer classes")
            return None
        return [str(v) for v in good]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(values):
        _warn_once(api, "regression tracking needs numbers")
        return None
    return [float(v) for v in numbers]


def check_tracker_at_load(spec: Any, pipeline: Any, signature: dict[str, Any]) -> None:
    """Refuse, when the worker loads, a tracker that can be seen to have nothing to count.

    Knowable only for a tensor model whose answer is its raw outputs (no
    post_inference): several outputs and no `key`, or a `key` naming no output.
    Anything else (handlers, post_inference) is checked per answer, with a warning.
    """
    if not getattr(spec, "tracker_type", None):
        return
    hooks = getattr(pipeline, "hooks", None)
    if hooks is None or hooks.post is not None:
        return
    names = [out["name"] for out in signature.get("outputs", [])]
    listed = ", ".join(f"'{n}'" for n in names)
    if spec.tracker_key is None and len(names) > 1:
        raise InvalidInput(
            f"tracker: the model answers with {len(names)} outputs ({listed}), so the tracker "
            f"needs to know which to count; add `key: <output name>` to the tracker block"
        )
    if spec.tracker_key is not None and names and spec.tracker_key not in names:
        raise InvalidInput(
            f"tracker.key '{spec.tracker_key}' is not an output of the model (outputs: "
            f"{listed}); set key to one of them, or add a post_inference that returns it"
        )
