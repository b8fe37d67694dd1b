"""The `torchserve:` runtime: a TorchServe handler served with TorchServe's data contract.

TorchServe loads a handler the way torch-model-archiver's `--handler` names it:
`file.py:function` calls that function; `file.py` alone uses the one class the
file defines (instantiated, `initialize(context)` at load, `handle` per batch), or
the module's `handle` function. A function handler is called once at load with
`data=None` (which is why TorchServe handlers test `if data is None` or
`type(data) is list`). Per batch, `handle(data, context)` gets one dict per
request (`{"body": ...}`, or `{"data": ...}` for a multipart form) and returns
one answer per request.

Streaming: `send_intermediate_predict_response` (the `ts` shim) reaches
`context.kiln_intermediate`, which only a streamed request sets. The handler
then runs on a helper thread and each intermediate answer is handed to the
worker's stream loop as soon as it exists; on every other route intermediate
answers are dropped and the final one is the answer, as a client that did not
read a stream would see it. A `PredictionException` answers its `error_code`
with its message.

It duck-types the pipeline interface (handlers/pipeline.py builds it) instead of
subclassing `Pipeline`, so the two modules do not import each other.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from kiln.errors import InferenceError, KilnError, NotImplementedByApi
from kiln.handlers.context import RequestContext
from kiln.handlers.torchserve_context import Context, Metrics, RequestProcessor
from kiln.user_modules import import_target, split_handler
from kiln.worker_spec import WorkerSpec

SERIALIZED_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx", ".so", ".torchscript")
MANIFEST = os.path.join("MAR-INF", "MANIFEST.json")
MODEL_CONFIG = "model-config.yaml"
_TEXT = "text/plain; charset=utf-8"


class HandlerAnswerMismatch(InferenceError):
    """`handle` did not return one answer per request (TorchServe's "number of batch
    response mismatched"): no answer can be matched to its request."""


def prediction_error(exc: BaseException) -> KilnError | None:
    """A TorchServe `PredictionException` (Kiln's shim's or a real TorchServe's) as a KilnError."""
    code = getattr(exc, "error_code", None)
    if type(exc).__name__ != "PredictionException" or not isinstance(code, int):
        return None
    status = code if 400 <= code <= 599 else 500
    return KilnError(str(getattr(exc, "message", exc)), status=status)


class TorchServePipeline:
    """Loads the handler once per worker; `predict_batch` calls its `handle` per batch."""

    is_tensor = False
    can_explain = True

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.model_dir = model_dir_of(spec)
        os.environ["MODEL_DIR"] = self.model_dir
        if self.model_dir not in sys.path:
            sys.path.insert(0, self.model_dir)  # TorchServe imports model_file from here
        self.manifest = manifest_of(spec, self.model_dir)
        self.yaml_config = _model_yaml(spec, self.model_dir)
        self.metrics = Metrics()
        target, name = split_handler(spec.handler or "")
        self.handle, initialize = entry_point(import_target(target), name)
        load_context = self._context()
        initialize(load_context)

    # ----- the context ----------------------------------------------------------------

    def _context(self) -> Context:
        context = Context(
            model_name=self.spec.api,
            model_dir=self.model_dir,
            manifest=self.manifest,
            batch_size=max(1, self.spec.max_batch_size),
            gpu=0 if self.spec.gpu > 0 else None,
            mms_version=_kiln_version(),
            metrics=self.metrics,
            model_yaml_config=self.yaml_config,
        )
        context.kiln_trusted = self.spec.trusted
        return context

    def _batch_context(self, contexts: list[RequestContext], extra: dict[str, str]) -> Context:
        context = self._context()
        context.request_ids = {i: c.request_id for i, c in enumerate(contexts)}
        context.request_processor = [RequestProcessor({**c.headers, **extra}) for c in contexts]
        return context

    # ----- the pipeline interface -----------------------------------------------------

    def signature(self) -> dict[str, Any]:
        return {"inputs": [], "outputs": []}

    def drain_metrics(self) -> list[list[Any]]:
        """What `context.metrics` recorded since the last batch (the worker sends it)."""
        return self.metrics.drain()

    def predict_batch(
        self, payloads: list[Any], contexts: list[RequestContext], stages: list[Any]
    ) -> list[Any]:
        for payload, stage in zip(payloads, stages, strict=True):
            if stage is not None:
                stage.append(("raw sample", payload))
        context = self._batch_context(contexts, {})
        answers = self._call(payloads, contexts, context)
        for answer, stage in zip(answers, stages, strict=True):
            if stage is not None:
                stage.append(("after handle", answer))
        return [
            _answer(a, c, context, i)
            for i, (a, c) in enumerate(zip(answers, contexts, strict=True))
        ]

    def explain(self, payload: Any, context: RequestContext) -> Any:
        """TorchServe's explanations: `handle` with the request header `explain: True`."""
        batch = self._batch_context([context], {"explain": "True"})
        answer = self._call([payload], [context], batch)[0]
        if answer is None:
            raise NotImplementedByApi(
                f"API '{context.api}' has no explanations: its handler's explain_handle "
                f"returned nothing; override explain_handle (or get_insights)"
            )
        return _answer(answer, context, batch, 0)

    def stream(self, payload: Any, context: RequestContext) -> Iterator[Any]:
        """Each intermediate answer as it is sent, then the final one."""
        batch = self._batch_context([context], {})
        chunks: queue.Queue[tuple[str, Any]] = queue.Queue()
        stopped = threading.Event()

        def intermediate(ret: list[Any], _ids: Any, _message: str, _code: int) -> None:
            if stopped.is_set():
                raise RuntimeError("the client went away: the stream was closed")
            if not isinstance(ret, (list, tuple)) or len(ret) != 1:
                raise InferenceError(
                    "send_intermediate_predict_response needs a list with one answer per "
                    f"request of the batch (1 here), got {type(ret).__name__}"
                )
            chunks.put(("chunk", ret[0]))

        batch.kiln_intermediate = intermediate

        def run() -> None:
            try:
                answers = self._call([payload], [context], batch)
                chunks.put(("final", answers[0]))
            except BaseException as exc:  # noqa: BLE001 - handed to the stream
                chunks.put(("error", exc))

        thread = threading.Thread(target=run, name="kiln-torchserve-handle", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = chunks.get()
                if kind == "error":
                    raise value
                _apply_response(context, batch, 0)
                yield value
                if kind == "final":
                    return
        finally:
            stopped.set()
            thread.join(timeout=0.1)

    # ----- calling the handler --------------------------------------------------------

    def _call(self, payloads: list[Any], contexts: list[RequestContext], ctx: Context) -> list[Any]:
        data = [_request_dict(p, c) for p, c in zip(payloads, contexts, strict=True)]
        try:
            answers = self.handle(data, ctx)
        except Exception as exc:
            mapped = prediction_error(exc)
            if mapped is not None:
                raise mapped from None
            raise
        if not isinstance(answers, (list, tuple)) or len(answers) != len(data):
            got = (
                f"{len(answers)} answers"
                if isinstance(answers, (list, tuple))
                else (f"a {type(answers).__name__}")
            )
            raise HandlerAnswerMismatch(
                f"handle() returned {got} for {len(data)} requests; it must return a list "
                f"with one answer per request, in order (TorchServe's contract)"
            )
        return list(answers)


# ----- loading -------------------------------------------------------------------------


def model_dir_of(spec: WorkerSpec) -> str:
    """The archive's folder: `model` (or the folder of a model file), else the handler's."""
    if spec.model_path:
        path = Path(spec.model_path)
        return str(path if path.is_dir() else path.parent)
    target, _ = split_handler(spec.handler or "")
    if target.endswith(".py"):
        return str(Path(target).resolve().parent)
    return os.getcwd()


def manifest_of(spec: WorkerSpec, model_dir: str) -> dict[str, Any]:
    """MAR-INF/MANIFEST.json when the folder has one, else the manifest an archive would have."""
    path = Path(model_dir) / MANIFEST
    manifest: dict[str, Any] = {}
    if path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
    model = manifest.setdefault("model", {})
    manifest.setdefault("runtime", "python")
    model.setdefault("modelName", spec.api)
    model.setdefault("modelVersion", spec.version or "1.0")
    model.setdefault("handler", os.path.basename(split_handler(spec.handler or "")[0]))
    if spec.serialized_file:
        model["serializedFile"] = spec.serialized_file
    elif spec.model_path and Path(spec.model_path).is_file():
        model["serializedFile"] = Path(spec.model_path).name
    elif "serializedFile" not in model:
        found = sorted(f.name for f in Path(model_dir).iterdir() if f.suffix in SERIALIZED_SUFFIXES)
        if len(found) == 1:
            model["serializedFile"] = found[0]
    if spec.model_file:
        model["modelFile"] = spec.model_file
    return manifest


def _model_yaml(spec: WorkerSpec, model_dir: str) -> dict[str, Any]:
    """model-config.yaml (beside the handler, else in the model folder) for `model_yaml_config`."""
    import yaml

    target, _ = split_handler(spec.handler or "")
    for folder in (Path(target).parent, Path(model_dir)):
        path = folder / MODEL_CONFIG
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
    return {}


def entry_point(
    module: ModuleType, name: str | None
) -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any]]:
    """(handle, initialize) as TorchServe's model loader finds them in a handler module."""
    if name is None and callable(getattr(module, "handle", None)):
        name = "handle"
    if name is not None:
        if not hasattr(module, name):
            raise AttributeError(
                f"{module.__file__} has no '{name}'; define it or fix torchserve.handler "
                f"(file.py:function)"
            )
        found = getattr(module, name)
        if not inspect.isclass(found):
            return found, lambda context: found(None, context)  # TorchServe's load call
        return _instance_entry(found)
    classes = [
        c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__
    ]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise AttributeError(
            f"{module.__file__} must define exactly one handler class or a handle() "
            f"function (classes found: {names}); or name one as file.py:Name"
        )
    return _instance_entry(classes[0])


