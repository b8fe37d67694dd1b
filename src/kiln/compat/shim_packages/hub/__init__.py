"""CellStrat Hub's `hub` package as Hub projects import it: `from hub import hub_handler`.

Served to workers by `kiln.compat.shims` only when no real `hub` distribution is
importable (PyPI's `hub` is an unrelated project; if the user installed it, theirs
wins). On the Hub, `@hub_handler` marks the function called for each POST, and the
platform answers GET with a ping that loads the model; Kiln's worker already imports
`src/main.py` at load and answers GET on the API's URL, so the decorator only has to
mark the function, exactly as `@kiln.handler` does. The Hub's response envelope
(`{"statusCode": 200, "body": {"output": ...}}`) is the API's `response_envelope:
hub`, the default for a project folder with `hub_config.json`.
"""

from __future__ import annotations

from kiln.handlers.decorator import handler as hub_handler

__all__ = ["hub_handler"]
