"""The "try it" panel of an API's console page: send one request, show the answer.

Why through the server rather than from the browser: the inference port is
another origin (CORS), and the session's key must never reach the page. The
console sends the body to the API's URL with the session's key (a `manage` key
may also invoke), exactly as the curl line shown beside it would. The body
starts from the API's signature (its V2 metadata's inputs), else a plain sample.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from kiln.console.views import esc

MAX_BODY = 1 << 20
MAX_SHOWN = 64 * 1024
TIMEOUT_S = 30.0


@dataclass
class Tried:
    body: str
    status: int | None = None
    latency_ms: float | None = None
    answer: str = ""
    problem: str = ""


async def send(url: str, body: str, key: str | None) -> Tried:
    """POST `body` (JSON) to the API's `url`; what came back and how long it took."""
    tried = Tried(body)
    if len(body.encode()) > MAX_BODY:
        tried.problem = f"the body is over {MAX_BODY} bytes; use curl for large requests"
        return tried
    headers = {"content-type": "application/json"}
    if key:
        headers["x-api-key"] = key
    start = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            response = await client.post(url, content=body.encode(), headers=headers)
    except httpx.HTTPError as exc:
        tried.problem = f"the request did not complete: {exc}"
        return tried
    tried.latency_ms = round((time.perf_counter() - start) * 1000, 1)
    tried.status = response.status_code
    tried.answer = response.text[:MAX_SHOWN]
    return tried


DEFAULT_BODY = '"hello"'
METADATA_TIMEOUT_S = 2.0
_ZERO = {"BOOL": False, "BYTES": "text"}


def body_from_signature(inputs: list[dict[str, Any]]) -> str | None:
    """A native request body from V2 metadata inputs: zeros of each input's shape.

    `{"x": [[0.0, 0.0, 0.0, 0.0]]}` for `x FP32 [-1, 4]`: one row (a dynamic axis, -1,
    becomes 1), zeros of the datatype (false for BOOL, "text" for BYTES). None
    without inputs (the API declared no signature: the plain sample stays)."""
    body: dict[str, Any] = {}
    for spec in inputs:
        name, dtype = spec.get("name"), str(spec.get("datatype") or "BYTES")
        if not isinstance(name, str):
            return None
        zero: Any = _ZERO.get(dtype, 0.0 if dtype.startswith(("FP", "BF")) else 0)
        value = zero
        for dim in reversed(list(spec.get("shape") or [])[:4]):  # a few axes: a sample
            size = dim if isinstance(dim, int) and 0 < dim <= 16 else 1
            value = [value] * size
        body[name] = value
    return json.dumps(body) if body else None


async def signature_body(api: dict[str, Any], key: str | None) -> str | None:
    """The body built from the API's V2 metadata (`GET /v2/models/{name}` on the
    inference port, with the session's key), or None when it has no inputs or does
    not answer quickly: the panel then starts from a plain sample."""
    url, endpoint = str(api.get("url", "")), str(api.get("endpoint", ""))
    if api.get("status") != "live" or not endpoint or not url.endswith(endpoint):
        return None  # not loaded: metadata would wait for the first load
    base = url[: -len(endpoint)]
    headers = {"x-api-key": key} if key else {}
    try:
        async with httpx.AsyncClient(timeout=METADATA_TIMEOUT_S) as client:
            answer = await client.get(f"{base}/v2/models/{quote(api['name'])}", headers=headers)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    try:
        inputs = answer.json().get("inputs") or []
    except ValueError:
        return None
    return body_from_signature(inputs) if isinstance(inputs, list) else None


def try_section(
    session: Any, api: dict[str, Any], link: str, tried: Tried | None, prefill: str | None = None
) -> str:
    from kiln.console.views import csrf

    body = tried.body if tried else (prefill or DEFAULT_BODY)
    result = ""
    if tried and tried.problem:
        result = f'<div class="flash problem" role="alert">{esc(tried.problem)}</div>'
    elif tried:
        result = (
            f'<p role="status" id="try-result">HTTP {tried.status} in {tried.latency_ms} ms</p>'
            f'<pre class="log" tabindex="0" aria-label="Answer">{esc(tried.answer)}</pre>'
        )
    url = api.get("url", "")
    quoted = body.replace("'", "'\\''")  # the shell's way to put ' inside '...'
    curl = (
        f"curl -X POST '{url}' -H 'Content-Type: application/json' "
        f"-H \"x-api-key: $KILN_API_KEY\" -d '{quoted}'"
        if session.key
        else f"curl -X POST '{url}' -H 'Content-Type: application/json' -d '{quoted}'"
    )
    return (
        f'<h2>Try it</h2><form method="post" action="{link}/try">{csrf(session)}'
        '<p><label for="try-body">Request body (JSON)</label><br>'
        f'<textarea id="try-body" name="body" rows="4" cols="60">{esc(body)}</textarea></p>'
        '<p><button class="act" type="submit">Send</button></p></form>'
        f"{result}<p>The same request with curl:</p><pre>{esc(curl)}</pre>"
    )
