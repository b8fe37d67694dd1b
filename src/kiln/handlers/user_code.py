"""Find the handler in a user module and adapt what it declares to one calling convention.

Importing the files themselves is kiln.user_modules (the torch runtime uses it too).

Users come with Kiln classes (`load` / `predict`), Hub-style `@kiln.handler`
functions, Cortex `PythonPredictor` classes (`__init__(config)`,
`predict(payload, query_params, headers)`) and Cortex v0.10 modules
(`init(model_path, metadata)`, `predict(sample, metadata)`). Rather than make
them rewrite, we look at what a callable declares and pass exactly that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from kiln.handlers.decorator import HANDLER_MARK


def find_entry(module: ModuleType, name: str | None) -> Any:
    """The object the API serves: the named one, else the one the module marks or defines."""
    if name:
        if not hasattr(module, name):
            raise AttributeError(
                f"{module.__file__} has no '{name}'; "
                f"define it or fix the handler path (file.py:Name)"
            )
        return getattr(module, name)
    marked = [v for v in vars(module).values() if callable(v) and getattr(v, HANDLER_MARK, False)]
    if len(marked) == 1:
        return marked[0]
    if len(marked) > 1:
        names = ", ".join(v.__name__ for v in marked)
        raise AttributeError(f"{module.__file__} marks several handlers ({names}): keep one")
    if inspect.isclass(getattr(module, "PythonPredictor", None)):
        return module.PythonPredictor
    own_classes = [
        v
        for v in vars(module).values()
        if inspect.isclass(v) and v.__module__ == module.__name__ and hasattr(v, "predict")
    ]
    if len(own_classes) == 1:
        return own_classes[0]
    if callable(getattr(module, "predict", None)):
        return module  # Cortex v0.10: module-level init() / predict()
    raise AttributeError(
        f"{module.__file__} defines no handler: add a class with load() and predict(), "
        f"or decorate a function with @kiln.handler, or name it as file.py:Name"
    )


_PAYLOAD = {"payload", "inputs", "input", "sample", "data", "request", "body", "event"}


def adapt_call(func: Callable[..., Any], values: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    """Build `call(values)` that passes `func` the arguments it declares.

    Parameters are matched by name (payload/inputs/sample, context, query_params,
    headers, metadata, config, batch_id, ...); the first unnamed one gets the
    payload and the second the context, as in `inference_handler(inputs, _)`.
    """
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    order: list[str] = []
    positional = ["payload", "context"]
    for index, param in enumerate(params):
        if param.name in _PAYLOAD:
            order.append("payload")
        elif param.name in values or param.name in ("context", "query_params", "headers"):
            order.append(param.name)
        elif index < len(positional):
            order.append(positional[index])
        elif param.default is not param.empty:
            break
        else:
            raise TypeError(
                f"{func.__qualname__}() asks for '{param.name}', which Kiln cannot supply; "
                f"use (payload, context)"
            )

    def call(request_values: dict[str, Any]) -> Any:
        merged = {**values, **request_values}
        return func(*(merged.get(name) for name in order))

    return call
