"""The console's usage page (everyone) and server page (the admin): REST's answers as tables.

`/console/usage` is `GET /usage` (this month, or ?month=YYYY-MM): calls per key and
API by status class, totals per API. `/console/server` is `GET /server` and
`GET /users` (users, plans, calls this month); a user gets the REST 403 as a 404.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kiln.console import views
from kiln.console.guard import Problem
from kiln.console.views import esc

CLASSES = ("2xx", "4xx", "5xx")


def _table(head: tuple[str, ...], rows: list[list[str]], caption: str = "") -> str:
    th = "".join(f'<th scope="col">{esc(h)}</th>' for h in head)
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
        rows = answer.body.get("usage", [])
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
        month = answer.body.get("month", "")
        body = (
            f"<p>Month {esc(month)}: {esc(answer.body.get('total', 0))} metered calls.</p>"
            "<h2>Per API</h2>"
            + _table(("API", "Calls", *CLASSES), per_api)
            + "<h2>Per key</h2>"
            + _table(("User", "Key", "API", "Calls", *CLASSES), per_key)
        )
        return self.c.html(session, "Usage", body)

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
