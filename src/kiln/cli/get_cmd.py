"""`kiln get [API]` and `kiln logs API`: what the running server is doing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich.markup import escape
from rich.table import Table

from kiln.cli.common import console, err_console, find_server_info

_STYLE = {"ready": "green", "failed": "red", "scaled to zero": "blue"}


def _server(url: str | None) -> tuple[str, str | None, dict | None]:
    info = find_server_info()
    if url:
        return url.rstrip("/"), None, info
    if info is None:
        raise LookupError(
            "no running Kiln server found: start one with `kiln serve`, or pass --url"
        )
    return str(info["url"]).rstrip("/"), info.get("metrics_url"), info


def _traffic(metrics_url: str | None) -> dict[str, dict[str, Any]]:
    """Per API: requests by status class and p50/p99 latency, from the metrics port."""
    if not metrics_url:
        return {}
    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            api = sample.labels.get("api")
            if api is None:
                continue
            entry = out.setdefault(api, {"2xx": 0, "4xx": 0, "5xx": 0})
            if sample.name == "kiln_requests_total":
                status = sample.labels["status_class"]
                entry[status] = entry.get(status, 0) + int(sample.value)
            elif sample.name == "kiln_request_latency_seconds_bucket":
                buckets.setdefault(api, []).append((float(sample.labels["le"]), sample.value))
    for api, points in buckets.items():
        points.sort()
        total = points[-1][1] if points else 0
        for q in (50, 99):
            bound = next((le for le, c in points if total and c >= total * q / 100), None)
            out[api][f"p{q}"] = bound
    return out


def _ms(bound: float | None) -> str:
    if bound is None:
        return "-"
    return "slower" if bound == float("inf") else f"<={bound * 1000:g}ms"


def run_get(api: str | None, url: str | None, output: str, watch: bool) -> int:
    try:
        base, metrics_url, _ = _server(url)
    except LookupError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        return 2
    while True:
        try:
            apis = httpx.get(f"{base}/apis", timeout=10).json()["apis"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            err_console.print(f"[bold red]Error:[/] cannot reach {base}: {exc}", highlight=False)
            return 1
        if api is not None:
            apis = [a for a in apis if a["name"] == api]
            if not apis:
                err_console.print(f"[bold red]Error:[/] no API named '{escape(api)}' on {base}")
                return 2
        traffic = _traffic(metrics_url)
        if output == "json":
            for entry in apis:
                entry["traffic"] = traffic.get(entry["name"], {})
                entry["url"] = f"{base}{entry['endpoint']}"
            console.print_json(orjson.dumps({"apis": apis}).decode())
        else:
            console.print(_table(apis, traffic, base))
            if api is not None:
                _details(apis[0], base)
        if not watch:
            return 0
        time.sleep(2)
        console.clear()


def _table(apis: list[dict], traffic: dict, base: str) -> Table:
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
        "URL",
    ):
        table.add_column(column)
    for entry in apis:
        t = traffic.get(entry["name"], {})
        replicas = entry.get("replicas", {})
        style = _STYLE.get(entry["status"], "yellow")
        table.add_row(
            entry["name"],
            entry.get("version") or "-",
            f"[{style}]{entry['status']}[/]",
            f"{replicas.get('ready', 0)}/{replicas.get('requested', 0)}",
            str(t.get("2xx", 0)),
            str(t.get("4xx", 0)),
            str(t.get("5xx", 0)),
            _ms(t.get("p50")),
            _ms(t.get("p99")),
            f"{base}{entry['endpoint']}",
        )
    return table


def _details(entry: dict, base: str) -> None:
    if entry.get("error"):
        console.print(f"[red]error:[/] {escape(entry['error'])}", highlight=False)
    events = entry.get("scaling_events") or []
    if events:
        console.print("\nscaling events:")
        for event in events[-10:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            console.print(f"  {stamp} {event['from']} -> {event['to']}: {escape(event['reason'])}")
    monitoring = httpx.get(f"{base}/apis/{entry['name']}/monitoring", timeout=10)
    if monitoring.status_code == 200:
        console.print("\ntracker (last hour):")
        console.print_json(monitoring.text)
    console.print(
        f"\ncurl -X POST '{base}{entry['endpoint']}?debug=true' "
        f"-H 'Content-Type: application/json' -d @sample.json",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def run_logs(api: str, follow: bool) -> int:
    info = find_server_info()
    if info is None or not info.get("home"):
        err_console.print(
            "[bold red]Error:[/] no running Kiln server found: start one with `kiln serve`"
        )
        return 2
    path = Path(info["home"]) / "logs" / f"{api}.log"
    if not path.exists():
        err_console.print(f"[bold red]Error:[/] no logs for API '{escape(api)}' yet ({path})")
        return 2
    with path.open("rb") as handle:
        while True:
            line = handle.readline()
            if line:
                console.print(_log_line(line), markup=False, highlight=False, soft_wrap=True)
                continue
            if not follow:
                return 0
            time.sleep(0.2)


def _log_line(line: bytes) -> str:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line.decode(errors="replace").rstrip()
    stamp = time.strftime("%H:%M:%S", time.localtime(record.get("ts", 0)))
    if record.get("event") == "request":
        return (
            f"{stamp} {record.get('method')} {record.get('path')} {record.get('status')} "
            f"{record.get('latency_ms')}ms id={record.get('request_id')}"
        )
    if record.get("event") == "debug":
        return f"{stamp} debug [{record.get('stage')}] {record.get('value')}"
    if record.get("event") == "scaling":
        return f"{stamp} scaled {record.get('from')} -> {record.get('to')}: {record.get('reason')}"
    return f"{stamp} {record.get('message', '')}"
