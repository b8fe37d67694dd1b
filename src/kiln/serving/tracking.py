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
    good = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(good) != len(values):
        _warn_once(api, "regression tracking needs numbers")
        return None
    return [float(v) for v in good]
