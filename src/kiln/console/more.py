"""The console's usage page (everyone) and server page (the admin): REST's answers as tables.

`/console/usage` is `GET /usage` (this month, or ?month=YYYY-MM): the user's plan's
limits, calls per day as a bar chart, each key's calls, 429s and quota left, and
calls per API and per key by status class. `/console/server` is `GET /server` and
`GET /users` (users, plans, calls this month); a user gets the REST 403 as a 404.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.console import views
from kiln.console.guard import Problem
from kiln.console.views import esc

CLASSES = ("2xx", "4xx", "5xx")


def _table(head: tuple[str, ...], rows: list[list[str]], caption: str = "") -> str:
    nums = [
        bool(rows) and i < len(rows[0]) and 'class="num"' in rows[0][i] for i in range(len(head))
    ]
    th = "".join(
        f'<th scope="col"{" class=num" if num else ""}>{esc(h)}</th>'
        for h, num in zip(head, nums, strict=True)
    )
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(head)}" class="muted">nothing yet</td></tr>'
    cap = f'<caption class="muted">{esc(caption)}</caption>' if caption else ""
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    table = f"<table>{cap}{thead}<tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _num(n: Any) -> str:
    return f'<td class="num">{esc(n)}</td>'


class MorePages:
    def __init__(self, console: Any) -> None:
        self.c = console  # pages.Console

    async def usage(self, request: Request) -> Response:
        session = await self.c.enter(request)
        query = {"month": m} if (m := request.query_params.get("month")) else {}
        answer = await self.c.call(session, "get", "/usage", query=query)
        if not answer.ok:
            raise Problem(answer.status, answer.message)
        return self.c.html(session, "Usage", usage_body(answer.body))

    async def server(self, request: Request) -> Response:
        session = await self.c.enter(request)
        if not session.is_admin:
            raise Problem(404, "no such page")
        info = await self.c.call(session, "get", "/server")
        if not info.ok:
            raise Problem(info.status, info.message)
        facts = [
            [f'<th scope="row">{esc(k)}</th>', f"<td>{esc(info.body.get(k))}</td>"]
            for k in ("version", "mode", "uptime_s", "url", "management_url", "metrics_url",
                      "home", "apis", "deployments")
        ]  # fmt: skip
        body = "<h2>This server</h2>" + _table(("", ""), facts)
        users = await self.c.call(session, "get", "/users")
        if users.ok:
            rows = [
                [
                    f"<td>{esc(u['name'])}</td>",
                    f"<td>{esc(u['plan'])}</td>",
                    f"<td>{'yes' if u.get('admin') else ''}</td>",
                    _num(u.get("apis", 0)),
                    _num(u.get("calls_this_month", 0)),
                    f"<td>{views.when(u.get('created_at'))}</td>",
                ]
                for u in users.body.get("users", [])
            ]
            body += "<h2>Users</h2>" + _table(
                ("User", "Plan", "Admin", "APIs", "Calls this month", "Created"), rows
            )
        return self.c.html(session, "Server", body)


def usage_body(usage: dict[str, Any]) -> str:
    """`GET /usage`'s answer as the usage page: plan, calls per day, per key, per API."""
    rows = usage.get("usage", [])
    month = str(usage.get("month", ""))
    per_key = [
        [
            f"<td>{esc(r['user'])}</td>",
            f"<td>{esc(r['key_id'])}</td>",
            f"<td>{esc(r['api'])}</td>",
            _num(r["calls"]),
            *[_num(r["by_status"].get(c, 0)) for c in CLASSES],
        ]
        for r in rows
    ]
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        totals[r["api"]]["calls"] += r["calls"]
        for c in CLASSES:
            totals[r["api"]][c] += r["by_status"].get(c, 0)
    per_api = [
        [f"<td>{esc(api)}</td>", *[_num(t[k]) for k in ("calls", *CLASSES)]]
        for api, t in sorted(totals.items())
    ]
    keys = [
        [
            f"<td>{esc(k['key_id'])}</td>",
            f"<td>{esc(k.get('name'))}</td>",
            f"<td>{esc(k.get('user'))}</td>",
            f"<td>{esc(k.get('status'))}</td>",
            _num(k.get("calls_this_month", 0)),
            _num(k.get("refused_429", 0)),
            _num(_bound(k.get("quota"))),
            _num(_bound(k.get("quota_left"))),
            _num(_rate(k.get("rate"), k.get("burst"))),
        ]
        for k in usage.get("keys", [])
    ]
    return (
        f"<p>Month {esc(month)} (UTC): {esc(usage.get('total', 0))} metered calls.</p>"
        + _plan_section(usage.get("plan"))
        + '<div class="charts">'
        + views.bar_chart("Calls per day", *_days(month, usage.get("days", [])))
        + "</div><h2>Per API</h2>"
        + _table(("API", "Calls", *CLASSES), per_api, "calls this month per API")
        + "<h2>Keys: quota left and 429s</h2>"
        + '<p class="muted">Now, this month. 429: calls refused by a quota or rate limit '
        "(never metered; counted since the server started).</p>"
        + _table(
            ("Key", "Name", "User", "Status", "Calls", "429", "Quota", "Quota left", "Rate"),
            keys,
        )
        + "<h2>Per key and API</h2>"
        + _table(("User", "Key", "API", "Calls", *CLASSES), per_key)
    )


