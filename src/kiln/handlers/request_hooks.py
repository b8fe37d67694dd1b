"""Seed-era request handlers: optional `pre_inference` and `post_inference` functions.

Two signatures are in the wild: `(sample, signature, metadata)` and the older
`(sample, metadata)`, whose second argument is the model's input description
(Cortex's iris example reads `metadata[0].name`). We look at what each function
declares once, at load time, and call it accordingly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kiln.user_modules import import_file

Hook = Callable[[Any], Any]


def _bind(func: Callable[..., Any], signature: Any, metadata: dict[str, Any]) -> Hook:
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) >= 3:
        return lambda value: func(value, signature, metadata)
    if len(params) == 2:
        return lambda value: func(value, signature)
    return lambda value: func(value)


class RequestHooks:
    """The pre/post hooks of one API, bound to its signature and metadata."""

    def __init__(self, path: str | None, signature: Any, metadata: dict[str, Any]) -> None:
        self.pre: Hook | None = None
        self.post: Hook | None = None
        if not path:
            return
        module = import_file(path)
        if callable(getattr(module, "pre_inference", None)):
            self.pre = _bind(module.pre_inference, signature, metadata)
        if callable(getattr(module, "post_inference", None)):
            self.post = _bind(module.post_inference, signature, metadata)
