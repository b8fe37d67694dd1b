"""The console's key page: list, create (the key shown once), disable, enable, rotate, delete.

Each change is the REST route's (`POST /keys`, `POST /keys/{id}/disable|enable|rotate`,
`DELETE /keys/{id}`) called with the session's key, so a key can only do here
what it could do with curl; each is confirmed in the browser first and written to
the audit log with the answer's status.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from kiln.console import views
from kiln.console.guard import Problem, redirect

ACTIONS = {
    "disable": ("post", "/keys/{id}/disable"),
    "enable": ("post", "/keys/{id}/enable"),
    "rotate": ("post", "/keys/{id}/rotate"),
    "delete": ("delete", "/keys/{id}"),
}


class KeyPages:
    def __init__(self, console: Any) -> None:
        self.c = console  # pages.Console

    async def page(self, request: Request) -> Response:
        session = await self.c.enter(request)
        answer = await self.c.call(session, "get", "/keys")
        if not answer.ok:
            raise Problem(answer.status, answer.message)
        keys = answer.body.get("keys", []) if isinstance(answer.body, dict) else []
        return self.c.html(session, "API keys", _keys_body(session, keys))

    async def create(self, request: Request) -> Response:
        session = await self.c.enter(request)
        name = str((await request.form()).get("name", "")).strip() or "console key"
        answer = await self.c.call(session, "post", "/keys", body={"name": name})
        await self.c.audit(
            session,
            "key created",
            answer.body.get("id", name) if answer.ok else name,
            answer.status,
        )
        session.flash = _shown_once(answer) if answer.ok else views.esc(answer.message)
        return redirect("/console/keys", session)

    async def change(self, request: Request) -> Response:
        session = await self.c.enter(request)
        key_id, action = request.path_params["key_id"], request.path_params["action"]
        if action not in ACTIONS:
            raise Problem(404, f"no key action {action!r}; use disable, enable, rotate or delete")
        method, path = ACTIONS[action]
        answer = await self.c.call(session, method, path.format(id=quote(key_id)))
        verb = {"delete": "deleted", "rotate": "rotated"}.get(action, f"{action}d")
        await self.c.audit(session, f"key {verb}", key_id, answer.status)
        if answer.ok and action == "rotate":
            session.flash = _shown_once(answer)
        elif answer.ok:
            session.flash = views.esc(f"Key {key_id} {verb}.")
        else:
            session.flash = views.esc(answer.message)
        return redirect("/console/keys", session)


def _shown_once(answer: Any) -> str:
    key = answer.body.get("key", "")
    return (
        f"New key <strong>{views.esc(answer.body.get('id'))}</strong>, shown only now; copy it: "
        f'<code id="new-key">{views.esc(key)}</code> '
        '<button type="button" class="act" onclick="navigator.clipboard.writeText('
        "document.getElementById('new-key').textContent)\">Copy</button>"
    )


def _keys_body(session: Any, keys: list[dict[str, Any]]) -> str:
    rows = []
    for k in keys:
        kid = views.esc(k.get("id"))
        forms = []
        for action in ("disable" if k.get("status") == "active" else "enable", "rotate", "delete"):
            danger = " danger" if action == "delete" else ""
            forms.append(
                f'<form class="inline" method="post" action="/console/keys/{kid}/{action}" '
                f"onsubmit=\"return confirm('{action.capitalize()} key {kid}?')\">"
                f'{views.csrf(session)}<button class="act{danger}" type="submit" '
                f'aria-label="{action} key {kid}">{action.capitalize()}</button></form>'
            )
        rows.append(
            f"<tr><td>{kid}</td><td>{views.esc(k.get('name'))}</td>"
            f"<td>{views.esc(k.get('user'))}</td><td>{views.esc(k.get('status'))}</td>"
            f"<td>{views.esc(','.join(k.get('scopes') or []))}</td>"
            f"<td>{views.when(k.get('last_used_at'))}</td><td>{' '.join(forms)}</td></tr>"
        )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in ("Id", "Name", "User", "Status", "Scopes", "Last used", "Actions")
    )
    return (
        f'<form method="post" action="/console/keys" class="toolbar">{views.csrf(session)}'
        '<label for="key-name">New key name</label>'
        '<input id="key-name" name="name" type="text" required maxlength="200">'
        '<button class="act" type="submit">Create key</button></form>'
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