def _instance_entry(cls: type) -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any]]:
    instance = cls()
    handle = getattr(instance, "handle", None)
    if not callable(handle):
        raise AttributeError(f"handler class {cls.__name__} has no handle(data, context)")
    initialize = getattr(instance, "initialize", None)
    return handle, initialize if callable(initialize) else (lambda context: None)


def _kiln_version() -> str:
    try:
        from importlib.metadata import version

        return version("kiln")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata
        return "0"


# ----- requests and answers ------------------------------------------------------------


def _request_dict(payload: Any, context: RequestContext) -> dict[str, Any]:
    """One request as TorchServe gives it: the body, or a form's field as `data`."""
    ctype = context.headers.get("content-type", "").lower()
    return {"data": payload} if ctype.startswith("multipart/") else {"body": payload}


def _apply_response(context: RequestContext, batch: Context, idx: int) -> None:
    """Status and headers the handler set for request `idx` become its answer's."""
    processor = (batch.request_processor or [])[idx]
    code = processor.get_response_status_code()
    if code != 200:
        context.set_status(code)
    for key, value in processor.get_response_headers().items():
        context.set_header(key, value)


def _answer(value: Any, context: RequestContext, batch: Context, idx: int) -> Any:
    """TorchServe's encoding: a str goes out as text, bytes as they are, the rest as JSON."""
    _apply_response(context, batch, idx)
    if isinstance(value, str):
        if not any(k.lower() == "content-type" for k in context.response_headers):
            context.set_header("Content-Type", _TEXT)
        return value.encode()
    return value
