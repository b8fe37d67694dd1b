"""`kiln get [API]` and `kiln logs API`: what the server is doing, via the management API."""

from __future__ import annotations

import time
from typing import Any

import orjson
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from kiln.cli.client import Management, resolve
from kiln.cli.common import console

_STYLE = {
    "live": "green",
    "error": "red",
    "error (out of memory)": "red",
    "compute unavailable": "red",
    "scaled to zero": "blue",
}


def run_get(api: str | None, env: str | None, output: str, watch: bool) -> int:
    client = Management(resolve(env))
    if output == "json":
        data = client.get(f"/apis/{api}") if api else client.get("/apis")
        console.print_json(orjson.dumps(data).decode())
        return 0
    if not watch:
        console.print(_render(client, api))
        return 0
    with Live(_render(client, api), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2)
                live.update(_render(client, api))
        except KeyboardInterrupt:
            return 0


def _render(client: Management, api: str | None) -> Any:
    if api is None:
        apis = client.get("/apis")["apis"]
        if not apis:
            return "No APIs are deployed. Deploy a project with `kiln deploy DIR`."
        return _table(apis)
    detail = client.get(f"/apis/{api}")
    return Group(_table(detail["versions"]), *_details(detail))


def _ms(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, str) else f"{value:g}ms"


def _ago(stamp: float | None) -> str:
    if not stamp:
        return "-"
    seconds = max(0, time.time() - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _table(apis: list[dict]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in (
        "API",
        "VERSION",
        "STATUS",
        "REPLICAS",
        "2XX",
        "4XX",
        "5XX",
        "P50",
        "P99",
        "LAST UPDATE",
        "URL",
    ):
        table.add_column(column)
    for entry in apis:
        replicas = entry["replicas"]
        requests = entry["requests"]
        style = _STYLE.get(entry["status"], "yellow")
        count = f"{replicas['ready']}/{replicas['requested']}"
        if replicas.get("capped"):
            count += f" (max {replicas['max']}*)"
        table.add_row(
            entry["name"],
            entry.get("version") or "-",
            f"[{style}]{escape(entry['status'])}[/]",
            count,
            str(requests.get("2xx", 0)),
            str(requests.get("4xx", 0)),
            str(requests.get("5xx", 0)),
            _ms(entry["latency_ms"]["p50"]),
            _ms(entry["latency_ms"]["p99"]),
            _ago(entry.get("last_update")),
            entry["url"],
        )
    return table


def _details(detail: dict) -> list[Any]:
    out: list[Any] = []
    if detail.get("replicas", {}).get("capped"):
        out.append(f"\n* {escape(detail['replicas']['capped'])}")
    if detail.get("deployment"):
        out.append(
            f"\ndeployment [bold]{escape(detail['deployment'])}[/], revision {detail['revision']}"
        )
    tracker = detail.get("tracker")
    if tracker:
        out.append(f"\ntracker (last {tracker['window_s'] / 60:g} min, {tracker['model_type']}):")
        if tracker.get("warning"):
            out.append(f"  [yellow]{escape(tracker['warning'])}[/]")
        if tracker.get("model_type") == "classification":
            rows = Table(show_edge=False, header_style="bold")
            rows.add_column("CLASS")
            rows.add_column("COUNT", justify="right")
            for label, count in tracker.get("classes", {}).items():
                rows.add_row(escape(str(label)), str(count))
            out.append(rows)
        elif tracker.get("count"):
            out.append(
                "  count {count}  min {min:g}  max {max:g}  mean {mean:g}  p50 {p50:g}  "
                "p99 {p99:g}".format(**tracker)
            )
        else:
            out.append(f"  {tracker.get('message', 'no predictions in the window')}")
    errors = detail.get("recent_errors") or []
    if errors:
        out.append("\nrecent errors:")
        out += [f"  [red]{escape(e['error'])}[/]" for e in errors[-5:]]
    events = detail.get("scaling_events") or []
    if events:
        out.append("\nscaling events:")
        for event in events[-10:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            out.append(
                f"  {stamp} {event['from']} -> {event['to']}: {escape(str(event['reason']))}"
            )
    out.append(f"\n{escape(detail['curl'])}")
    return out


def run_logs(api: str, env: str | None, follow: bool, tail: int, job_id: str | None = None) -> int:
    client = Management(resolve(env))
    params = {"follow": "true" if follow else "false", "tail": str(tail)}
    path = f"/apis/{api}/jobs/{job_id}/logs" if job_id else f"/apis/{api}/logs"
    try:
        with client.stream(path, params) as response:
            if response.status_code >= 400:
                response.read()
                from kiln.cli.client import CliError, _message

                raise CliError(_message(response), 1)
            for line in response.iter_lines():
                if line.strip():
                    console.print(_log_line(line), markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        return 0
    return 0


def _log_line(line: str) -> str:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line.rstrip()
    stamp = time.strftime("%H:%M:%S", time.localtime(record.get("ts", 0)))
    replica = f"[{record['replica']}] " if record.get("replica") else ""
    if record.get("worker") is not None:  # a batch job's log: which worker said it
        replica = f"[worker {record['worker']}] "
    if record.get("event") == "request":
        return (
            f"{stamp} {record.get('method')} {record.get('path')} {record.get('status')} "
            f"{record.get('latency_ms')}ms id={record.get('request_id')}"
        )
    if record.get("event") == "debug":
        return f"{stamp} debug [{record.get('stage')}] {record.get('value')}"
    if record.get("event") == "scaling":
        return f"{stamp} scaled {record.get('from')} -> {record.get('to')}: {record.get('reason')}"
    return f"{stamp} {replica}{record.get('message', '')}"
