"""`kiln users`, `kiln keys`, `kiln usage`: accounts and API keys, via the management API."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape

from kiln.cli.client import Management, resolve
from kiln.cli.common import console, err_console, run_cli
from kiln.cli.tables import OUTPUT_HELP, listing, output_mode, show

EnvOption = Annotated[
    str | None, typer.Option("--env", "-e", help="Which server (default: local).")
]
OutputOption = Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)]
ResultOption = Annotated[str, typer.Option("-o", "--output", help="pretty or json.")]

users_app = typer.Typer(help="Users of the server (admin only).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create, list, disable, enable, rotate, delete.")


def _run(action: Any) -> None:
    run_cli(action)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _json(data: Any) -> None:
    console.print_json(orjson.dumps(data).decode())


# ---- users ----------------------------------------------------------------------------
@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="User name: their APIs live at /<name>/<api>.")],
    plan: Annotated[str, typer.Option(help="free (5 APIs, 1000 calls a month), pro, ...")] = "free",
    env: EnvOption = None,
    output: ResultOption = "pretty",
) -> None:
    """Create a user; prints their first API key (manage scope), once."""

    def action() -> int:
        made = Management(resolve(env)).request("POST", "/users", json={"name": name, "plan": plan})
        if output == "json":
            _json(made)
            return 0
        console.print(
            f"Created user [bold]{escape(name)}[/] on the {escape(made['plan'])} plan. Their "
            f"first API key (id {made['key_id']}), shown only now:",
            highlight=False,
        )
        print(made["key"])
        return 0

    _run(action)


@users_app.command("list")
def users_list(env: EnvOption = None, output: OutputOption = "table") -> None:
    """List users with their plan, APIs and calls this month."""

    def action() -> int:
        mode = output_mode(output)
        users = Management(resolve(env)).get("/users")["users"]
        if mode == "json":
            _json({"users": users})
            return 0
        table = listing("USER", "PLAN", "APIS", "CALLS THIS MONTH", "CREATED", ids=("USER",))
        for u in users:
            name = u["name"] + (" (admin)" if u["admin"] else "")
            table.add_row(
                name, u["plan"], str(u["apis"]), str(u["calls_this_month"]), _when(u["created_at"])
            )
        show(table, mode)
        return 0

    _run(action)


@users_app.command("delete")
def users_delete(
    name: Annotated[str, typer.Argument(help="The user to delete.")],
    env: EnvOption = None,
    force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask first.")] = False,
) -> None:
    """Delete a user, their APIs and their keys (usage history stays)."""

    def action() -> int:
        if not force and not typer.confirm(
            f"Delete user '{name}', every API and key they have?", default=False
        ):
            console.print("Nothing deleted.")
            return 1
        done = Management(resolve(env)).request("DELETE", f"/users/{name}")
        console.print(f"Deleted user '{escape(name)}' and {len(done['apis'])} API(s).")
        return 0

    _run(action)


# ---- keys -----------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label, e.g. 'laptop' or 'ci'.")] = "",
    apis: Annotated[
        str | None, typer.Option(help="Only these APIs, comma-separated (default: all yours).")
    ] = None,
    scope: Annotated[
        str, typer.Option(help="invoke (call APIs) or manage (also deploy).")
    ] = "invoke",
    expires: Annotated[str | None, typer.Option(help="Lifetime, e.g. 30d or 12h.")] = None,
    quota: Annotated[int | None, typer.Option(help="Calls per calendar month.")] = None,
    rate: Annotated[float | None, typer.Option(help="Requests per second.")] = None,
    burst: Annotated[int | None, typer.Option(help="Burst above the rate.")] = None,
    user: Annotated[str | None, typer.Option(help="For another user (admin only).")] = None,
    env: EnvOption = None,
    output: ResultOption = "pretty",
) -> None:
    """Create an API key and print it once (alone on its line; -o json: {"key", "id", ...})."""

    def action() -> int:
        body: dict[str, Any] = {"name": name, "scope": scope}
        if apis:
            body["apis"] = [a.strip() for a in apis.split(",") if a.strip()]
        for field, value in (
            ("expires", expires),
            ("quota", quota),
            ("rate", rate),
            ("burst", burst),
            ("user", user),
        ):
            if value is not None:
                body[field] = value
        made = Management(resolve(env)).request("POST", "/keys", json=body)
        if output == "json":
            _json(made)
            return 0
        err_console.print(
            f"API key {made['id']} for {made['user']} ({', '.join(made['scopes'])}); it is "
            f"shown only now, keep it somewhere safe:",
            highlight=False,
        )
        print(made["key"])
        return 0

    _run(action)


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option(help="Another user's keys (admin only).")] = None,
    env: EnvOption = None,
    output: OutputOption = "table",
) -> None:
    """List keys: name, prefix, scopes, created, last used, status, calls this month."""

    def action() -> int:
        mode = output_mode(output)
        params = {"user": user} if user else None
        keys = Management(resolve(env)).get("/keys", params=params)["keys"]
        if mode == "json":
            _json({"keys": keys})
            return 0
        # At a terminal's width: what tells keys apart and what to act on; -o wide: all.
        columns = ["ID", "USER", "NAME", "SCOPES", "APIS", "STATUS", "LAST USED", "CALLS"]
        if mode == "wide":
            columns[3:3] = ["PREFIX"]
            columns[-1:-1] = ["CREATED", "EXPIRES"]
        table = listing(*columns, ids=("ID", "USER", "NAME", "PREFIX", "APIS"))
        for k in keys:
            cells = {
                "ID": k["id"],
                "USER": k["user"],
                "NAME": k["name"] or "-",
                "PREFIX": k["prefix"],
                "SCOPES": ",".join(k["scopes"]),
                "APIS": ",".join(k["apis"]) if k["apis"] else "all",
                "STATUS": k["status"],
                "CREATED": _when(k["created_at"]),
                "LAST USED": _when(k["last_used_at"]),
                "EXPIRES": _when(k["expires_at"]),
                "CALLS": str(k["calls_this_month"]),
            }
            table.add_row(*(escape(cells[c]) for c in columns))
        show(table, mode)
        return 0

    _run(action)


def _key_action(verb: str) -> Any:
    def command(
        key_id: Annotated[str, typer.Argument(help="The key's id (kiln keys list).")],
        env: EnvOption = None,
        output: ResultOption = "pretty",
    ) -> None:
        def action() -> int:
            client = Management(resolve(env))
            if verb == "delete":
                client.request("DELETE", f"/keys/{key_id}")
                console.print(f"Deleted API key {key_id}; it no longer works.")
                return 0
            done = client.request("POST", f"/keys/{key_id}/{verb}")
            if output == "json":
                _json(done)
            elif verb == "rotate":
                err_console.print(
                    f"Key {key_id} is replaced by {done['id']} and no longer works. The new "
                    f"key, shown only now:",
                    highlight=False,
                )
                print(done["key"])
            else:
                console.print(f"API key {key_id} is now {done['status']}.")
            return 0

        _run(action)

    command.__doc__ = {
        "disable": "Disable a key: it stops working within a second (enable brings it back).",
        "enable": "Enable a disabled key.",
        "delete": "Delete a key for good.",
        "rotate": "Replace a key by a new one with the same settings; prints the new key once.",
    }[verb]
    return command


for _verb in ("disable", "enable", "delete", "rotate"):
    keys_app.command(_verb)(_key_action(_verb))


# ---- usage ----------------------------------------------------------------------------
def usage(
    user: Annotated[str | None, typer.Option(help="One user's usage (admin only).")] = None,
    month: Annotated[str | None, typer.Option(help="YYYY-MM (default: this month, UTC).")] = None,
    env: EnvOption = None,
    output: OutputOption = "table",
) -> None:
    """Metered calls per user, key, API and status class, for a calendar month (UTC)."""

    def action() -> int:
        mode = output_mode(output)
        params = {k: v for k, v in (("user", user), ("month", month)) if v}
        data = Management(resolve(env)).get("/usage", params=params or None)
        if mode == "json":
            _json(data)
            return 0
        table = listing(
            "USER", "KEY", "API", "VERSION", "2XX", "4XX", "5XX", "CALLS",
            ids=("USER", "KEY", "API", "VERSION"), title=f"Usage in {data['month']} (UTC)",
        )  # fmt: skip
        for row in data["usage"]:
            by = row["by_status"]
            table.add_row(
                row["user"],
                row["key_id"],
                row["api"],
                row["version"] or "-",
                str(by.get("2xx", 0)),
                str(by.get("4xx", 0)),
                str(by.get("5xx", 0)),
                str(row["calls"]),
            )
        show(table, mode)
        console.print(f"Total: {data['total']} calls.", highlight=False)
        return 0

    _run(action)
