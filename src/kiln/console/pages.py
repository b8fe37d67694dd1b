"""The console's routes: sign-in, the overview, one API, keys, the audit log.

Every handler starts at `Console.enter` (Host check, session, CSRF and Origin for
a POST) and gets its data from `Rest.call` with the session's key: what the REST
API answers a key is what the console shows it, and a REST error is shown as the
page's error with the same status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from kiln.console import views
from kiln.console.front import Answer, Rest
from kiln.console.guard import (
    Problem,
    Session,
    Sessions,
    allowed_hosts,
    check_csrf,
    check_host,
    check_origin,
    cookie_header,
    cookie_name,
    redirect,
)
from kiln.console.jobs import JobPages, jobs_section
from kiln.console.keys import KeyPages
from kiln.console.more import MorePages
from kiln.console.try_it import Tried, send, signature_body, try_section
from kiln.control.store import AuditEntry
from kiln.errors import KilnError
from kiln.protocols.auth import authenticate

WINDOWS = ("15m", "1h", "24h")
log = logging.getLogger("kiln.console")
LOG_LINES = 50


class _KeyHeaders:
    def __init__(self, key: str) -> None:
        self.headers = {"x-api-key": key}


class Console:
    def __init__(self, rest: Rest, authority: Any, store: Any, bound_host: str) -> None:
        self.rest = rest
        self.authority = authority  # QuotaGate with auth on; None: `kiln serve`, no keys
        self.store = store
        self.bound_host = bound_host
        self.sessions = Sessions()

    # ---- the gate of every page ---------------------------------------------------
    async def enter(self, request: Request, *, signed_in: bool = True) -> Session:
        server = request.scope.get("server")
        check_host(
            request.headers.get("host"),
            allowed_hosts(self.bound_host, server[0] if server else None),
        )
        cookie = cookie_name(server[1] if server else None)
        session = self.sessions.get(request.cookies.get(cookie))
        if request.method == "POST":
            check_origin(dict(request.headers), request.url.scheme)
            form = await request.form()
            if session is None:
                raise Problem(403, "no console session: reload the page and submit again")
            check_csrf(session, str(form.get("csrf", "")) or None)
        if session is None:
            session = self.sessions.new()
            session.cookie = cookie
            if self.authority is None:
                session.user, session.is_admin = "local", True
        if signed_in and self.authority is not None and not session.signed_in:
            raise Problem(303, "/console/login")
        return session

    async def call(self, session: Session, method: str, path: str, **kw: Any) -> Answer:
        answer = await self.rest.call(method, path, session.key, **kw)
        if answer.status in (401, 403) and self.authority is not None and session.key:
            try:  # refused: is the session's key itself still good?
                await asyncio.to_thread(
                    authenticate, self.authority, _KeyHeaders(session.key), "manage"
                )
            except KilnError:  # disabled, deleted or expired: the session ends with it
                self.sessions.drop(session.sid)
                raise Problem(303, "/console/login") from None
        return answer

    async def audit(self, session: Session, action: str, target: str, status: int) -> None:
        entry = AuditEntry(time.time(), session.user, session.key_id, action, target, status)
        if self.store is not None:
            await asyncio.to_thread(self.store.add_audit, entry)

    def html(
        self, session: Session, title: str, body: str, status: int = 200, **kw: Any
    ) -> Response:
        response = HTMLResponse(views.page(title, body, session, **kw), status)
        response.headers["set-cookie"] = cookie_header(session.sid, name=session.cookie)
        response.headers["cache-control"] = "no-store"
        response.headers["x-frame-options"] = "DENY"
        response.headers["content-security-policy"] = (
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "frame-ancestors 'none'"
        )
        response.headers["referrer-policy"] = "same-origin"
        return response

    # ---- sign-in --------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        session = await self.enter(request, signed_in=False)
        if self.authority is None or session.signed_in:
            return redirect("/console", session)
        return self.html(session, "Sign in", _login_body(session, ""))

    async def login(self, request: Request) -> Response:
        session = await self.enter(request, signed_in=False)
        if self.authority is None:
            return redirect("/console", session)
        key = str((await request.form()).get("key", "")).strip()
        try:
            principal = await asyncio.to_thread(
                authenticate, self.authority, _KeyHeaders(key), "manage"
            )
        except KilnError as exc:
            body = _login_body(session, f"{exc} ")
            return self.html(session, "Sign in", body, exc.status)
        fresh = self.sessions.renew(session)
        fresh.key, fresh.user, fresh.key_id = key, principal.user, principal.key_id
        fresh.is_admin, fresh.signed_in = principal.sees_all, True
        return redirect("/console", fresh)

    async def logout(self, request: Request) -> Response:
        session = await self.enter(request, signed_in=False)
        self.sessions.drop(session.sid)
        response = RedirectResponse("/console/login", 303)
        response.headers["set-cookie"] = cookie_header("", clear=True, name=session.cookie)
        return response

    # ---- overview -------------------------------------------------------------------
    async def overview(self, request: Request) -> Response:
        session = await self.enter(request)
        apis = await self._apis(session)
        return self.html(session, "APIs", views.overview(apis), script=views.OVERVIEW_JS)

    async def fragment(self, request: Request) -> Response:
        session = await self.enter(request)
        return HTMLResponse(views.api_rows(await self._apis(session)))

    async def _apis(self, session: Session) -> list[dict[str, Any]]:
        answer = await self.call(session, "get", "/apis")
        if not answer.ok:
            raise Problem(answer.status, answer.message)
        return list(answer.body.get("apis", []))

    # ---- one API --------------------------------------------------------------------
    async def api_page(self, request: Request) -> Response:
        session = await self.enter(request)
        return await self._api(session, request, None)

    async def try_it(self, request: Request) -> Response:
        """Send the form's body to the API with the session's key; the page shows the answer."""
        session = await self.enter(request)
        name = request.path_params["name"]
        detail = await self.call(session, "get", f"/apis/{quote(name)}")
        if not detail.ok:
            raise Problem(detail.status, detail.message)
        body = str((await request.form()).get("body", ""))
        tried = await send(detail.body.get("url", ""), body, session.key)
        return await self._api(session, request, tried)

    async def _api(self, session: Session, request: Request, tried: Tried | None) -> Response:
        name = request.path_params["name"]
        window = request.query_params.get("window", "1h")
        window = window if window in WINDOWS else "1h"
        detail = await self.call(session, "get", f"/apis/{quote(name)}", query={"window": window})
        if not detail.ok:
            raise Problem(detail.status, detail.message)
        series = await self.call(
            session, "get", f"/apis/{quote(name)}/timeseries", query={"window": window}
        )
        points = series.body.get("points", []) if series.ok else []
        from kiln.console.api_page import LOG_JS, api_body

        try:
            logs = await self._log_text(session, name)
        except Problem:  # nothing logged yet (a Batch API logs per job)
            logs = ""
        body = api_body(session, detail.body, points, window, logs)
        if detail.body.get("kind") == "BatchAPI":
            listing = await self.call(session, "get", f"/apis/{quote(name)}/jobs")
            if listing.ok:
                body += jobs_section(name, listing.body)
        else:
            prefill = None if tried else await signature_body(detail.body, session.key)
            link = f"/console/apis/{quote(name)}"
            body += try_section(session, detail.body, link, tried, prefill)
        return self.html(session, name, body, script=LOG_JS)

    async def log_fragment(self, request: Request) -> Response:
        session = await self.enter(request)
        return PlainTextResponse(await self._log_text(session, request.path_params["name"]))

    async def _log_text(self, session: Session, name: str) -> str:
        """The API's last log lines, as `kiln logs` prints them (JSON lines)."""
        answer = await self.call(
            session, "get", f"/apis/{quote(name)}/logs", query={"tail": str(LOG_LINES)}
        )
        if not answer.ok:
            raise Problem(answer.status, answer.message)
        if isinstance(answer.body, str):
            return answer.body
        return "" if answer.body is None else orjson.dumps(answer.body).decode()

    async def rollback(self, request: Request) -> Response:
        session = await self.enter(request)
        name = request.path_params["name"]
        revision = str((await request.form()).get("revision", ""))
        answer = await self.call(
            session, "post", f"/apis/{quote(name)}/rollback", query={"revision": revision}
        )
        await self.audit(session, "rollback", f"{name} to {revision}", answer.status)
        session.flash = views.esc(
            f"Rolling {name} back to {revision}." if answer.ok else answer.message
        )
        return redirect(f"/console/apis/{quote(name)}", session)

    # ---- audit log ------------------------------------------------------------------
    async def audit_page(self, request: Request) -> Response:
        session = await self.enter(request)
        if not session.is_admin or self.store is None:
            raise Problem(404, "no such page")
        entries = await asyncio.to_thread(self.store.audit_entries, 200)
        rows = "".join(
            f"<tr><td>{views.when(e.at)}</td><td>{views.esc(e.user)}</td>"
            f"<td>{views.esc(e.key_id)}</td><td>{views.esc(e.action)}</td>"
            f'<td>{views.esc(e.target)}</td><td class="num">{e.status}</td></tr>'
            for e in entries
        )
        head = "".join(
            f'<th scope="col">{h}</th>' for h in ("When", "User", "Key", "What", "Target", "Status")
        )
        body = (
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows or '<tr><td colspan=6>Nothing changed yet.</td></tr>'}</tbody>"
            "</table></div>"
        )
        return self.html(session, "Audit log", body)


