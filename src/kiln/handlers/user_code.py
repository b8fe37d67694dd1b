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
from types import ModuleType
from typing import Any

from kiln.handlers.decorator import HANDLER_MARK
from kiln.user_calls import adapt_call

__all__ = ["adapt_call", "find_entry"]


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
