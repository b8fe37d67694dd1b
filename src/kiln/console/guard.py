"""Console sessions, CSRF tokens and the Host/Origin checks (docs/architecture.md, "The console").

Why server-side sessions in memory: every page calls the REST routes with the
session's API key, so the server must hold the key; keeping it in this process
only (never on disk, never in the cookie) means a stolen database or cookie jar
holds no key, and a restart simply signs everyone out. The browser holds a random
256-bit id in an HttpOnly, SameSite=Strict cookie scoped to /console.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from starlette.responses import RedirectResponse, Response

from kiln.errors import Forbidden

COOKIE = "kiln_console"
IDLE_S = 12 * 3600
MAX_SESSIONS = 10_000
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"", "0.0.0.0", "::"})


@dataclass
class Session:
    """One browser's sign-in. `key` is None before sign-in and with auth off."""

    sid: str
    csrf: str
    key: str | None = None
    user: str | None = None
    key_id: str | None = None
    is_admin: bool = False
    signed_in: bool = False
    seen: float = field(default_factory=time.time)
    flash: str | None = None  # one message for the next page (a new key: shown once)
    cookie: str = "kiln_console"  # per server port: cookies do not tell ports apart


class Sessions:
    """The session table: bounded (oldest out first), idle sessions expire."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._table: OrderedDict[str, Session] = OrderedDict()

    def new(self) -> Session:
        """A fresh session; when the table is full, the oldest not signed in goes first
        (so a flood of cookieless requests cannot push out people who signed in)."""
        while len(self._table) >= MAX_SESSIONS:
            unsigned = next((sid for sid, s in self._table.items() if not s.signed_in), None)
            if unsigned is None:
                self._table.popitem(last=False)
            else:
                del self._table[unsigned]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), seen=self._clock())
        self._table[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._table.get(sid)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > IDLE_S:
            del self._table[sid]
            return None
        session.seen = now
        self._table.move_to_end(sid)
        return session

    def drop(self, sid: str) -> None:
        self._table.pop(sid, None)

    def renew(self, session: Session) -> Session:
        """A fresh id and CSRF token at sign-in (no session fixation)."""
        self.drop(session.sid)
        fresh = self.new()
        fresh.flash, fresh.cookie = session.flash, session.cookie
        return fresh


def cookie_name(port: int | None) -> str:
    """`kiln_console_8081`: browsers share cookies across ports, so two servers on one
    host must not overwrite each other's session."""
    return f"{COOKIE}_{port}" if port else COOKIE


def cookie_header(sid: str, *, clear: bool = False, name: str = COOKIE) -> str:
    """The Set-Cookie value: HttpOnly, SameSite=Strict, only for /console."""
    if clear:
        return f"{name}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"
    return f"{name}={sid}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={IDLE_S}"


def check_csrf(session: Session, presented: str | None) -> None:
    if not presented or not hmac.compare_digest(session.csrf, presented):
        raise Forbidden(
            "the form's CSRF token is missing or out of date; reload the page and submit again"
        )


def host_name(host_header: str) -> str:
    """'Example.COM:8081' -> 'example.com', '[::1]:8081' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bound: str, arrived_on: str | None, extra: Iterable[str] = ()) -> set[str]:
    """Names a console request may carry in Host: loopback, the address it came in on,
    the bound host, KILN_CONSOLE_HOSTS. A DNS-rebinding page's Host is its own domain."""
    hosts = set(LOOPBACK)
    if bound not in WILDCARD:
        hosts.add(bound.lower())
    if arrived_on:
        hosts.add(arrived_on.lower())
    hosts.update(h.strip().lower() for h in extra if h.strip())
    env = os.environ.get("KILN_CONSOLE_HOSTS", "")
    hosts.update(h.strip().lower() for h in env.split(",") if h.strip())
    return hosts


def check_host(host_header: str | None, allowed: set[str]) -> None:
    name = host_name(host_header or "")
    if name not in allowed:
        raise Forbidden(
            f"the console does not answer for the host {name or '(none)'!r}; open it by this "
            "server's address or localhost, or list the name in KILN_CONSOLE_HOSTS"
        )


def check_origin(headers: dict[str, str], scheme: str) -> None:
    """A state-changing request must come from this origin (or say nothing about it)."""
    if headers.get("sec-fetch-site", "") == "cross-site":
        raise Forbidden("a page of another site may not submit console forms")
    origin = headers.get("origin")
    if origin and origin != "null" and origin != f"{scheme}://{headers.get('host', '')}":
        raise Forbidden(f"a page of {origin} may not submit console forms")
    if origin == "null":
        raise Forbidden("a page without an origin may not submit console forms")


class Problem(Exception):
    """A page that cannot be shown: its status and what to do (303: where to go)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def redirect(to: str, session: Session) -> Response:
    """303 to `to`, keeping the session's cookie."""
    response = RedirectResponse(to, 303)
    response.headers["set-cookie"] = cookie_header(session.sid, name=session.cookie)
    return response
