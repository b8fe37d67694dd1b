"""Seed-era request handlers: optional `pre_inference` and `post_inference` functions.

Two signatures are in the wild: `(sample, signature, metadata)` and the older
`(sample, metadata)`, whose second argument is the model's input description
(Cortex's iris example reads `metadata[0].name`). We look at what each function
declares once, at load time, and call it accordingly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.user_calls import positional_hook
from kiln.user_modules import import_file

Hook = Callable[[Any], Any]


class RequestHooks:
    """The pre/post hooks of one API, bound to its signature and metadata."""

    def __init__(self, path: str | None, signature: Any, metadata: dict[str, Any]) -> None:
        self.pre: Hook | None = None
        self.post: Hook | None = None
        if not path:
            return
        module = import_file(path)
        if callable(getattr(module, "pre_inference", None)):
            self.pre = positional_hook(module.pre_inference, signature, metadata)
        if callable(getattr(module, "post_inference", None)):
            self.post = positional_hook(module.post_inference, signature, metadata)
