"""Handwritten digits, CellStrat Hub style: one decorated function.

Kiln sets MODEL_DIR (the `model:` folder of kiln.yaml) before importing this
file, so the model loads once, at import, and every request reuses it.

Input: one 8x8 grayscale image, pixel values 0-16 (as in scikit-learn's
digits data set), as a flat list of 64 numbers or as 8 rows of 8; or a list
of such images.
Output: {"digit": 0, "probability": 0.99} per image (a list for a list).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import kiln

MODEL_DIR = Path(os.environ["MODEL_DIR"])

_weights = np.load(MODEL_DIR / "weights.npz", allow_pickle=False)
COEF = _weights["coef"]  # [10, 64]
INTERCEPT = _weights["intercept"]  # [10]
CLASSES = _weights["classes"]  # [10]: the digits 0-9
SCALE = float(_weights["scale"])  # raw pixel values are divided by this

EXPECTED = "expected one 8x8 image (64 numbers, or 8 rows of 8) or a list of them"


def _images(inputs: Any) -> tuple[np.ndarray, bool]:
    """Parse the body into [N, 64] pixels; say whether it was one image."""
    try:
        arr = np.asarray(inputs, dtype=np.float64)
    except (TypeError, ValueError):
        raise kiln.InvalidInput(EXPECTED) from None
    if arr.shape in ((64,), (8, 8)):
        return arr.reshape(1, 64), True
    if arr.ndim == 2 and arr.shape[1] == 64 and len(arr) > 0:
        return arr, False
    if arr.ndim == 3 and arr.shape[1:] == (8, 8) and len(arr) > 0:
        return arr.reshape(-1, 64), False
    raise kiln.InvalidInput(f"{EXPECTED}; got shape {list(arr.shape)}")


@kiln.handler
def inference_handler(inputs: Any, context: Any) -> Any:
    """`inputs` is the parsed JSON body; return anything JSON can encode."""
    pixels, single = _images(inputs)
    scores = (pixels / SCALE) @ COEF.T + INTERCEPT
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    answers = [
        {"digit": int(CLASSES[k]), "probability": round(float(p[k]), 4)}
        for k, p in zip(best, probs, strict=True)
    ]
    return answers[0] if single else answers
