"""`ts.utils.util`: PredictionException and the helpers TorchServe handlers import."""

from __future__ import annotations

import inspect
import json
import os
from types import ModuleType
from typing import Any

from kiln.handlers.torchserve_context import PredictionException

__all__ = [
    "PredictionException",
    "list_classes_from_module",
    "load_label_mapping",
    "map_class_to_label",
]


def list_classes_from_module(module: ModuleType, parent_class: type | None = None) -> list[type]:
    """The classes `module` itself defines (not the ones it imports), optionally of a kind."""
    own = [
        value
        for _, value in inspect.getmembers(module, inspect.isclass)
        if value.__module__ == module.__name__
    ]
    return [c for c in own if parent_class is None or issubclass(c, parent_class)]


def load_label_mapping(mapping_file_path: str) -> dict[str, str] | None:
    """index_to_name.json as {"0": "label"}; None when the file is absent."""
    if not os.path.isfile(mapping_file_path):
        return None
    with open(mapping_file_path, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict):
        raise ValueError(f'{mapping_file_path} must map class ids to labels, e.g. {{"0": "cat"}}')
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        return {str(i): str(name) for i, name in enumerate(names)}
    out: dict[str, str] = {}
    for key, value in mapping.items():
        label = value[-1] if isinstance(value, list) and value else value
        if not isinstance(label, str):
            raise ValueError(f"{mapping_file_path}: the label of {key!r} must be a string")
        out[str(key)] = label
    return out


def map_class_to_label(
    probs: list[Any], mapping: dict[str, str] | None = None, lbl_classes: Any = None
) -> list[dict[str, Any]]:
    """Per row, {label (or class id): probability}, for the classes given (default: all)."""
    if not isinstance(probs, list):
        raise TypeError("map_class_to_label needs a list; call .tolist() on the tensor first")
    rows = []
    for index, row in enumerate(probs):
        classes = lbl_classes[index] if lbl_classes is not None else range(len(row))
        rows.append(
            {
                (mapping[str(c)] if mapping is not None else str(c)): p
                for c, p in zip(classes, row, strict=False)
            }
        )
    return rows
