"""`kiln jobs`: submit, watch, list, stop and inspect Batch API jobs.

Everything goes through the management API (`/apis/{name}/jobs...`), like the
rest of the CLI; the server validates, so the CLI shows its messages as they are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from kiln.cli.client import CliError, Management, resolve
from kiln.cli.common import console, err_console, run_cli
from kiln.cli.tables import OUTPUT_HELP, listing, output_mode, show

jobs_app = typer.Typer(
    help="Batch API jobs: submit, get (-w to watch), list, stop, failed.",
    no_args_is_help=True,
)

EnvOption = Annotated[
    str | None,
    typer.Option("--env", "-e", help="Which server (see `kiln env list`; default: local)."),
]
FINAL = (
    "status_succeeded",
    "status_completed_with_failures",
    "status_enqueue_failed",
    "status_worker_error",
    "status_worker_oom",
    "status_timed_out",
    "status_stopped",
)


def _run(action: Any) -> None:
    run_cli(action)


def _client(env: str | None) -> Management:
    return Management(resolve(env))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@jobs_app.command("submit")
def submit(
    api: Annotated[str, typer.Argument(help="The batch API.")],
    spec: Annotated[Path, typer.Argument(help="The job spec, a JSON file (Cortex's format).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list the files the job would read.")
    ] = False,
    env: EnvOption = None,
) -> None:
    """Submit a job; prints its id (then `kiln jobs get API ID -w` to watch it)."""

    def action() -> int:
        try:
            body = spec.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {spec}: {exc.strerror}", 2) from None
        params = {"dryRun": "true"} if dry_run else {}
        result = _client(env).request(
            "POST",
            f"/apis/{api}/jobs",
            content=body,
            params=params,
            headers={"content-type": "application/json"},
        )
        if dry_run:
            for file in result.get("files", []):
                console.print(file, highlight=False, markup=False)
            count = result.get("file_count", result.get("batches"))
            console.print(f"validations passed ({count})", highlight=False)
            return 0
        console.print(result["job_id"], highlight=False)
        err_console.print(
            f"Submitted job {result['job_id']} to {api}; watch it with "
            f"`kiln jobs get {api} {result['job_id']} -w`",
            highlight=False,
        )
        return 0

    _run(action)


@jobs_app.command("list")
def list_jobs(
    api: Annotated[str, typer.Argument(help="The batch API.")],
    env: EnvOption = None,
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)] = "table",
) -> None:
    """The API's jobs, newest first: status, progress, failed batches, times."""

    def action() -> int:
        mode = output_mode(output)
        result = _client(env).get(f"/apis/{api}/jobs")
        if mode == "json":
            console.print_json(orjson.dumps(result).decode())
            return 0
        show(_jobs_table(result), mode)
        return 0

    _run(action)


def _jobs_table(result: dict[str, Any]) -> Table:
    table = listing(
        "job id", "status", "progress", "failed", "start time", "duration", ids=("job id",)
    )
    table.title = f"{result['api_name']}  {result.get('endpoint') or ''}"
    table.title_justify = "left"
    for job in result["jobs"]:
        total = job["total_batches"]
        table.add_row(
            job["job_id"],
            job["status_text"],
            f"{job['batches_done']}/{total if total is not None else '?'}",
            str(job["failed"]),
            (job["start_time"] or "-")[:19].replace("T", " "),
            _duration(job["duration_s"]),
        )
    return table


@jobs_app.command("get")
def get(
    api: Annotated[str, typer.Argument(help="The batch API.")],
    job_id: Annotated[str | None, typer.Argument(help="A job (omit to list them).")] = None,
    watch: Annotated[
        bool, typer.Option("-w", "--watch", help="Follow the job with a live progress bar.")
    ] = False,
    env: EnvOption = None,
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)] = "table",
) -> None:
    """A job's status, batch and worker stats; -w shows a progress bar until it ends."""

    def action() -> int:
        mode = output_mode(output)
        client = _client(env)
        if job_id is None:
            jobs = client.get(f"/apis/{api}/jobs")
            if mode == "json":
                console.print_json(orjson.dumps(jobs).decode())
            else:
                show(_jobs_table(jobs), mode)
            return 0
        path = f"/apis/{api}/jobs/{job_id}"
        status = _watch(client, path) if watch else client.get(path)
        if output == "json":
            console.print_json(orjson.dumps(status).decode())
        else:
            _print_status(status)
        return 0

    _run(action)


