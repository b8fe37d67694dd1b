"""A Batch API's jobs in the console: the list with progress bars, one job's page.

Data is the management REST routes' (`GET /apis/{name}/jobs`, `.../jobs/{id}`,
`.../failed`, `.../logs`), called with the session's key. A running job's page
reloads itself every few seconds (a `<meta http-equiv=refresh>`: no script).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.guard import Problem
from kiln.console.views import esc

ACTIVE = ("status_enqueuing", "status_running")
REFRESH_S = 3


def progress_bar(done: Any, total: Any, label: str) -> str:
    """An accessible <progress> with the numbers beside it."""
    if isinstance(total, int) and total > 0:
        return (
            f'<progress value="{int(done or 0)}" max="{total}" aria-label="{esc(label)}">'
            f"</progress> {int(done or 0)}/{total}"
        )
    return f'<progress aria-label="{esc(label)}"></progress> {int(done or 0)}/?'


def jobs_section(api: str, listing: dict[str, Any]) -> str:
    """The jobs table of a Batch API's page."""
    rows = []
    for j in listing.get("jobs", []):
        jid = esc(j["job_id"])
        link = f"/console/apis/{quote(api)}/jobs/{quote(j['job_id'])}"
        rows.append(
            f'<tr><td><a href="{link}">{jid}</a></td><td>{esc(j.get("status_text"))}</td>'
            f"<td>{progress_bar(j.get('batches_done'), j.get('total_batches'), f'job {jid}')}"
            f'</td><td class="num">{esc(j.get("failed"))}</td>'
            f"<td>{esc(j.get('created_time'))}</td></tr>"
        )
    head = "".join(
        f'<th scope="col">{h}</th>' for h in ("Job", "Status", "Batches", "Failed", "Created")
    )
    body = "".join(rows) or '<tr><td colspan="5" class="muted">no jobs yet</td></tr>'
    return (
        f'<h2>Jobs</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


class JobPages:
    def __init__(self, console: Any) -> None:
        self.c = console  # pages.Console

    async def job(self, request: Request) -> Response:
        session = await self.c.enter(request)
        api, job_id = request.path_params["name"], request.path_params["job_id"]
        base = f"/apis/{quote(api)}/jobs/{quote(job_id)}"
        status = await self.c.call(session, "get", base)
        if not status.ok:
            raise Problem(status.status, status.message)
        doc = status.body
        job, p = doc.get("job_status", {}), doc.get("progress", {})
        failed = await self.c.call(session, "get", f"{base}/failed")
        log = await self.c.call(session, "get", f"{base}/logs", query={"tail": "100"})
        rate, eta = p.get("items_per_second"), p.get("eta_seconds")
        output = (job.get("output") or {}).get("location")
        facts = [
            ("Status", esc(job.get("status_text"))),
            ("Batches", progress_bar(p.get("batches_done"), p.get("total_batches"), "batches")),
            ("Items", progress_bar(p.get("items_done"), p.get("total_items"), "items")),
            ("Items per second", esc(rate if rate is not None else "–")),
            ("ETA", esc(f"{eta:.0f} s" if isinstance(eta, int | float) else "–")),
            ("Started", esc(job.get("start_time") or "–")),
            ("Ended", esc(job.get("end_time") or "–")),
            ("Output", esc(output or "–")),
            ("Error", esc(job.get("error") or "–")),
        ]
        dl = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in facts)
        batches = (
            failed.body.get("failed_batches", [])
            if failed.ok and isinstance(failed.body, dict)
            else []
        )
        failures = "".join(
            f"<li>batch {esc(b.get('batch_id'))}: {esc(b.get('error'))}</li>" for b in batches
        )
        text = (
            log.body if isinstance(log.body, str) else ("" if log.body is None else str(log.body))
        )
        body = (
            f'<p><a href="/console/apis/{quote(api)}">{esc(api)}</a></p>'
            f'<table class="narrow"><tbody>{dl}</tbody></table>'
            f"<h2>Failed batches</h2><ul>{failures or '<li>none</li>'}</ul>"
            f'<h2 id="job-log">Job log</h2><pre class="log" tabindex="0" '
            f'aria-labelledby="job-log">{esc(text)}</pre>'
        )
        response = self.c.html(session, f"Job {job_id}", body)
        if job.get("status") in ACTIVE:
            response.headers["refresh"] = str(REFRESH_S)
        return response
