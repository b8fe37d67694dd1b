"""`kiln validate --load`: print what loading each API said (control/load_check.py loads them)."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.markup import escape

from kiln.cli.common import console


def report_loads(project: Any) -> int:
    """Load every API in a worker, print one line each; 1 when any failed, else 0."""
    from kiln.control.load_check import load_project_apis

    count = len(project.apis) + len(project.batch_apis)
    if not count:
        console.print("Nothing to load: the project has no APIs.")
        return 0
    console.print(f"\nLoading {count} API(s) in workers, as kiln serve does ...", highlight=False)
    reports = asyncio.run(load_project_apis(project))
    failed = 0
    for report in reports:
        if report.loaded is True:
            mark = "[green]loads[/]"
            text = escape(report.detail.removeprefix("loads").strip())
        elif report.loaded is False:
            failed += 1
            mark = "[bold red]fails[/]"
            text = escape(report.detail)
        else:
            mark = "[yellow]skipped[/]"
            text = escape(report.detail)
        console.print(
            f"  {report.kind} [bold]{escape(report.name)}[/]: {mark} {text}",
            highlight=False,
            soft_wrap=True,
        )
    if failed:
        console.print(
            f"[bold red]{failed} of {count} API(s) failed to load[/]: kiln serve and kiln "
            f"deploy would mark {'them' if failed > 1 else 'it'} failed with the same error.",
            highlight=False,
        )
        return 1
    console.print("[green]Every API loads.[/]", highlight=False)
    return 0
