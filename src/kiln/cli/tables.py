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
        row = [api.name, api.version or "-", api.runtime]
        if states is not None:
            state, error = states.get((api.name, api.version), ("?", None))
            style = _STATUS_STYLE.get(state, "white")
            text = f"[{style}]{state}[/]"
            if error:
                text += f": {error}"
            row.append(text)
        row.append(f"{base_url}{api.endpoint}" if base_url else api.endpoint)
        table.add_row(*row)
    return table
