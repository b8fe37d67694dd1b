"""How the CLI reaches a Kiln server: environments, and the management API client.

An environment names a server's management URL. `local` is built in: the
server whose `server.json` (or `kiln serve`'s `serve.json`) is in KILN_HOME.
Others are added with `kiln env add NAME URL` and kept in
`KILN_HOME/environments.json`; `kiln env default NAME` picks the one commands
use without `--env`. The CLI never opens the server's database: everything
goes through the management API (and predictions through the inference port).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from kiln.cli.common import CliError, find_server_info, kiln_home

LOCAL = "local"


def _env_file() -> Path:
    return kiln_home() / "environments.json"


def load_envs() -> dict[str, Any]:
    try:
        data = orjson.loads(_env_file().read_bytes())
    except (OSError, orjson.JSONDecodeError):
        data = {}
    data.setdefault("default", LOCAL)
    data.setdefault("environments", {})
    return data


def save_envs(data: dict[str, Any]) -> None:
    path = _env_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold API keys
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


@dataclass
class Target:
    env: str
    management_url: str
    key: str | None = None  # the API key sent with every call (manage scope)
    # How a shell gets that key, for the commands the CLI prints as hints: never the key
    # itself (it would land in terminal scrollback), but where the CLI read it from.
    key_source: str | None = None

    def curl_key_header(self) -> str:
        """`-H "x-api-key: ..."` for a printed curl, or "" when no key is sent."""
        if not self.key or not self.key_source:
            return ""
        return f'-H "x-api-key: {self.key_source}"'


_FROM_ENV = "$KILN_API_KEY"


def _file_source(path: str) -> str:
    import shlex

    return f"$(cat {shlex.quote(str(Path(path).resolve()))})"


def _env_entry_source(name: str) -> str:
    """A shell expression that reads environment `name`'s key from environments.json."""
    import shlex

    code = f"import json,sys;print(json.load(open(sys.argv[1]))['environments'][{name!r}]['key'])"
    return f"$(python3 -c {shlex.quote(code)} {shlex.quote(str(_env_file().resolve()))})"


def _local_key(info: dict[str, Any] | None) -> str | None:
    """The local server's admin key, when this user can read it (file mode 0600)."""
    path = (info or {}).get("admin_key_file")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def resolve(env: str | None = None) -> Target:
    """The management URL of `env` (default: KILN_ENV, else the chosen default)."""
    data = load_envs()
    name = env or os.environ.get("KILN_ENV") or data["default"]
    if name == LOCAL:
        if os.environ.get("KILN_MANAGEMENT_URL"):
            key = os.environ.get("KILN_API_KEY")
            return Target(
                LOCAL,
                os.environ["KILN_MANAGEMENT_URL"].rstrip("/"),
                key,
                _FROM_ENV if key else None,
            )
        info = find_server_info()
        if info is None:
            raise CliError(
                f"no Kiln server is running on this machine (KILN_HOME={kiln_home()}); start "
                f"one with `kiln server start` (or `kiln serve DIR`), or choose another "
                f"environment with --env",
                2,
            )
        url = info.get("management_url")
        if not url:
            raise CliError("the local server runs without a management port; restart it with one")
        if os.environ.get("KILN_API_KEY"):
            return Target(LOCAL, str(url).rstrip("/"), os.environ["KILN_API_KEY"], _FROM_ENV)
        key = _local_key(info)
        source = _file_source(info["admin_key_file"]) if key else None
        return Target(LOCAL, str(url).rstrip("/"), key, source)
    entry = data["environments"].get(name)
    if entry is None:
        known = ", ".join([LOCAL, *sorted(data["environments"])])
        raise CliError(
            f"no environment named '{name}' (environments: {known}); add it with "
            f"`kiln env add {name} URL`",
            2,
        )
    if os.environ.get("KILN_API_KEY"):
        return Target(name, str(entry["url"]).rstrip("/"), os.environ["KILN_API_KEY"], _FROM_ENV)
    key = entry.get("key")
    return Target(
        name, str(entry["url"]).rstrip("/"), key, _env_entry_source(name) if key else None
    )


class Management:
    """A small client for the management API; raises CliError with the server's message."""

    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        self.target = target
        headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
        self.http = httpx.Client(base_url=target.management_url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(
                f"cannot reach the Kiln server of environment '{self.target.env}' at "
                f"{self.target.management_url} ({exc}); is it running? `kiln server status` "
                f"tells",
                2,
            ) from None
        if response.status_code >= 400:
            raise CliError(_message(response), 2 if response.status_code == 404 else 1)
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def inference_url(self) -> str:
        return str(self.get("/server")["url"]).rstrip("/")

    def stream(self, path: str, params: dict[str, Any]) -> Any:
        return self.http.stream("GET", path, params=params, timeout=None)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"the server answered {response.status_code}: {response.text[:300]}"
    message = body.get("message") or body.get("error") or str(body)
    issues = body.get("issues")
    if issues:
        message = "the configuration has problems:\n" + "\n".join(f"  {i}" for i in issues)
    return str(message)
