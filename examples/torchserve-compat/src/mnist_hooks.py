"""Request handler of `mnist`: a 28x28 digit image in, the digit out.

Accepted inputs: PNG/PPM bytes (`curl -T 0.png`), `{"data": "<base64 png>"}`
(TorchServe's KServe V1 sample `mnist.json`), or 28x28 numbers (0-1 or 0-255).
Explanations come from Kiln's built-in explainer: the model is linear, so a
pixel's attribution is its value times the weight of the predicted digit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from image_hooks import image_bytes
from images import decode_image, resize, to_gray

import kiln

SIDE = 28


def pixels(sample: Any) -> np.ndarray:
    """float32 [28, 28] in [0, 1], white digit on black as in MNIST."""
    if isinstance(sample, list) and sample and not isinstance(sample[0], (bytes, dict)):
        array = np.asarray(sample, dtype=np.float32)
        if array.size != SIDE * SIDE:
            raise kiln.InvalidInput(f"send 28x28 numbers, got {array.size} values")
        array = array.reshape(SIDE, SIDE)
        return array / 255.0 if array.max() > 1 else array
    gray = to_gray(decode_image(image_bytes(sample)))
    if gray.shape != (SIDE, SIDE):
        gray = resize(gray, SIDE, SIDE)
    return gray


def pre_inference(sample: Any, signature: Any, metadata: dict) -> dict:
    return {"image": pixels(sample)[None, None, :, :]}


def post_inference(prediction: list, signature: Any, metadata: dict) -> Any:
    digits = np.asarray(prediction[0]).argmax(axis=-1)
    return int(digits[0]) if digits.size == 1 else digits.tolist()
