"""The `@kiln.handler` decorator: the Hub-style entry point for plain functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

HANDLER_MARK = "__kiln_handler__"


def handler(func: F) -> F:
    """Mark `func(inputs, context)` as the function Kiln calls for each request.

    The function is returned unchanged so it stays callable in notebooks and
    tests; Kiln finds it by the mark. Load models at module level from
    `os.environ["MODEL_DIR"]`, which Kiln sets before importing the module.
    """
    setattr(func, HANDLER_MARK, True)
    return func
