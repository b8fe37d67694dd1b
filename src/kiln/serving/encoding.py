"""Turning what user code returns into response bytes, in the worker."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from kiln.errors import InferenceError

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):  # non-contiguous or an object array
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)


def dumps(value: Any) -> bytes:
    """JSON bytes for a result; a value JSON cannot hold is the handler's error (500)."""
    try:
        return orjson.dumps(value, default=_fallback, option=_OPTIONS)
    except TypeError as exc:
        raise InferenceError(
            f"the handler returned a value that cannot be sent as JSON ({exc}); return "
            f"dicts, lists, strings, numbers, numpy arrays or bytes"
        ) from None


def encode_result(value: Any) -> tuple[bytes, str]:
    """(body, content type): bytes pass through as octet-stream, everything else is JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "application/octet-stream"
    return dumps(value), "application/json"


def preview(value: Any, limit: int = 2000) -> str:
    """A short readable form of a value for debug logs."""
    if isinstance(value, np.ndarray):
        values = np.array2string(value, threshold=50)
        text = f"array(shape={list(value.shape)}, dtype={value.dtype}) {values}"
    elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        text = "[" + ", ".join(preview(v, limit) for v in value) + "]"
    else:
        try:
            text = dumps(value).decode()
        except InferenceError:
            text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
