"""Request handler of `resnet-18` (an ONNX texture classifier): image bytes in, top-5 out.

On the TorchServe route the body arrives as bytes (`curl -T img` or
`-F data=@img`); on the V1 route an instance may be `{"data": "<base64>"}`
(TorchServe's KServe format) or `{"b64": ...}`.

    kitten_small.jpg -> {"striped": 0.97, "dotted": 0.02, ...}
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from images import decode_image
from textures import features, top_k

import kiln


def image_bytes(sample: Any) -> bytes:
    """The image in a request: raw bytes, or base64 under "data"/"b64" in a JSON object."""
    if isinstance(sample, list) and sample:
        sample = sample[-1]
    if isinstance(sample, dict):
        encoded = sample.get("data", sample.get("b64", sample.get("body")))
        if isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise kiln.InvalidInput('"data" must be a base64-encoded image') from None
        raise kiln.InvalidInput('send the image as bytes, or as {"data": "<base64>"}')
    if isinstance(sample, (bytes, bytearray)):
        return bytes(sample)
    raise kiln.InvalidInput("send an image: curl -T image.png URL, or curl -F data=@image.png URL")


def pre_inference(sample: Any, signature: Any, metadata: dict) -> dict:
    image = decode_image(image_bytes(sample))
    return {"features": features(image)[None, :]}


def post_inference(prediction: list, signature: Any, metadata: dict) -> dict:
    probabilities = np.asarray(prediction[0])[0]
    return top_k(probabilities, metadata["labels"], int(metadata.get("top_k", 5)))
