"""The ``torchserve:`` runtime block and what a TorchServe project brings beside it.

``torchserve: {handler: src/handler.py[:entry], model: model/}`` serves a
TorchServe handler unchanged: ``handler`` is what torch-model-archiver's
``--handler`` names (a file, optionally with the function or class to use) and
``model`` the folder holding what the archive's serialized and extra files
would. Two things a TorchServe user never writes in a config are found here,
once, when the project loads:

- ``model-config.yaml`` beside the handler (TorchServe's per-model settings):
  minWorkers, maxWorkers, batchSize, maxBatchDelay and responseTimeout become
  kiln.yaml's compute, batching and serving values, unless kiln.yaml sets them.
- Streaming: TorchServe streams whenever the handler calls
  ``send_intermediate_predict_response``, with no flag anywhere. Kiln decides
  whether a route streams before the worker runs, so the handler's folder is
  read for that call and the API is marked ``streaming`` (as ``metadata:
  {streaming: true}`` would), unless kiln.yaml says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import field_validator

from kiln.config.blocks import Batching, _Block, _HandlerRef, parse_handler_ref

MODEL_CONFIG = "model-config.yaml"
STREAM_CALL = "send_intermediate_predict_response"

Report = Callable[[int, str, str, str], None]


class TorchServeBlock(_Block, _HandlerRef):
    """A TorchServe handler (function or BaseHandler-style class) and its model folder.

    ``serialized_file`` and ``model_file`` are torch-model-archiver's
    ``--serialized-file`` and ``--model-file`` (names inside ``model``); a
    ``MAR-INF/MANIFEST.json`` in ``model`` supplies them when present, and a
    lone ``.pt``/``.pth``/``.onnx`` file in ``model`` is the serialized file
    otherwise. ``trusted`` allows full-pickle weights, which run code when loaded.
    """

    handler: str
    model: str | None = None
    serialized_file: str | None = None
    model_file: str | None = None
    trusted: bool = False

    @field_validator("handler")
    @classmethod
    def _handler_form(cls, v: str) -> str:
        parse_handler_ref(v)
        return v


def handler_folder(block: TorchServeBlock) -> Path | None:
    """The folder of the handler file (absolute after load), if the handler is a file."""
    file = block.handler_file
    return Path(file).parent if file else None


def read_model_config(folder: Path) -> dict[str, Any] | None:
    """``model-config.yaml`` in ``folder`` as a mapping; None when there is none."""
    path = folder / MODEL_CONFIG
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def apply_torchserve(index: int, spec: Any, report: Report) -> None:
    """Fold a TorchServe project's model-config.yaml and streaming into ``spec``.

    Runs after paths are resolved. Only values kiln.yaml left unset change.
    """
    block = getattr(spec, "torchserve", None)
    if not isinstance(block, TorchServeBlock):
        return
    folder = handler_folder(block)
    if folder is None or not folder.is_dir():
        return
    try:
        settings = read_model_config(folder)
    except (OSError, yaml.YAMLError) as exc:
        report(
            index,
            "torchserve.handler",
            f"cannot read {folder / MODEL_CONFIG}: {exc}",
            "fix its YAML or remove the file",
        )
        settings = None
    if settings:
        _map_model_config(index, spec, settings, report)
    if "streaming" not in spec.metadata and "streaming" not in spec.config:
        if _calls_stream(folder):
            spec.metadata["streaming"] = True


def _map_model_config(index: int, spec: Any, settings: dict[str, Any], report: Report) -> None:
    where = f"{MODEL_CONFIG} beside the handler"

    def whole(key: str, low: int) -> int | None:
        value = settings.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            report(
                index,
                "torchserve.handler",
                f"{key} in {where} must be a whole number >= {low}, got {value!r}",
                f"set {key}: {max(low, 1)} (or remove it)",
            )
            return None
        return value

    compute = spec.compute
    explicit = compute.model_fields_set
    min_workers, max_workers = whole("minWorkers", 0), whole("maxWorkers", 1)
    if max_workers is not None and "max_replicas" not in explicit:
        compute.max_replicas = max_workers
    if min_workers is not None and "min_replicas" not in explicit:
        compute.min_replicas = min_workers
        # Compute's validator fills init_replicas (so it always reads as set): start warm
        # with at least minWorkers, as TorchServe does.
        compute.init_replicas = max(compute.init_replicas or 0, min_workers, 1)
    if compute.min_replicas > compute.max_replicas:
        report(
            index,
            "compute.min_replicas",
            f"min_replicas ({compute.min_replicas}) is above max_replicas "
            f"({compute.max_replicas}) after reading {where}",
            "make minWorkers <= maxWorkers, or set both in kiln.yaml",
        )
    size, delay = whole("batchSize", 1), settings.get("maxBatchDelay")
    if size is not None or delay is not None:
        batching = spec.batching or Batching()
        given = spec.batching.model_fields_set if spec.batching is not None else set()
        if size is not None and "max_batch_size" not in given:
            batching.max_batch_size = size
        if delay is not None and "max_batch_delay_ms" not in given:
            if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
                report(
                    index,
                    "torchserve.handler",
                    f"maxBatchDelay in {where} must be milliseconds >= 0, got {delay!r}",
                    "set maxBatchDelay: 100 (or remove it)",
                )
            else:
                batching.max_batch_delay_ms = float(delay)
        spec.batching = batching
    timeout = settings.get("responseTimeout")
    if timeout is not None and "response_timeout_s" not in spec.serving.model_fields_set:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            report(
                index,
                "torchserve.handler",
                f"responseTimeout in {where} must be seconds > 0, got {timeout!r}",
                "set responseTimeout: 120 (or remove it)",
            )
        else:
            spec.serving.response_timeout_s = float(timeout)


def _calls_stream(folder: Path) -> bool:
    """Whether a .py file in the handler's folder calls send_intermediate_predict_response."""
    for file in sorted(folder.glob("*.py"))[:200]:
        try:
            if STREAM_CALL in file.read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:
            continue
    return False