def _bound(value: Any) -> Any:
    return "no limit" if value is None else value


def _rate(rate: Any, burst: Any) -> str:
    return "no limit" if not rate else f"{rate:g}/s, burst {burst or 1}"


def _days(month: str, days: list[dict[str, Any]]) -> tuple[list[tuple[str, int, str]], str]:
    """Every day of `month` (zero where nothing was called) and the chart's summary."""
    calls = {d["date"]: int(d.get("calls", 0)) for d in days}
    try:
        first = dt.date.fromisoformat(f"{month}-01")
    except ValueError:
        return [], "no usage"
    nxt = dt.date(first.year + (first.month == 12), first.month % 12 + 1, 1)
    dates = [first + dt.timedelta(days=i) for i in range((nxt - first).days)]
    bars = [
        (d.isoformat(), calls.get(d.isoformat(), 0), str(d.day) if d.day % 5 == 1 else "")
        for d in dates
    ]
    busiest = max(bars, key=lambda b: b[1], default=("", 0, ""))
    summary = f"Calls per day in {month}: {sum(calls.values())} in all" + (
        f", most on {busiest[0]} ({busiest[1]})" if busiest[1] else ""
    )
    return bars, summary


def _plan_section(plan: dict[str, Any] | None) -> str:
    if not plan:
        return ""
    mib = 1 << 20

    def size(v: Any) -> Any:
        return "no limit" if v is None else f"{v // mib} MiB"

    facts = [
        ("Plan", esc(plan.get("name"))),
        ("Calls this month", esc(plan.get("calls_this_month"))),
        ("Calls per month", esc(_bound(plan.get("calls_per_month")))),
        ("Calls left", esc(_bound(plan.get("calls_left")))),
        ("APIs", esc(_bound(plan.get("apis")))),
        ("Replicas per API", esc(_bound(plan.get("max_replicas")))),
        ("Memory per replica", esc(size(plan.get("max_replica_mem")))),
        ("Deploy upload", esc(size(plan.get("max_upload_bytes")))),
        ("Deploy unpacked", esc(size(plan.get("max_unpacked_bytes")))),
        ("Network egress", "allowed" if plan.get("network_egress") else "no"),
    ]
    cells = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in facts)
    return (
        f'<h2>Your plan\'s limits</h2><table class="narrow" id="plan"><tbody>{cells}'
        "</tbody></table>"
    )
