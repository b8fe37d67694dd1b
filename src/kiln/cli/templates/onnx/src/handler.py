"""Request handler for the {{name}} API (ONNX runtime).

Kiln runs `model/model.onnx` with onnxruntime. These two optional functions
shape the JSON around it: `pre_inference` turns the request body into model
inputs, `post_inference` turns the model outputs into the response. Delete
either one to pass that side through unchanged.

    POST {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
    ->   {"predictions": [{"label": "setosa", "probabilities": {...}}]}

V2 (Open Inference Protocol) requests skip this file: they send tensors
straight to the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import kiln


def pre_inference(sample: Any, signature: list, metadata: dict) -> dict:
    """Turn the parsed JSON body into model inputs.

    `sample` is the parsed JSON body. `signature` lists the model's inputs as
    onnxruntime NodeArgs (`.name`, `.shape` such as ["N", 4], `.type` such as
    "tensor(float)"). `metadata` is the `metadata:` block of kiln.yaml.
    Return `{input_name: array}`, or a bare array when the model has one
    input. Raise `kiln.InvalidInput("...")` to answer 400 with a message.
    """
    if not isinstance(sample, dict) or "inputs" not in sample:
        raise kiln.InvalidInput('expected a JSON object {"inputs": [[4 numbers], ...]}')
    first = signature[0]
    width = first.shape[-1] if isinstance(first.shape[-1], int) else None
    try:
        rows = np.asarray(sample["inputs"], dtype=np.float32)
    except (TypeError, ValueError):
        raise kiln.InvalidInput('"inputs" must be a list of rows of numbers') from None
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2 or len(rows) == 0 or (width is not None and rows.shape[1] != width):
        raise kiln.InvalidInput(f'"inputs" must be rows of {width} numbers')
    return {first.name: rows}


def post_inference(prediction: list, signature: list, metadata: dict) -> Any:
    """Turn the model outputs into the JSON response.

    `prediction` is what onnxruntime's `session.run` returned: one array per
    model output, in order (here one: probabilities [N, 3]). Return anything
    JSON can encode.
    """
    probs = np.asarray(prediction[0])
    labels = metadata.get("labels") or [str(i) for i in range(probs.shape[-1])]
    return {
        "predictions": [
            {
                "label": labels[int(p.argmax())],
                "probabilities": {
                    label: round(float(v), 4) for label, v in zip(labels, p, strict=True)
                },
            }
            for p in probs
        ]
    }
