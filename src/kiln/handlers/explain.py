"""Built-in, model-agnostic explanations for tensor models: feature ablation.

For each input feature of each instance, Kiln replaces that one value with a
baseline (0) and runs the model again; the attribution of the feature is how
much the explained output drops. All perturbed copies run as batches through
the same model, so the cost is one model call per `chunk` perturbations.
For a linear model with a zero baseline the attribution of feature j is
exactly x_j * w_j, which is how the tests check it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.errors import NotImplementedByApi

CHUNK = 256
MAX_FEATURES = 4096


def _target_values(output: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """The explained scalar per row: the chosen class's score, or the single output."""
    flat = output.reshape(output.shape[0], -1)
    if flat.shape[1] == 1:
        return flat[:, 0], None
    chosen = targets if targets is not None else flat.argmax(axis=1)
    return flat[np.arange(flat.shape[0]), chosen], chosen


def feature_ablation(
    run: Any, tensors: dict[str, np.ndarray], baseline: float = 0.0
) -> dict[str, Any]:
    """Attributions for every feature of every input, for the model's first output."""
    outputs = run(tensors)
    first = np.asarray(outputs[0])
    if first.ndim == 0 or first.dtype.kind not in "biuf":
        raise NotImplementedByApi(
            "this model's first output is not numeric per instance, so the built-in "
            "explainer cannot attribute it; add an explain(payload, context) method"
        )
    reference, targets = _target_values(first.astype(np.float64), None)
    rows = first.shape[0]
    attributions: dict[str, Any] = {}
    for name, array in tensors.items():
        if array.dtype.kind not in "biuf":
            continue
        features = int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
        if features > MAX_FEATURES:
            raise NotImplementedByApi(
                f"input '{name}' has {features} features per instance, more than the built-in "
                f"explainer handles ({MAX_FEATURES}); add an explain(payload, context) method"
            )
        result = np.zeros((rows, features))
        jobs = [(r, f) for r in range(rows) for f in range(features)]
        for start in range(0, len(jobs), CHUNK):
            chunk = jobs[start : start + CHUNK]
            batch = {
                other: np.repeat(value[[r for r, _ in chunk]], 1, axis=0)
                for other, value in tensors.items()
            }
            perturbed = batch[name].reshape(len(chunk), -1).copy()
            perturbed[np.arange(len(chunk)), [f for _, f in chunk]] = baseline
            batch[name] = perturbed.reshape((len(chunk), *array.shape[1:])).astype(array.dtype)
            out = np.asarray(run(batch)[0]).astype(np.float64)
            rows_idx = np.array([r for r, _ in chunk])
            chosen = None if targets is None else targets[rows_idx]
            values, _ = _target_values(out, chosen)
            result[rows_idx, [f for _, f in chunk]] = reference[rows_idx] - values
        attributions[name] = result.reshape((rows, *array.shape[1:])).tolist()
    explanation: dict[str, Any] = {
        "method": "feature_ablation",
        "baseline": baseline,
        "output": outputs and np.asarray(outputs[0]).tolist(),
        "attributions": attributions,
    }
    if targets is not None:
        explanation["target"] = np.asarray(targets).tolist()
    return explanation


# ----- the answer's shape per protocol -------------------------------------------------
# TorchServe's /explanations/{m} and KServe V1's :explain answer what Captum returns
# through a TorchServe handler: bare nested lists of attributions. Kiln's own object
# (method, baseline, output, target, attributions by input name) is the native route's
# answer, and the TorchServe and V1 routes give it with `?format=kiln`.
BARE_PROTOCOLS = frozenset({"torchserve", "v1"})
KILN_FORMAT = "kiln"


def wants_bare(protocol: str, query: dict[str, str]) -> bool:
    """Whether the explanation goes out as TorchServe's bare attribution lists."""
    return protocol in BARE_PROTOCOLS and query.get("format") != KILN_FORMAT


def bare_attributions(explanation: dict[str, Any], input_names: list[str], unbatched: bool) -> Any:
    """TorchServe's shape: one nested list per input, in signature order.

    A model with one input answers that input's list itself (shaped exactly like the
    input as sent: an instance sent without its batch axis gets its attributions
    without it too); several inputs answer a list of them. An input the explainer
    cannot attribute (strings) holds `null`, so positions still match the signature.
    """
    attributions = explanation.get("attributions") or {}
    lists = []
    for name in input_names:
        values = attributions.get(name)
        if values is not None and unbatched:
            values = values[0]
        lists.append(values)
    return lists[0] if len(lists) == 1 else lists


def shaped_for(
    explanation: dict[str, Any], context: Any, input_names: list[str], unbatched: bool
) -> Any:
    """The built-in explanation in the shape the request's protocol promises."""
    if wants_bare(context.protocol, context.query):
        return bare_attributions(explanation, input_names, unbatched)
    return explanation
