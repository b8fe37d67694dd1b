"""A CellStrat Hub project folder, read as the kiln.yaml it stands for.

`hub init` lays a project out as `Dockerfile`, `hub_config.json` (the project's
name and version), `model/` (weights, given to the code as MODEL_DIR), and `src/`
(`main.py` with one `@hub_handler` function, `requirements.txt`, `utils.py`). Hub
users deploy that folder as it is, so when a folder has no kiln.yaml (or
cortex.yaml) but has `hub_config.json`, the loader reads it here into the resources
a kiln.yaml would declare:

    - kind: deployment
      name: <name>
    - kind: api
      name: <name>
      version: "<version>"          # when hub_config.json gives one
      endpoint: /<name>             # a user's API is /<user>/<name> anyway
      python: {handler: src/main.py, model: model}
      response_envelope: hub        # {"statusCode": 200, "body": {"output": ...}}

`src/` is importable because the handler's folder goes on sys.path (`import utils`
works), `src/requirements.txt` is the API's environment (environments/requirements.py
reads it), and `from hub import hub_handler` is served by kiln.compat's shim. A
kiln.yaml beside hub_config.json wins: that is how to change anything above.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kiln.config.blocks import check_name
from kiln.config.source import Document, RawIssue
from kiln.errors import FieldProblem

HUB_CONFIG = "hub_config.json"
HANDLER = "src/main.py"
MODEL_DIR = "model"


def hub_config_file(project_dir: Path) -> Path | None:
    """The folder's hub_config.json, if it is a Hub project."""
    path = project_dir / HUB_CONFIG
    return path.absolute() if path.is_file() else None


def is_hub_config(path: Path) -> bool:
    return path.name == HUB_CONFIG


def hub_document(path: Path, text: str) -> Document:
    """The resources the Hub project at `path`'s folder declares, as a parsed config.

    Problems (not JSON, no name, a name or version Kiln cannot serve) come back as
    the document's issues, with hub_config.json's line, for the loader to report with
    everything else.
    """
    doc = Document()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        doc.issues.append(
            RawIssue((), exc.lineno, f"hub_config.json is not valid JSON: {exc.msg}", _FIX)
        )
        return doc
    if not isinstance(config, dict):
        doc.issues.append(RawIssue((), 1, "hub_config.json must be a JSON object", _FIX))
        return doc
    name = config.get("name")
    if not isinstance(name, str) or not name:
        doc.issues.append(
            RawIssue((), _line_of(text, "name"), "hub_config.json has no project name", _FIX)
        )
        return doc
    api: dict[str, Any] = {
        "kind": "api",
        "name": name,
        "python": {"handler": HANDLER},
        "response_envelope": "hub",
    }
    if (path.parent / MODEL_DIR).is_dir():
        api["python"]["model"] = MODEL_DIR
    version = config.get("version")
    if version is not None and version != "":
        api["version"] = version
    try:
        check_name(name)
    except FieldProblem:
        doc.data = [api]  # the API reports the name, once
    else:
        api["endpoint"] = f"/{name}"  # not /<deployment>/<name>: the Hub's URL is the name
        doc.data = [{"kind": "deployment", "name": name}, api]
    for key in ("name", "version"):
        line = _line_of(text, key)
        if line is not None:
            doc.lines.update({(i, key): line for i in range(len(doc.data))})
    return doc


_FIX = 'write it as {"name": "my-api", "version": "0.0.1"} (the name is the API\'s URL path)'


def _line_of(text: str, key: str) -> int | None:
    match = re.search(rf'"{re.escape(key)}"\s*:', text)
    return text.count("\n", 0, match.start()) + 1 if match else None
