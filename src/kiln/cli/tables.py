"""Tables the CLI prints."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.table import Table

_STATUS_STYLE = {"ready": "green", "failed": "red", "loading": "yellow", "restarting": "yellow"}


def api_table(
    apis: Iterable[Any], base_url: str | None = None, states: dict | None = None
) -> Table:
    """One row per API version: name, version, runtime, (status), endpoint or URL."""
    table = Table(show_edge=False, header_style="bold")
    table.add_column("API")
    table.add_column("VERSION")
    table.add_column("RUNTIME")
    if states is not None:
        table.add_column("STATUS")
    table.add_column("URL" if base_url else "ENDPOINT")
    for api in apis:
        version = getattr(api, "version", None)  # a Batch API has no versions
        row = [api.name, version or "-", api.runtime]
        if states is not None:
            state, error = states.get((api.name, version), ("?", None))
            style = _STATUS_STYLE.get(state, "white")
            text = f"[{style}]{state}[/]"
            if error:
                text += f": {error}"
            row.append(text)
        row.append(f"{base_url}{api.endpoint}" if base_url else api.endpoint)
        table.add_row(*row)
    return table


# ---- listings: one output flag for every list command ---------------------------------
OUTPUT_HELP = (
    "table (fits the terminal, identifiers wrap), wide (every column, one line each) or json."
)


def output_mode(output: str) -> str:
    """`-o` of a listing: table, wide or json ("pretty" is table's older name)."""
    from kiln.cli.client import CliError

    mode = {"pretty": "table"}.get(output, output)
    if mode not in ("table", "wide", "json"):
        raise CliError(f"unknown output '{output}'; use -o table, -o wide or -o json", 2)
    return mode


def listing(*columns: str, ids: Iterable[str] = (), **kwargs: Any) -> Table:
    """A table whose identifier columns (names, URLs, ids: what users copy) fold onto
    more lines at a narrow terminal instead of being cut with an ellipsis (rich's
    default), and keep at least 8 characters a line; other columns wrap at spaces."""
    table = Table(show_edge=False, header_style="bold", **kwargs)
    keep = set(ids)
    for column in columns:
        if column in keep:
            table.add_column(column, overflow="fold", min_width=max(8, len(column)))
        else:
            table.add_column(column, overflow="fold")
    return table


def show(renderable: Any, mode: str) -> None:
    """Print a listing: `wide` at an unlimited width (lines as long as their contents,
    for copying or grep), `table` at the terminal's width."""
    from rich.console import Console

    from kiln.cli.common import console

    if mode == "wide":
        Console(width=100_000, highlight=False, soft_wrap=False).print(renderable, crop=False)
    else:
        console.print(renderable, crop=False)  # a command hint longer than the width stays whole
