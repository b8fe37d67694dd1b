"""`GET /docs`: the inference port's OpenAPI document rendered as one HTML page.

Split out of `openapi.py` because it is presentation only: it takes the finished
document (a plain dict) and writes a self-contained page (no scripts, nothing
fetched from elsewhere) with every path, its method, request schema and a curl
line. It imports nothing from the rest of the OpenAPI code; the order of the
sections follows the document's own `tags`.
"""

from __future__ import annotations

import html
import shlex
from typing import Any

import orjson

# ----- the docs page ------------------------------------------------------------------
_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.op{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.6rem .9rem}
.m{display:inline-block;min-width:4.5rem;font-weight:700;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.options{color:#a60}
code,pre{font:13px/1.35 ui-monospace,monospace}
pre{background:#f6f6f6;padding:.5rem;overflow:auto;border-radius:4px}
details summary{cursor:pointer;color:#555}
"""


def render_docs(document: dict[str, Any]) -> str:
    """The document as a plain HTML page: every path, its method, schema and a curl line."""
    base = (document.get("servers") or [{"url": "http://127.0.0.1:8080"}])[0]["url"]
    by_tag: dict[str, list[str]] = {tag["name"]: [] for tag in document.get("tags", [])}
    for path, item in document["paths"].items():
        for method, op in item.items():
            by_tag.setdefault(op["tags"][0], []).append(_render_op(base, path, method, op))
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(document['info']['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(document['info']['title'])} <small>{esc(document['info']['version'])}</small>",
        f"</h1><p>{esc(document['info']['description'])}</p>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> "
        "(also <code>OPTIONS /</code> and <code>GET /api-description</code>).</p>",
    ]
    for tag, ops in by_tag.items():
        if ops:
            parts.append(f"<h2>{esc(tag)}</h2>")
            parts.extend(ops)
    parts.append("</body></html>")
    return "".join(parts)


def _render_op(base: str, path: str, method: str, op: dict[str, Any]) -> str:
    esc = html.escape
    out = [
        f"<div class='op'><span class='m {esc(method)}'>{esc(method)}</span>",
        f"<code>{esc(path)}</code> &mdash; {esc(op.get('summary', ''))}",
    ]
    if op.get("description"):
        out.append(f"<p>{esc(op['description'])}</p>")
    curl = ["curl"]
    if method != "get":
        curl += ["-X", method.upper()]
    curl.append(base + path)
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None:
        curl += ["-H", "Content-Type: application/json"]
        curl += ["-d", orjson.dumps(body.get("example", {})).decode()]
        schema = orjson.dumps(body["schema"], option=orjson.OPT_INDENT_2).decode()
        out.append(f"<details><summary>request schema</summary><pre>{esc(schema)}</pre></details>")
    out.append(f"<pre>{esc(' '.join(shlex.quote(c) for c in curl))}</pre></div>")
    return "".join(out)
