"""`kiln cache ls` and `kiln cache prune`: the local model cache and Python environments.

Pruning never asks: everything in the cache can be downloaded again, and an
entry a running API uses is never removed (it is listed as kept instead). The
same holds for the Python environments built from projects' requirements.txt
(kiln.environments): a running server holds every environment it has served
from since it started, and the next deploy that needs a pruned one builds it again.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.common import console, fail
from kiln.cli.tables import OUTPUT_HELP, output_mode, show

cache_app = typer.Typer(
    name="cache",
    help=(
        "The local model cache (downloads from s3://, gs://, http(s)://, unpacked archives) "
        "and the Python environments built from projects' requirements.txt."
    ),
    no_args_is_help=True,
)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@cache_app.command("ls")
def ls(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)] = "table",
) -> None:
    """List cached models (path they came from, size, last use, local folder) and environments."""
    from kiln.cli.client import CliError
    from kiln.environments import Environments
    from kiln.storage import Cache

    try:
        mode = "json" if as_json else output_mode(output)
    except CliError as exc:
        fail(str(exc), exc.code)
    as_json = mode == "json"

    cache = Cache()
    entries = cache.list()
    envs = Environments()
    environments = envs.list()
    if as_json:
        import orjson

        rows = [
            {
                "kind": "model",
                "uri": e.uri,
                "size": e.size,
                "last_used": e.last_used,
                "path": str(e.path),
                "in_use": e.in_use,
            }
            for e in reversed(entries)
        ] + [_env_row(envs, env) for env in reversed(environments)]
        typer.echo(orjson.dumps(rows).decode())
        return
    _list_environments(envs, environments)
    if not entries:
        console.print(f"The model cache is empty ({cache.root}).")
        return
    table = Table(title=f"Model cache: {cache.root}", title_justify="left")
    for column in ("URI", "SIZE", "LAST USED", "PATH"):
        table.add_column(
            column,
            justify="right" if column == "SIZE" else "left",
            overflow="fold",
            no_wrap=column in ("SIZE", "LAST USED"),
        )
    for e in reversed(entries):
        used = _ago(e.last_used) + (" (in use)" if e.in_use else "")
        table.add_row(escape(e.uri), _size(e.size), used, escape(str(e.path)))
    show(table, mode)
    total = sum(e.size for e in entries)
    console.print(f"{len(entries)} model(s), {_size(total)} of {_size(cache.max_bytes)} allowed")


@cache_app.command("prune")
def prune(
    everything: Annotated[
        bool, typer.Option("--all", help="Remove every entry not in use.")
    ] = False,
    older_than: Annotated[
        str | None, typer.Option(help="Remove entries unused for this long, e.g. 7d, 12h.")
    ] = None,
    max_size: Annotated[
        str | None, typer.Option(help="Remove least recently used entries down to e.g. 5GB.")
    ] = None,
) -> None:
    """Remove cached models (least recently used first); models in use are kept."""
    from kiln.config.errors import FieldProblem
    from kiln.config.quantities import parse_bytes
    from kiln.storage import Cache

    if not (everything or older_than or max_size):
        fail("say what to remove: --all, --older-than 7d, or --max-size 5GB", 2)
    try:
        age = _days(older_than) if older_than else None
        limit = parse_bytes(max_size.strip().removesuffix("B"), what="cache") if max_size else None
    except FieldProblem as exc:
        fail(f"{exc}", 2)
    _prune_environments(everything, age)
    removed, busy = Cache().evict(limit, older_than=age, everything=everything)
    for e in removed:
        console.print(f"removed {escape(e.uri)} ({_size(e.size)})", highlight=False)
    for e in busy:
        console.print(f"kept {escape(e.uri)}: in use by a running API", highlight=False)
    freed = sum(e.size for e in removed)
    console.print(f"{len(removed)} model(s) removed, {_size(freed)} freed")


def _env_row(envs: Any, env: Any) -> dict[str, Any]:
    return {
        "kind": "environment",
        "uri": f"env:{env.key}",
        "key": env.key,
        "packages": env.packages,
        "requirement_files": env.manifest.get("requirement_files"),
        "size": env.size,
        "last_used": env.last_used,
        "path": str(env.path),
        "in_use": envs.in_use(env.key),
    }


def _list_environments(envs: Any, environments: list[Any]) -> None:
    """The Python environments table (shown only when there are some)."""
    if not environments:
        return
    table = Table(title=f"Python environments: {envs.root}", title_justify="left")
    for column in ("KEY", "ADDED PACKAGES", "SIZE", "LAST USED"):
        table.add_column(column, justify="right" if column == "SIZE" else "left", overflow="fold")
    for env in reversed(environments):
        used = _ago(env.last_used) + (" (in use)" if envs.in_use(env.key) else "")
        packages = ", ".join(env.packages) or "none (the server has them all)"
        table.add_row(env.key, escape(packages), _size(env.size), used)
    console.print(table)
    total = sum(e.size for e in environments)
    console.print(f"{len(environments)} environment(s), {_size(total)}\n")


def _prune_environments(everything: bool, older_than: float | None) -> None:
    """--all and --older-than apply to environments too (--max-size is the model cache's)."""
    from kiln.environments import Environments

    if not (everything or older_than is not None):
        return
    removed, busy = Environments().prune(everything=everything, older_than=older_than)
    for env in removed:
        console.print(f"removed environment {env.key} ({_size(env.freed)})", highlight=False)
    for env in busy:
        console.print(f"kept environment {env.key}: in use by a running server", highlight=False)
    if removed or busy:
        freed = sum(e.freed for e in removed)
        console.print(f"{len(removed)} environment(s) removed, {_size(freed)} freed")


def _days(text: str) -> float:
    """Durations as parse_duration reads them, plus days (`7d`), which cache ages need."""
    from kiln.config.quantities import parse_duration

    text = text.strip()
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400
    return parse_duration(text)