def _login_body(session: Session, problem: str) -> str:
    shown = f'<div class="flash problem" role="alert">{views.esc(problem)}</div>' if problem else ""
    return (
        f'{shown}<form method="post" action="/console/login">{views.csrf(session)}'
        '<p><label for="key">API key</label><br>'
        '<input id="key" name="key" type="password" autocomplete="off" required></p>'
        '<p class="muted">The admin key, or a key of yours with the manage scope.</p>'
        '<p><button class="act" type="submit">Sign in</button></p></form>'
    )


def console_app(rest: Rest, authority: Any, store: Any, bound_host: str) -> Starlette:
    """The console's Starlette app (ConsoleFront sends it every /console path)."""
    c = Console(rest, authority, store, bound_host)
    keys = KeyPages(c)
    more = MorePages(c)
    jobs = JobPages(c)

    async def problem(request: Request, exc: Exception) -> Response:
        if isinstance(exc, Problem) and exc.status == 303:
            return RedirectResponse(exc.message, 303)
        status = exc.status if isinstance(exc, Problem | KilnError) else 500
        message = exc.message if isinstance(exc, Problem) else str(exc)
        if status == 500 and not isinstance(exc, Problem | KilnError):
            log.exception("console page %s failed", request.url.path, exc_info=exc)
            message = "the console failed to show this page; the server log has the details"
        body = f'<div class="flash problem" role="alert">{views.esc(message)}</div>'
        title = "Not found" if status == 404 else "Refused" if status in (401, 403) else "Error"
        return HTMLResponse(views.page(title, body, None), status)

    routes = [
        Route("/console", c.overview, methods=["GET"]),
        Route("/console/login", c.login_form, methods=["GET"]),
        Route("/console/login", c.login, methods=["POST"]),
        Route("/console/logout", c.logout, methods=["POST"]),
        Route("/console/fragment/apis", c.fragment, methods=["GET"]),
        Route("/console/apis/{name}", c.api_page, methods=["GET"]),
        Route("/console/fragment/logs/{name}", c.log_fragment, methods=["GET"]),
        Route("/console/apis/{name}/rollback", c.rollback, methods=["POST"]),
        Route("/console/apis/{name}/try", c.try_it, methods=["POST"]),
        Route("/console/apis/{name}/jobs/{job_id}", jobs.job, methods=["GET"]),
        Route("/console/audit", c.audit_page, methods=["GET"]),
        Route("/console/usage", more.usage, methods=["GET"]),
        Route("/console/server", more.server, methods=["GET"]),
        Route("/console/keys", keys.page, methods=["GET"]),
        Route("/console/keys", keys.create, methods=["POST"]),
        Route("/console/keys/{key_id}/{action}", keys.change, methods=["POST"]),
    ]
    return Starlette(
        routes=routes, exception_handlers={Problem: problem, KilnError: problem, Exception: problem}
    )
