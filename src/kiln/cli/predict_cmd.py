"""`kiln predict`: one request, a readable answer."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import orjson
from rich.markup import escape

from kiln.cli.common import console, err_console


class Server:
    """The server a prediction goes to, and how the CLI found it (said on stderr)."""

    def __init__(self, url: str, kind: str, key: str | None, logs: str | None = None) -> None:
        self.url, self.kind, self.key, self.logs = url, kind, key, logs


def _local_server() -> Server | None:
    """The one local server (KILN_URL, else the live server.json or serve.json); with
    both a `kiln serve` and a `kiln server` running it refuses to guess."""
    import os

    from kiln.cli.client import _local_key
    from kiln.cli.common import kiln_home, running_servers

    env_key = os.environ.get("KILN_API_KEY")
    if os.environ.get("KILN_URL"):
        return Server(os.environ["KILN_URL"].rstrip("/"), "KILN_URL", env_key)
    found = running_servers()
    if len(found) > 1:
        both = "; ".join(f"{kind} at {info['url']} (--url {info['url']})" for kind, info in found)
        raise LookupError(
            f"two Kiln servers run in KILN_HOME={kiln_home()}: {both}. Say which one "
            f"answers with --url, or stop one of them"
        )
    if not found:
        return None
    kind, info = found[0]
    home = info.get("home")
    logs = f"{home}/logs" if home else None
    return Server(str(info["url"]).rstrip("/"), kind, env_key or _local_key(info), logs)


def _server_for(env: str | None) -> Server | None:
    """The server of `env` (or of the default environment, when it is not local)."""
    import os

    from kiln.cli.client import LOCAL, CliError, Management, load_envs, resolve

    chosen = env or os.environ.get("KILN_ENV") or load_envs()["default"]
    if chosen == LOCAL:
        return _local_server()
    try:
        client = Management(resolve(chosen))
        return Server(client.inference_url(), f"environment '{chosen}'", client.target.key)
    except CliError as exc:
        raise LookupError(str(exc)) from None


def _key_for(env: str | None) -> str | None:
    """The API key to send to a --url or full URL: KILN_API_KEY, else the environment's."""
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
    base = (server or "").rstrip("/")
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
    found: Server | None = None
    try:
        if server is None and not target.startswith(("http://", "https://")):
            found = _server_for(env)
        key = found.key if found is not None else _key_for(env)
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        api_url = _resolve_url(target, server or (found.url if found else None), version, env, auth)
        body = _body(payload, file)
    except (LookupError, ValueError) as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 2
    if found is not None:  # stdout stays the answer alone, for pipes
        err_console.print(f"[dim]{escape(found.kind)}: POST {escape(api_url)}[/]", highlight=False)
    params = {}
    if debug:
        params["debug"] = "true"
    if version:
        params["version"] = version
    content_type = "application/json" if file is None or file.suffix == ".json" else None
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
    try:
        response = httpx.post(
            api_url, content=body, params=params, headers=headers, timeout=timeout
        )
    except httpx.HTTPError as exc:
        err_console.print(
            f"[bold red]Error:[/] request to {api_url} failed: {exc}", highlight=False
        )
        return 1
    code = _show(response)
    if debug:
        where = f" (files in {found.logs}/)" if found is not None and found.logs else ""
        name = target if not target.startswith(("http://", "https://")) else "API"
        err_console.print(
            f"The four debug stages of request {response.headers.get('x-request-id', '?')} are "
            f"in the server's log: `kiln logs {escape(name)}`{escape(where)}.",
            highlight=False,
        )
    return code


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
