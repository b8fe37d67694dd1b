"""REST routes for users, API keys and usage on the management port (`kiln users|keys|usage`).

- `GET /users`, `POST /users {name, plan}` (admin): list; create, answering with the
  user's first `manage` key, once. `DELETE /users/{name}` (admin): the user, their
  APIs and keys.
- `GET /keys[?user=]`, `POST /keys`: your keys (the admin: anyone's); create one, at most
  as broad as the key asking (scope, APIs, expiry, quota, rate: else 403 naming which).
  `POST /keys/{id}/disable|enable|rotate`, `DELETE /keys/{id}`: the key's user or the
  admin.
- `GET /usage[?user=&month=YYYY-MM]`: metered calls per user, key, API, version and
  status class (yours; the admin: anyone's), the month's calls per UTC day, each
  key's quota left and 429s this month, and the user's plan's limits.

The secret of a key appears in exactly one response: the one that created (or
rotated) it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.errors import Forbidden, InvalidInput, NotImplementedByApi

ACCOUNT_ROUTES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("get", "/users", "List users (admin)", ()),
    ("post", "/users", "Create a user (admin); answers with their first key, once", ()),
    ("delete", "/users/{name}", "Delete a user with their APIs and keys (admin)", ()),
    ("get", "/keys", "List API keys (yours; the admin may name ?user=)", ("user",)),
    ("post", "/keys", "Create an API key; the answer holds the key, once", ()),
    ("delete", "/keys/{key_id}", "Delete an API key", ()),
    ("post", "/keys/{key_id}/disable", "Disable an API key", ()),
    ("post", "/keys/{key_id}/enable", "Enable an API key", ()),
    ("post", "/keys/{key_id}/rotate", "Replace an API key by a new one with its settings", ()),
    ("get", "/usage", "Metered calls this month (or ?month=YYYY-MM)", ("user", "month")),
)


def account_routes(server: Any) -> list[Route]:
    api = AccountsApi(server)
    handlers = {
        ("get", "/users"): api.list_users,
        ("post", "/users"): api.create_user,
        ("delete", "/users/{name}"): api.delete_user,
        ("get", "/keys"): api.list_keys,
        ("post", "/keys"): api.create_key,
        ("delete", "/keys/{key_id}"): api.delete_key,
        ("post", "/keys/{key_id}/disable"): api.disable_key,
        ("post", "/keys/{key_id}/enable"): api.enable_key,
        ("post", "/keys/{key_id}/rotate"): api.rotate_key,
        ("get", "/usage"): api.usage,
    }
    return [
        Route(path, handlers[(method, path)], methods=[method.upper()])
        for method, path, _, _ in ACCOUNT_ROUTES
    ]


def _principal(request: Request) -> Any:
    return request.scope.get("state", {}).get("principal")


class AccountsApi:
    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def accounts(self) -> Any:
        if self.server.accounts is None:
            raise NotImplementedByApi(
                "this server runs without API keys (kiln serve without --auth); users, keys "
                "and usage need `kiln server start` or `kiln serve --auth`"
            )
        return self.server.accounts

    def _admin(self, request: Request) -> Any:
        accounts = self.accounts
        principal = _principal(request)
        if principal is None or not principal.is_admin:
            raise Forbidden("only the admin manages users; ask them, or use the admin's key")
        return accounts

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidInput("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object")
        return body

    # ---- users ----------------------------------------------------------------------
    async def list_users(self, request: Request) -> Response:
        accounts = self._admin(request)
        quotas = self.server.quotas
        users = [
            {
                "name": u.name,
                "plan": u.plan,
                "admin": u.is_admin,
                "created_at": u.created_at,
                "calls_this_month": quotas.by_user.get(u.name, 0),
                "apis": sum(
                    1
                    for n in self.server.registry.all_unfiltered()
                    if n.name.startswith(f"{u.name}.")
                ),
            }
            for u in accounts.users.values()
        ]
        return JSONResponse({"users": users})

    async def create_user(self, request: Request) -> Response:
        accounts = self._admin(request)
        body = await self._json(request)
        name = str(body.get("name", ""))
        plan = str(body.get("plan", "free"))
        from kiln.config.blocks import RESERVED_NAMES, check_name

        try:
            check_name(name, "user")
        except ValueError as exc:
            raise InvalidInput(f"user name {name!r}: {exc}") from None
        if name in RESERVED_NAMES:
            raise InvalidInput(f"'{name}' is a route of the server; choose another user name")
        if plan not in self.server.quotas.plans:
            known = ", ".join(sorted(self.server.quotas.plans))
            raise InvalidInput(f"no plan named '{plan}' (plans: {known})")
        taken = await asyncio.to_thread(self._path_taken, name)
        if taken:
            raise InvalidInput(f"'{name}' is already {taken}; choose another user name")
        first = {"scopes": frozenset(("invoke", "manage")), "apis": None}
        # The user's first key has no limits: only an admin key without limits makes one.
        accounts.check_within(_principal(request), "create", **first)
        user = await asyncio.to_thread(accounts.create_user, name, plan)
        record, key = await asyncio.to_thread(
            accounts.create_key, name, name="first key", scopes=("invoke", "manage")
        )
        return JSONResponse(
            {"name": user.name, "plan": user.plan, "key": key, "key_id": record.id}, 201
        )

    def _path_taken(self, name: str) -> str | None:
        """Whether /<name>/... already belongs to a deployment or an API of the admin."""
        for dep in self.server.store.list_deployments():
            if dep.name == name:
                return "the name of a deployment"
        for served in self.server.registry.all_unfiltered():
            if served.api.endpoint.strip("/").split("/")[0] == name:
                return f"the first part of API '{served.name}''s path ({served.api.endpoint})"
        return None

    async def delete_user(self, request: Request) -> Response:
        accounts = self._admin(request)
        name = request.path_params["name"]
        manager = self.server.deployments
        apis = [a for a, d in list(manager.owner.items()) if d.startswith(f"{name}.")]
        await asyncio.to_thread(accounts.delete_user, name)
        for api in apis:
            await manager.delete_api(api)
        return JSONResponse({"deleted": name, "apis": apis})

    # ---- keys -----------------------------------------------------------------------
    async def list_keys(self, request: Request) -> Response:
        accounts = self.accounts
        principal = _principal(request)
        user = request.query_params.get("user")
        if user and not principal.is_admin and user != principal.user:
            raise Forbidden("you can list your own keys only")
        if not principal.is_admin or user:
            wanted = user or principal.user
            keys = [k for k in accounts.keys.values() if k.user == wanted]
        else:
            keys = list(accounts.keys.values())
        usage = self.server.quotas.by_key
        return JSONResponse(
            {"keys": [{**k.public(), "calls_this_month": usage.get(k.id, 0)} for k in keys]}
        )

    async def create_key(self, request: Request) -> Response:
        accounts = self.accounts
        principal = _principal(request)
        body = await self._json(request)
        user = str(body.get("user") or principal.user)
        if user != principal.user and not principal.is_admin:
            raise Forbidden("you can create keys for yourself only")
        scope = body.get("scope", "invoke")
        scopes = ("invoke", "manage") if scope == "manage" else (scope,)
        apis = body.get("apis")
        allowed = None
        if apis:
            if not isinstance(apis, list) or not all(isinstance(a, str) for a in apis):
                raise InvalidInput("apis must be a list of API names")
            is_admin = accounts.users[user].is_admin if user in accounts.users else False
            allowed = frozenset(a if is_admin or "." in a else f"{user}.{a}" for a in apis)
        expires_at = None
        if body.get("expires"):
            from kiln.quantities import parse_duration

            text = str(body["expires"]).strip()
            try:
                if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
                    seconds = float(text[:-1]) * 86400  # days, as `kiln keys create` says
                else:
                    seconds = parse_duration(text)
                expires_at = accounts._clock() + seconds
            except ValueError as exc:
                raise InvalidInput(f"expires: {exc}; use e.g. 30d or 12h") from None
        record, key = await asyncio.to_thread(
            accounts.create_key,
            user,
            name=str(body.get("name") or ""),
            scopes=scopes,
            apis=allowed,
            expires_at=expires_at,
            quota=_int_or_none(body.get("quota"), "quota"),
            rate=_float_or_none(body.get("rate"), "rate"),
            burst=_int_or_none(body.get("burst"), "burst"),
            creator=principal,  # no broader than the key asking (403 naming how)
        )
        return JSONResponse({**record.public(), "key": key}, 201)

    async def delete_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        await asyncio.to_thread(self.accounts.delete_key, _principal(request), key_id)
        return JSONResponse({"deleted": key_id})

    async def disable_key(self, request: Request) -> Response:
        return await self._status(request, "disabled")

    async def enable_key(self, request: Request) -> Response:
        return await self._status(request, "active")

    async def _status(self, request: Request, status: str) -> Response:
        record = await asyncio.to_thread(
            self.accounts.set_status, _principal(request), request.path_params["key_id"], status
        )
        return JSONResponse(record.public())

    async def rotate_key(self, request: Request) -> Response:
        record, key = await asyncio.to_thread(
            self.accounts.rotate, _principal(request), request.path_params["key_id"]
        )
        return JSONResponse(
            {**record.public(), "key": key, "replaces": request.path_params["key_id"]}
        )

    # ---- usage ----------------------------------------------------------------------
    async def usage(self, request: Request) -> Response:
        self.accounts  # noqa: B018 - refuses when auth is off
        principal = _principal(request)
        user = request.query_params.get("user")
        if not principal.is_admin:
            if user and user != principal.user:
                raise Forbidden("you can see your own usage only")
            user = principal.user
        start, end, label = _month(request.query_params.get("month"))
        await asyncio.to_thread(self.server.quotas.flush)
        rows = await asyncio.to_thread(
            self.server.store.key_usage, since=start, until=end, user=user
        )
        merged: dict[tuple[str, str, str, str], dict[str, int]] = defaultdict(dict)
        for row in rows:
            counts = merged[(row.user, row.key_id, row.api, row.version)]
            counts[row.status_class] = counts.get(row.status_class, 0) + row.count
        out = [
            {
                "user": u,
                "key_id": k,
                "api": a,
                "version": v or None,
                "by_status": counts,
                "calls": sum(counts.values()),
            }
            for (u, k, a, v), counts in sorted(merged.items())
        ]
        days: dict[str, dict[str, int]] = defaultdict(dict)
        for row in rows:
            day = dt.datetime.fromtimestamp(row.period_start, dt.UTC).strftime("%Y-%m-%d")
            days[day][row.status_class] = days[day].get(row.status_class, 0) + row.count
        return JSONResponse(
            {
                "month": label,
                "usage": out,
                "total": sum(r["calls"] for r in out),
                "days": [
                    {"date": d, "by_status": c, "calls": sum(c.values())}
                    for d, c in sorted(days.items())
                ],
                "keys": self._key_limits(user),
                "plan": self._plan_limits(user),
            }
        )

    def _key_limits(self, user: str | None) -> list[dict[str, Any]]:
        """Each key's calls this month, quota left (its own and its user's plan's, the
        smaller) and 429s refused by a quota or rate limit: `kiln usage` and the console."""
        quotas, accounts = self.server.quotas, self.accounts
        out = []
        for key in sorted(accounts.keys.values(), key=lambda k: (k.user, k.id)):
            if user is not None and key.user != user:
                continue
            owner = accounts.users.get(key.user)
            plan = None if owner is None or owner.is_admin else quotas.plan_of(key.user)
            lefts = []
            if key.quota is not None:
                lefts.append(key.quota - quotas.by_key.get(key.id, 0))
            if plan is not None and plan.calls_per_month is not None:
                lefts.append(plan.calls_per_month - quotas.by_user.get(key.user, 0))
            out.append(
                {
                    "key_id": key.id,
                    "user": key.user,
                    "name": key.name,
                    "status": key.status,
                    "calls_this_month": quotas.by_key.get(key.id, 0),
                    "quota": key.quota,
                    "quota_left": max(0, min(lefts)) if lefts else None,
                    "rate": key.rate,
                    "burst": key.burst,
                    "refused_429": quotas.refused_by_key.get(key.id, 0),
                }
            )
        return out

    def _plan_limits(self, user: str | None) -> dict[str, Any] | None:
        """The plan of the user whose usage this is (None: the admin's view of everyone)."""
        quotas = self.server.quotas
        owner = self.accounts.users.get(user) if user else None
        if owner is None or owner.is_admin:
            return None
        plan = quotas.plan_of(owner.name)
        used = quotas.by_user.get(owner.name, 0)
        return {
            "user": owner.name,
            "name": plan.name,
            "apis": plan.apis,
            "calls_per_month": plan.calls_per_month,
            "calls_this_month": used,
            "calls_left": (
                None if plan.calls_per_month is None else max(0, plan.calls_per_month - used)
            ),
            "max_replicas": plan.max_replicas,
            "max_replica_mem": plan.max_replica_mem,
            "max_upload_bytes": plan.max_upload_bytes,
            "max_unpacked_bytes": plan.max_unpacked_bytes,
            "network_egress": plan.network_egress,
        }


def _month(text: str | None) -> tuple[float, float, str]:
    from kiln.control.quotas import month_bounds

    if not text:
        start, end = month_bounds(dt.datetime.now(dt.UTC).timestamp())
    else:
        try:
            first = dt.datetime.strptime(text, "%Y-%m").replace(tzinfo=dt.UTC)
        except ValueError:
            raise InvalidInput(f"month must look like 2026-11, not {text!r}") from None
        start, end = month_bounds(first.timestamp())
    return start, end, dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m")


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{what} must be a whole number, got {value!r}")
    return value


def _float_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidInput(f"{what} must be a positive number, got {value!r}")
    return float(value)
