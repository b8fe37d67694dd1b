"""`kiln env add|list|default|remove`: which Kiln server a command targets."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.markup import escape

from kiln.cli.client import LOCAL, load_envs, save_envs
from kiln.cli.common import console, fail, find_server_info
from kiln.cli.tables import OUTPUT_HELP

env_app = typer.Typer(
    help="Environments: the Kiln servers commands can target (local by default).",
    no_args_is_help=True,
)


@env_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A short name, e.g. staging.")],
    url: Annotated[str, typer.Argument(help="The server's management URL, e.g. http://host:8081")],
    key: Annotated[
        str | None,
        typer.Option(help="An API key with the manage scope (kept in environments.json, 0600)."),
    ] = None,
) -> None:
    """Add (or update) an environment."""
    if name == LOCAL:
        fail("'local' is built in (the server running on this machine); choose another name", 2)
    if not url.startswith(("http://", "https://")):
        fail(f"the URL must start with http:// or https://, not {url!r}", 2)
    data = load_envs()
    data["environments"][name] = {"url": url.rstrip("/"), **({"key": key} if key else {})}
    save_envs(data)
    console.print(
        f"Environment '{escape(name)}' -> {escape(url)}. Use it with --env {escape(name)}, or "
        f"make it the default: kiln env default {escape(name)}",
        highlight=False,
    )


@env_app.command("list")
def list_envs(
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)] = "table",
) -> None:
    """List environments; the default is marked."""
    from kiln.cli.client import CliError
    from kiln.cli.tables import listing, output_mode, show

    try:
        mode = output_mode(output)
    except CliError as exc:
        fail(str(exc), exc.code)
    data = load_envs()
    info = find_server_info()
    local_url = (info or {}).get("management_url")
    rows = [(LOCAL, local_url)] + [(n, e["url"]) for n, e in sorted(data["environments"].items())]
    if mode == "json":
        listed = [{"name": n, "url": u, "default": n == data["default"]} for n, u in rows]
        console.print_json(orjson.dumps({"environments": listed}).decode())
        return
    table = listing("", "NAME", "MANAGEMENT URL", ids=("NAME", "MANAGEMENT URL"))
    for name, url in rows:
        shown = url or "(no local server running)"
        table.add_row("*" if name == data["default"] else "", escape(name), escape(shown))
    show(table, mode)


@env_app.command("default")
def set_default(name: Annotated[str, typer.Argument(help="Environment name.")]) -> None:
    """Make an environment the one commands use without --env."""
    data = load_envs()
    if name != LOCAL and name not in data["environments"]:
        fail(f"no environment named '{name}'; add it first with `kiln env add {name} URL`", 2)
    data["default"] = name
    save_envs(data)
    console.print(f"Commands now target '{escape(name)}' by default.", highlight=False)


@env_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Environment name.")]) -> None:
    """Forget an environment."""
    data = load_envs()
    if data["environments"].pop(name, None) is None:
        fail(f"no environment named '{name}'", 2)
    if data["default"] == name:
        data["default"] = LOCAL
    save_envs(data)
    console.print(f"Removed environment '{escape(name)}'.", highlight=False)
