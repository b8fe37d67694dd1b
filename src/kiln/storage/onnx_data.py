"""ONNX external data must stay inside the model's folder.

An ONNX file may keep its weights in side files named by each tensor's
`external_data` `location`. A location of `../../home/user/.ssh/id_rsa` or
`/etc/passwd` would make the runtime read (and a client see, through the
model's outputs) a file that is not part of the model. onnxruntime checks this
too; Kiln checks first, without loading any weights, so the refusal names the
tensor and the path in words. Only the `onnx` package's protobuf is used
(`load_external_data=False`): no runtime is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.storage.errors import UnsafeArchive


def check_external_data(model_file: Path) -> None:
    """Raise UnsafeArchive if a tensor's external data would be read from outside the folder.

    Skipped (with nothing to check) when the `onnx` package is not installed:
    onnxruntime then refuses escaping paths itself, with a terser message.
    """
    try:
        import onnx
    except ImportError:
        return
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # noqa: BLE001 - a broken file is the runtime's error to report
        return
    folder = Path(os.path.realpath(model_file.parent))
    for tensor in _tensors(model.graph):
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None:
            continue
        target = Path(os.path.realpath(folder / location))
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise UnsafeArchive(
                f"the ONNX model {model_file.name} reads tensor '{tensor.name}' from "
                f"'{location}', which is outside the model's folder ({model_file.parent})",
                fix="re-save the model with its external data files next to it "
                "(onnx.save(..., save_as_external_data=True, location='weights.bin'))",
            )


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of a graph that may carry external data, subgraphs included."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
