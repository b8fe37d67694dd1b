"""`kiln traffic API [VERSION=WEIGHT ...] [--reset]`: an API's traffic split between its
versions, changed without a redeploy (PUT /apis/{name}/traffic on the management port)."""

from __future__ import annotations

from typing import Any

import orjson
from rich.markup import escape

from kiln.cli.client import CliError, Management, resolve
from kiln.cli.common import console


def parse_pairs(pairs: list[str]) -> dict[str, int]:
    """`1=90 2=10` as {"1": 90, "2": 10}; CliError naming the bad pair otherwise."""
    weights: dict[str, int] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not version or not weight.strip().isdigit():
            raise CliError(
                f"{pair!r} is not VERSION=WEIGHT; write e.g. `kiln traffic API 1=90 2=10` "
                f"(weights are whole numbers >= 0, shares are weight/total)",
                2,
            )
        if version in weights:
            raise CliError(f"version {version} is given twice ({pair!r})", 2)
        weights[version] = int(weight)
    return weights


def run_traffic(api: str, pairs: list[str], reset: bool, env: str | None, output: str) -> int:
    client = Management(resolve(env))
    path = f"/apis/{api}/traffic"
    if reset and pairs:
        raise CliError("give weights or --reset, not both", 2)
    if reset:
        view = client.request("DELETE", path)
    elif pairs:
        view = client.request("PUT", path, json=parse_pairs(pairs))
    else:
        view = client.get(path)
    if output == "json":
        console.print_json(orjson.dumps(view).decode())
    else:
        console.print(describe(view))
    return 0


def describe(view: dict[str, Any]) -> str:
    """The split as lines: `1  90%  (weight 9)`, with its source, shadow and sticky header."""
    name = escape(view["api"])
    info = view.get("traffic")
    if not info or not info.get("weights"):
        lines = [
            f"[bold]{name}[/]: no split; every unversioned request goes to version "
            f"{escape(str(view.get('default')))}"
        ]
    else:
        source = "runtime (kiln traffic)" if info["source"] == "runtime" else "kiln.yaml"
        lines = [f"[bold]{name}[/] traffic split ({source}):"]
        for version in view["versions"]:
            weight = info["weights"].get(version)
            if weight is None:
                continue
            share = info["percent"][version]
            lines.append(f"  version {escape(version)}  {share:g}%  (weight {weight})")
        if info.get("sticky_header"):
            lines.append(f"  sticky on header {escape(info['sticky_header'])}")
    shadow = (info or {}).get("shadow")
    if shadow:
        lines.append(
            f"  shadow: {shadow['percent']:g}% of requests mirrored to version "
            f"{escape(shadow['version'])} (answers dropped)"
        )
    if info and info.get("note"):
        lines.append(f"  [yellow]{escape(info['note'])}[/]")
    return "\n".join(lines)
