"""`kiln predict`: one request, a readable answer."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import orjson
from rich.markup import escape

from kiln.cli.common import console, err_console, find_server_url


def _server_for(env: str | None) -> str | None:
    """The inference URL of `env` (or of the default environment, when it is not local)."""
    import os

    from kiln.cli.client import LOCAL, CliError, Management, load_envs, resolve

    chosen = env or os.environ.get("KILN_ENV") or load_envs()["default"]
    if chosen == LOCAL:
        return find_server_url()
    try:
        return Management(resolve(chosen)).inference_url()
    except CliError as exc:
        raise LookupError(str(exc)) from None


def _key_for(env: str | None) -> str | None:
    """The API key to send: KILN_API_KEY, else the environment's (the local admin key)."""
    import os

    from kiln.cli.client import CliError, resolve

    if os.environ.get("KILN_API_KEY"):
        return os.environ["KILN_API_KEY"]
    try:
        return resolve(env).key
    except CliError:
        return None


def _resolve_url(
    target: str,
    server: str | None,
    version: str | None,
    env: str | None = None,
    auth: dict[str, str] | None = None,
) -> str:
    if target.startswith(("http://", "https://")):
        return target
    base = (server or _server_for(env) or "").rstrip("/")
    if not base:
        raise LookupError(
            "no running Kiln server found: start one with `kiln serve`, or pass --url "
            "http://HOST:PORT, or give the API's full URL"
        )
    try:
        listing = httpx.get(f"{base}/apis", timeout=10, headers=auth).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise LookupError(f"cannot reach the Kiln server at {base} ({exc})") from None
    for api in listing.get("apis", []):
        if api["name"] == target and (version is None or api.get("version") == version):
            return f"{base}{api['endpoint']}"
    names = sorted({api["name"] for api in listing.get("apis", [])})
    raise LookupError(
        f"the server at {base} has no API named '{target}'"
        + (f" (it has: {', '.join(names)})" if names else "")
    )


def _body(payload: str | None, file: Path | None) -> bytes:
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {file}: {exc.strerror}") from None
    if payload == "-":
        return sys.stdin.buffer.read()
    if payload is not None and not payload.lstrip().startswith(("{", "[", '"')):
        candidate = Path(payload)
        if candidate.is_file():  # `kiln predict API sample.json`, as `cortex predict`
            return candidate.read_bytes()
    if payload is None:
        raise ValueError("give a JSON body (e.g. '[1, 2, 3]'), - for stdin, or --file FILE")
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the body is not valid JSON ({exc}); quote it for your shell") from None
    return payload.encode()


def run_predict(
    target: str,
    payload: str | None,
    file: Path | None,
    server: str | None,
    version: str | None,
    debug: bool,
    timeout: float,
    env: str | None = None,
) -> int:
    key = _key_for(env)
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        url = _resolve_url(target, server, version, env, auth)
        body = _body(payload, file)
    except (LookupError, ValueError) as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 2
    params = {}
    if debug:
        params["debug"] = "true"
    if version:
        params["version"] = version
    content_type = "application/json" if file is None or file.suffix == ".json" else None
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
    try:
        response = httpx.post(url, content=body, params=params, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        err_console.print(f"[bold red]Error:[/] request to {url} failed: {exc}", highlight=False)
        return 1
    return _show(response)


def _show(response: httpx.Response) -> int:
    ctype = response.headers.get("content-type", "")
    ok = response.is_success
    if "json" in ctype:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not ok and isinstance(data, dict) and isinstance(data.get("error"), dict):
            err = data["error"]
            err_console.print(
                f"[bold red]{response.status_code} {escape(str(err.get('type')))}:[/] "
                f"{escape(str(err.get('message')))}  (request id {data.get('request_id')})",
                highlight=False,
            )
            return 1
        if data is not None:
            (console if ok else err_console).print_json(response.text)
            return 0 if ok else 1
    if ok:
        if ctype.startswith("text/"):
            console.print(response.text, markup=False, highlight=False)
        else:
            console.print(f"<{len(response.content)} bytes of {ctype or 'unknown type'}>")
        return 0
    err_console.print(f"[bold red]{response.status_code}:[/] {escape(response.text)}")
    return 1
