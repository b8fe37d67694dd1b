"""`kiln deploy`, `delete`, `refresh` and `rollback`: the lifecycle, via the management API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kiln.cli.client import CliError, Management, resolve
from kiln.cli.common import console
from kiln.cli.scaffold import stale_template_sample

WAIT_TIMEOUT_S = 900.0


def run_deploy(
    project_dir: Path, file: str | None, env: str | None, name: str | None, wait: bool
) -> int:
    import os

    from kiln.config import ConfigError, load_project
    from kiln.control.packaging import pack_project, read_dotenv

    if file not in (None, "kiln.yaml"):
        raise CliError(
            "kiln deploy uses the project's kiln.yaml (or cortex.yaml); rename the file or "
            "deploy its folder",
            2,
        )
    try:
        project = load_project(project_dir, env={**os.environ, **read_dotenv(project_dir)})
    except ConfigError as exc:
        count = len(exc.issues)
        raise CliError(
            f"the configuration has {count} problem{'s' if count != 1 else ''}:\n{exc}", 2
        ) from None
    deployment = name or project.deployment_name or project_dir.resolve().name
    with console.status(f"Packing {escape(str(project_dir))} ..."):
        packed = pack_project(project_dir)
    client = Management(resolve(env), timeout=300)
    size = len(packed.archive)
    console.print(
        f"Deploying [bold]{escape(deployment)}[/] revision {packed.revision} "
        f"({len(packed.files)} files, {size / 1024:.0f} KiB) to {client.target.env} ...",
        highlight=False,
    )
    started = time.monotonic()
    result = client.request(
        "POST",
        "/deployments",
        params={"name": deployment},
        content=packed.archive,
        headers={"Content-Type": "application/gzip"},
    )
    if result["status"] == "unchanged":
        console.print(
            f"Nothing to do: revision {result['revision']} is already live "
            f"(the project has not changed since its last deploy).",
            highlight=False,
        )
        _print_urls(client, result["apis"], project_dir)
        return 0
    if not wait:
        console.print(
            f"Rollout of revision {result['revision']} started; follow it with `kiln get`.",
            highlight=False,
        )
        return 0
    final = _wait(client, deployment, result["revision"], result["apis"])
    if final.get("message"):
        console.print(final["message"], highlight=False)  # the Python environment, if any
    if final["status"] != "live":
        raise CliError(
            f"revision {result['revision']} did not go live: {final.get('error')}. "
            f"The previous revision (if any) keeps serving; `kiln logs API` shows the worker's "
            f"output.",
            1,
        )
    console.print(
        f"[green]Revision {result['revision']} is live[/] after {time.monotonic() - started:.1f}s.",
        highlight=False,
    )
    _print_urls(client, result["apis"], project_dir)
    return 0


def _wait(client: Management, deployment: str, revision: str, apis: list[dict]) -> dict[str, Any]:
    """Poll the rollout with a progress display until it is live or failed."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} APIs ready"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    names = sorted({a["name"] for a in apis})
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    with progress:
        task = progress.add_task(f"Rolling out {deployment} {revision}", total=len(names))
        while time.monotonic() < deadline:
            status = client.get(f"/deployments/{deployment}")
            rollout = status.get("rollout") or {}
            if rollout.get("revision") == revision and rollout.get("message"):
                # A step before the replicas load, e.g. building the Python environment.
                progress.update(task, description=f"{deployment} {revision}: {rollout['message']}")
            if rollout.get("revision") == revision and rollout.get("status") in ("live", "error"):
                progress.update(task, completed=len(names) if rollout["status"] == "live" else 0)
                return rollout
            ready = 0
            for entry in client.get("/apis")["apis"]:
                if entry["name"] in names and entry.get("revision") == revision:
                    ready += entry["status"] == "live"
            progress.update(task, completed=min(ready, len(names)))
            time.sleep(0.25)
    raise CliError(
        f"the rollout did not finish within {WAIT_TIMEOUT_S:.0f}s; `kiln get` shows where it is"
    )


def _print_urls(client: Management, apis: list[dict], project_dir: Path | None = None) -> None:
    base = client.inference_url()
    seen = set()
    for api in apis:
        if api["name"] in seen:
            continue
        seen.add(api["name"])
        url = f"{base}{api['endpoint']}"
        console.print(f"  {api['name']}: {url}", highlight=False, soft_wrap=True)
    if apis:
        first = f"{base}{apis[0]['endpoint']}"
        console.print("\nTry it:", highlight=False)
        key = client.target.curl_key_header()
        if project_dir is not None and stale_template_sample(project_dir):
            header = f" {key}" if key else ""
            console.print(f"  curl {first}{header}", markup=False, highlight=False, soft_wrap=True)
            console.print(
                "  (its status and signature. sample.json is still kiln init's iris example, "
                "which your handler no longer takes: put one of its requests there to send "
                "it with -d @sample.json)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            return
        console.print(
            f"  {try_it_curl(first, key, project_dir)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def try_it_curl(url: str, key_header: str, project_dir: Path | None) -> str:
    """A curl that runs as printed, from the folder the user is in: the key header
    names where the CLI found the key, and the body is the project's sample.json by a
    path relative to here (or an empty JSON object when the project has none)."""
    import os
    import shlex

    body = "'{}'"
    sample = (project_dir or Path(".")) / "sample.json"
    if sample.is_file():
        body = "@" + shlex.quote(os.path.relpath(sample))
    header = f" {key_header}" if key_header else ""
    return f"curl -X POST {url} -H 'Content-Type: application/json'{header} -d {body}"


def run_delete(api: str, env: str | None, force: bool) -> int:
    import typer

    if not force and not typer.confirm(
        f"Delete API '{api}'? It stops answering requests at once.", default=False
    ):
        console.print("Nothing deleted.")
        return 1
    client = Management(resolve(env), timeout=120)
    result = client.request("DELETE", f"/apis/{api}")
    extra = (
        " (its deployment had no other API and was removed)"
        if result.get("deployment_deleted")
        else ""
    )
    console.print(f"Deleted API '{escape(api)}'{extra}.", highlight=False)
    return 0


def run_refresh(api: str, env: str | None, wait: bool) -> int:
    client = Management(resolve(env))
    result = client.request("POST", f"/apis/{api}/refresh")
    console.print(
        f"Restarting the replicas of '{escape(api)}' (revision {result['revision']}) without "
        f"downtime ...",
        highlight=False,
    )
    if wait:
        final = _wait(client, result["deployment"], result["revision"], [{"name": api}])
        if final["status"] != "live":
            raise CliError(f"the refresh failed: {final.get('error')}; the old replicas serve on")
        console.print(f"[green]'{escape(api)}' refreshed.[/]", highlight=False)
    return 0


def run_rollback(api: str, revision: str | None, env: str | None, wait: bool) -> int:
    client = Management(resolve(env))
    result = client.request(
        "POST", f"/apis/{api}/rollback", params={"revision": revision} if revision else None
    )
    console.print(
        f"Rolling '{escape(result['deployment'])}' back to revision {result['revision']} ...",
        highlight=False,
    )
    if wait:
        final = _wait(client, result["deployment"], result["revision"], [{"name": api}])
        if final["status"] != "live":
            raise CliError(f"the rollback failed: {final.get('error')}; nothing changed")
        console.print(f"[green]Revision {result['revision']} is live again.[/]", highlight=False)
    return 0
