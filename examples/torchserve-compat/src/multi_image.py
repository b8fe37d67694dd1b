"""`squeezenet1_1`: a model with two image inputs, answering one top-5 map per image.

TorchServe's multi-input example sends `-F data=@a.jpg -F data=@b.jpg`; Kiln
hands a handler that declares two inputs every part, in order. One image
(for example the `requests` snippet in the seed, whose dict keeps only its
last `data` key) gets a one-item list.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from image_hooks import image_bytes
from images import decode_image
from textures import features, top_k


class MultiImageClassifier:
    signature = {
        "inputs": [
            {"name": "image_0", "datatype": "BYTES", "shape": [-1]},
            {"name": "image_1", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": "top_k", "datatype": "BYTES", "shape": [-1]}],
    }

    def load(self, model_dir: str, config: dict) -> None:
        import onnxruntime as ort

        path = os.path.join(model_dir, config["model_file"])
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.labels = config["labels"]

    def predict(self, payload: Any, context: Any) -> list[dict[str, float]]:
        images = payload if isinstance(payload, list) else [payload]
        rows = np.stack([features(decode_image(image_bytes(item))) for item in images])
        (probabilities,) = self.session.run(None, {"features": rows})
        return [top_k(p, self.labels) for p in probabilities]
