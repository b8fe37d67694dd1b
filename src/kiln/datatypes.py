"""Open Inference Protocol datatype names and numpy dtypes: the one table.

Runtimes describe their signatures with these names and the serving layer
encodes tensors with them, so both read this leaf module (it imports only
numpy) rather than each keeping a copy that can drift.
"""

from __future__ import annotations

import numpy as np

V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}
# Keyed by the dtype's string ("<f4"): hashing and comparing np.dtype objects costs
# microseconds per lookup, and this runs for every output tensor of every answer.
V2_BY_DTYPE_STR = {dtype.str: name for name, dtype in V2_TO_NUMPY.items()}


def v2_name(dtype: np.dtype | type) -> str:
    """The V2 datatype of a numpy dtype: strings and objects are BYTES; an unknown
    dtype keeps numpy's own name, so an error message can show it."""
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    if dtype.kind in "OUS":
        return "BYTES"
    return V2_BY_DTYPE_STR.get(dtype.str) or NUMPY_TO_V2.get(dtype, str(dtype))
