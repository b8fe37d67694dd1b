"""Request handler for the {{name}} API.

Kiln creates one `Model` per worker, calls `load` once, then `predict` for
each request. Every hook Kiln knows is below; delete the optional ones you do
not need. The model shipped in `model/weights.json` is a small logistic
regression for iris flowers, so the API answers real questions as created:

    POST {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
    ->   {"predictions": [{"label": "setosa", "probabilities": {...}}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

import kiln


class Model:
    # Optional: describe the inputs and outputs (name, datatype, shape) for the
    # model metadata routes and generated docs.
    # signature = {
    #     "inputs": [{"name": "inputs", "datatype": "FP32", "shape": [-1, 4]}],
    #     "outputs": [{"name": "predictions", "datatype": "BYTES", "shape": [-1]}],
    # }

    def load(self, model_dir: str, config: dict) -> None:
        """Called once per worker before the first request.

        `model_dir` is the absolute path of the `model:` folder in kiln.yaml
        (also in the MODEL_DIR environment variable); `config` is the
        `config:` block of kiln.yaml. Load weights here, not per request.
        """
        weights = json.loads((Path(model_dir) / "weights.json").read_text())
        self.features: list[str] = weights["features"]
        self.labels: list[str] = weights["labels"]
        self.coef = np.asarray(weights["coef"], dtype=np.float64)
        self.intercept = np.asarray(weights["intercept"], dtype=np.float64)
        self.decimals = int(config.get("decimals", 4))

    def predict(self, payload: Any, context: Any) -> dict:
        """Answer one request.

        `payload` is the parsed JSON body. `context` carries request_id,
        headers, api, version, protocol, metadata and config, and lets you set
        the response status and headers: `context.set_status(201)`,
        `context.set_header("x-model", "iris")`. Return anything JSON can
        encode. Raise `kiln.InvalidInput("...")` to answer 400 with a message.
        """
        rows = self._rows(payload)
        return {"predictions": self._answer(rows)}

    def predict_batch(self, payloads: list, contexts: list) -> list:
        """Optional: answer several requests in one call.

        Used when kiln.yaml has a `batching:` block. Return a list of the same
        length; a failure for one request is an exception instance in its slot
        (the others still succeed). Without this method Kiln calls `predict`
        once per request.
        """
        results: list[Any] = [None] * len(payloads)
        parts, slots = [], []
        for i, payload in enumerate(payloads):
            try:
                parts.append(self._rows(payload))
                slots.append(i)
            except kiln.InvalidInput as err:
                results[i] = err
        if parts:
            answers = self._answer(np.concatenate(parts))  # one matrix product for all
            start = 0
            for i, part in zip(slots, parts, strict=True):
                results[i] = {"predictions": answers[start : start + len(part)]}
                start += len(part)
        return results

    def explain(self, payload: Any, context: Any) -> dict:
        """Optional: say why. Served on the explanations routes.

        For a linear model, each feature's contribution to the winning class
        score is its weight times its value.
        """
        rows = self._rows(payload)
        answers = self._answer(rows)
        for row, answer in zip(rows, answers, strict=True):
            k = self.labels.index(answer["label"])
            answer["contributions"] = {
                f: round(float(w * x), self.decimals)
                for f, w, x in zip(self.features, self.coef[k], row, strict=True)
            }
        return {"explanations": answers}

    # Helpers (not hooks): anything not named above is yours.

    def _rows(self, payload: Any) -> np.ndarray:
        """Validate `{"inputs": [[4 numbers], ...]}` into an [N, 4] array."""
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise kiln.InvalidInput('expected a JSON object {"inputs": [[4 numbers], ...]}')
        try:
            rows = np.asarray(payload["inputs"], dtype=np.float64)
        except (TypeError, ValueError):
            raise kiln.InvalidInput('"inputs" must be a list of rows of numbers') from None
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != len(self.features) or len(rows) == 0:
            raise kiln.InvalidInput(
                f'"inputs" must be rows of {len(self.features)} numbers: '
                + ", ".join(self.features)
            )
        return rows

    def _answer(self, rows: np.ndarray) -> list[dict]:
        scores = rows @ self.coef.T + self.intercept
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=1, keepdims=True)
        return [
            {
                "label": self.labels[int(p.argmax())],
                "probabilities": {
                    label: round(float(v), self.decimals)
                    for label, v in zip(self.labels, p, strict=True)
                },
            }
            for p in probs
        ]