def _watch(client: Management, path: str) -> dict[str, Any]:
    status = client.get(path)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} items"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("enqueuing", total=None, rate="", eta="-")
        while True:
            job, progress = status["job_status"], status["progress"]
            rate = progress.get("items_per_second")
            bar.update(
                task,
                description=job["status_text"],
                total=progress.get("total_items"),
                completed=progress.get("items_done") or 0,
                rate=f"{rate:,.0f} items/s" if rate else "",
                eta=_duration(progress.get("eta_seconds")),
            )
            if job["status"] in FINAL:
                return status
            time.sleep(0.5)
            status = client.get(path)


def _print_status(status: dict[str, Any]) -> None:
    job, metrics, progress = status["job_status"], status["metrics"], status["progress"]
    console.print(
        f"job {job['job_id']} of {job['api_name']}: [bold]{job['status_text']}[/]"
        + (f" ({escape(job['error'])})" if job.get("error") else ""),
        highlight=False,
    )
    console.print(
        f"created {job['created_time']}, started {job['start_time'] or '-'}, "
        f"ended {job['end_time'] or '-'}",
        highlight=False,
    )
    if (job.get("output") or {}).get("location"):
        console.print(f"output in {escape(job['output']['location'])}", highlight=False)
    batches = Table(title="batch stats", title_justify="left")
    for column in ("total", "succeeded", "failed", "avg time per batch", "items/s", "eta"):
        batches.add_column(column)
    avg = metrics.get("avg_time_per_batch")
    rate = progress.get("items_per_second")
    batches.add_row(
        str(job["total_batch_count"] if job["total_batch_count"] is not None else "?"),
        str(metrics["succeeded"]),
        str(metrics["failed"]),
        f"{avg * 1000:.1f} ms" if avg is not None else "-",
        f"{rate:,.0f}" if rate else "-",
        _duration(progress.get("eta_seconds")),
    )
    console.print(batches)
    counts = job.get("worker_counts")
    if counts:
        workers = Table(title="worker stats", title_justify="left")
        for column in ("requested", "pending", "initializing", "running", "succeeded", "failed"):
            workers.add_column(column)
        workers.add_row(
            str(job["workers"]),
            *(str(counts[k]) for k in ("pending", "initializing", "running", "succeeded")),
            str(counts["failed"]),
        )
        console.print(workers)


@jobs_app.command("stop")
def stop(
    api: Annotated[str, typer.Argument(help="The batch API.")],
    job_id: Annotated[str, typer.Argument(help="The job to stop.")],
    env: EnvOption = None,
) -> None:
    """Stop a job: its workers are stopped and its queued batches dropped."""

    def action() -> int:
        result = _client(env).request("DELETE", f"/apis/{api}/jobs/{job_id}")
        console.print(result["message"], highlight=False)
        return 0

    _run(action)


@jobs_app.command("failed")
def failed(
    api: Annotated[str, typer.Argument(help="The batch API.")],
    job_id: Annotated[str, typer.Argument(help="The job.")],
    env: EnvOption = None,
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)] = "table",
) -> None:
    """The job's dead-lettered batches: which items, how often tried, and the error."""

    def action() -> int:
        mode = output_mode(output)
        result = _client(env).get(f"/apis/{api}/jobs/{job_id}/failed")
        if mode == "json":
            console.print_json(orjson.dumps(result).decode())
            return 0
        rows = result["failed_batches"]
        if not rows:
            console.print(f"job {job_id} has no failed batches", highlight=False)
            return 0
        table = Table(title=f"failed batches of job {job_id}", title_justify="left")
        for column in ("batch", "items", "receives", "error"):
            table.add_column(column, overflow="fold")
        for row in rows:
            first = row["first_item"]
            table.add_row(
                row["batch_id"],
                f"{first}..{first + row['item_count'] - 1}",
                str(row["receive_count"]),
                escape(row["error"]),
            )
        show(table, mode)
        return 0

    _run(action)
