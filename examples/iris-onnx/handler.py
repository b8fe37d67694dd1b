"""Request handler for the iris API: named flower measurements in, a label out.

Cortex-style (seed 000) request handlers: Kiln calls `pre_inference` on the
parsed JSON body, runs model/iris.onnx with onnxruntime, then calls
`post_inference` on its outputs.

    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    -> {"label": "setosa", "probabilities": {"setosa": 0.98, ...}}

A list of several objects gets a list of answers, in order. `post_inference`
sees only the model outputs, so it answers one row with one object: a list
holding a single sample also gets a bare object back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import kiln

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def _row(item: Any) -> list[float]:
    if not isinstance(item, dict):
        raise kiln.InvalidInput(f"each sample must be an object with {', '.join(FEATURES)}")
    missing = [f for f in FEATURES if f not in item]
    if missing:
        raise kiln.InvalidInput(f"missing field(s): {', '.join(missing)}")
    try:
        return [float(item[f]) for f in FEATURES]
    except (TypeError, ValueError):
        raise kiln.InvalidInput(f"{', '.join(FEATURES)} must be numbers") from None


def pre_inference(sample: Any, signature: list, metadata: dict) -> dict:
    """JSON object (or list of objects) -> {"input": float32 [N, 4]}.

    `signature` is the model's inputs as onnxruntime NodeArgs; the one input
    is named "input". Raises `kiln.InvalidInput` (a 400) for a missing or
    non-numeric field.
    """
    items = sample if isinstance(sample, list) else [sample]
    if not items:
        raise kiln.InvalidInput("expected at least one sample")
    rows = np.asarray([_row(item) for item in items], dtype=np.float32)
    return {signature[0].name: rows}


def post_inference(prediction: list, signature: list, metadata: dict) -> Any:
    """[probabilities [N, 3], label [N]] -> one answer per row.

    One row gives one object; several rows give a list, in request order.
    """
    probabilities = np.asarray(prediction[0])
    indices = np.asarray(prediction[1]) if len(prediction) > 1 else probabilities.argmax(axis=1)
    labels = metadata["labels"]
    answers = [
        {
            "label": labels[int(i)],
            "probabilities": {
                name: round(float(p), 4) for name, p in zip(labels, row, strict=True)
            },
        }
        for i, row in zip(indices, probabilities, strict=True)
    ]
    return answers[0] if len(answers) == 1 else answers
