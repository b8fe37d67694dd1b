"""`kiln get [API]` and `kiln logs API`: what the server is doing, via the management API."""

from __future__ import annotations

import time
from typing import Any

import orjson
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kiln.cli.client import Management, resolve
from kiln.cli.common import console
from kiln.cli.tables import listing, output_mode, show

_STYLE = {
    "live": "green",
    "error": "red",
    "error (out of memory)": "red",
    "compute unavailable": "red",
    "scaled to zero": "blue",
}


def run_get(api: str | None, env: str | None, output: str, watch: bool) -> int:
    mode = output_mode(output)
    client = Management(resolve(env))
    if mode == "json":
        data = client.get(f"/apis/{api}") if api else client.get("/apis")
        console.print_json(orjson.dumps(data).decode())
        return 0
    wide = mode == "wide"
    if not watch:
        show(_render(client, api, wide), mode)
        return 0
    with Live(_render(client, api, wide), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2)
                live.update(_render(client, api, wide))
        except KeyboardInterrupt:
            return 0


def _render(client: Management, api: str | None, wide: bool = False) -> Any:
    if api is None:
        apis = client.get("/apis")["apis"]
        if not apis:
            return "No APIs are deployed. Deploy a project with `kiln deploy DIR`."
        return _table(apis, wide)
    detail = client.get(f"/apis/{api}")
    versions = detail["versions"] or [detail]  # a Batch API has no versions of its own
    return Group(_table(versions, wide), *_details(detail, client.target.curl_key_header()))


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


def _table(apis: list[dict], wide: bool = False) -> Table:
    """The API table. At a terminal's width the request counts and latencies share a
    column each so that names and URLs keep room (and fold, never cut); `-o wide`
    has one column per figure plus the deployment and revision."""
    versions = wide or any(entry.get("version") for entry in apis)
    if wide:
        columns = ["API", "VERSION", "STATUS", "REPLICAS", "2XX", "4XX", "5XX", "P50", "P99"]
        columns += ["LAST UPDATE", "DEPLOYMENT", "REVISION", "URL"]
    else:
        columns = ["API", *(["VERSION"] if versions else []), "STATUS", "REPLICAS"]
        columns += ["2XX/4XX/5XX", "P50/P99", "URL"]
    table = listing(*columns, ids=("API", "VERSION", "DEPLOYMENT", "REVISION", "URL"))
    for entry in apis:
        replicas = entry["replicas"]
        requests = entry["requests"]
        style = _STYLE.get(entry["status"], "yellow")
        count = f"{replicas['ready']}/{replicas['requested']}"
        if replicas.get("capped"):
            count += f" (max {replicas['max']}*)"
        codes = [str(requests.get(c, 0)) for c in ("2xx", "4xx", "5xx")]
        p50, p99 = _ms(entry["latency_ms"]["p50"]), _ms(entry["latency_ms"]["p99"])
        status = f"[{style}]{escape(entry['status'])}[/]"
        name = escape(entry["name"])
        if wide:
            row = [name, entry.get("version") or "-", status, count, *codes, p50, p99]
            row += [_ago(entry.get("last_update")), escape(entry.get("deployment") or "-")]
            row += [entry.get("revision") or "-"]
        else:
            row = [name, *([entry.get("version") or "-"] if versions else []), status, count]
            row += ["/".join(codes), f"{p50}/{p99}"]
        table.add_row(*row, escape(entry["url"]))
    return table


def capped_note(replicas: dict) -> str:
    """Why fewer replicas than max_replicas may run, saying where the number came from:
    users who never wrote max_replicas see compute.max_replicas's default (100)."""
    configured = replicas.get("configured_max")
    if configured is None:
        return str(replicas["capped"])
    origin = "the default of compute.max_replicas" if configured == 100 else "compute.max_replicas"
    return (
        f"max_replicas is {configured} ({origin}), but this machine fits at most "
        f"{replicas['max']} replicas of this API: their compute.cpu and compute.mem requests "
        f"must fit its cores and memory"
    )


def debug_curl(curl: str, key_header: str) -> str:
    """The server's debug curl, with the API key header when the CLI sends one (the
    server cannot know where this user keeps the key) and where to run it from."""
    if key_header and "x-api-key" not in curl.lower():
        head, sep, tail = curl.partition(" -d ")
        curl = f"{head} {key_header}{sep}{tail}" if sep else f"{curl} {key_header}"
    if " -d @" in curl:
        curl += "   # in the project's folder"
    return curl


def _details(detail: dict, key_header: str = "") -> list[Any]:
    out: list[Any] = []
    if detail.get("replicas", {}).get("capped"):
        out.append(f"\n* {escape(capped_note(detail['replicas']))}")
    if detail.get("deployment"):
        out.append(
            f"\ndeployment [bold]{escape(detail['deployment'])}[/], revision {detail['revision']}"
        )
    if detail.get("traffic"):  # a split between versions, or a shadow
        from kiln.cli.traffic_cmd import describe

        versions = [str(v["version"]) for v in detail.get("versions") or () if v.get("version")]
        view = {"api": detail["name"], "versions": versions, "default": detail.get("version")}
        out.append("\n" + describe({**view, "traffic": detail["traffic"]}))
    revisions = detail.get("revisions") or []
    if revisions:
        out.append(_revisions(revisions))
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
    if not detail.get("curl"):  # a first deploy that failed: nothing answers yet
        out.append(
            f"\n[red]not serving[/]: {escape(str(detail.get('error') or 'its deploy failed'))}\n"
            "Fix it and run `kiln deploy` again (or `kiln delete` it)."
        )
        return out
    out.append("")
    # One line however narrow the terminal: a wrapped command would not paste.
    out.append(Text(debug_curl(detail["curl"], key_header), no_wrap=True, overflow="ignore"))
    return out


def _revisions(revisions: list[dict]) -> Table:
    """The deployment's revisions, newest first: what `kiln rollback API REVISION` takes."""
    table = listing("REVISION", "STATUS", "CREATED", "ERROR", ids=("REVISION",))
    table.title, table.title_justify = "revisions (kiln rollback API REVISION):", "left"
    for r in sorted(revisions, key=lambda r: r.get("created_at") or 0, reverse=True):
        status = r.get("status") or "-"
        if r.get("current"):
            status += " (current)"
        created = r.get("created_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "-"
        table.add_row(r["revision"], escape(status), when, escape(r.get("error") or ""))
    return table


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
