"""Users, API keys and metered usage per key: the store side of issue 6's accounts.

`key_usage` is the billing record: one row per (user, key id, API, version, UTC
day, status class) with a count, only ever incremented (see `docs/config.md`,
"Usage records"). Quota counters are rebuilt from it at start, which is why a
restart never double-counts: the server adds only deltas it has not written yet.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import schema as t
from .base import StoreBase
from .counters import USAGE_PERIOD_S, _add_counts, bucket_start

_U, _K, _KU = t.users.c, t.api_keys.c, t.key_usage.c

# The records the store hands back live here, below kiln.control.accounts (which
# re-exports them), so the store never imports the control plane above it.
KEY_PREFIX = "kiln_"


@dataclass(frozen=True)
class KeyRecord:
    id: str
    user: str
    name: str
    hash: str
    scopes: frozenset[str]
    apis: frozenset[str] | None  # internal API names; None: every API of the user
    status: str = "active"  # active | disabled
    created_at: float = 0.0
    expires_at: float | None = None
    last_used_at: float | None = None
    quota: int | None = None  # calls per calendar month, on top of the user's plan
    rate: float | None = None  # requests per second (token bucket)
    burst: int | None = None

    @property
    def prefix(self) -> str:
        return f"{KEY_PREFIX}{self.id}_"

    def public(self) -> dict[str, Any]:
        """What `kiln keys list` shows: never the hash, never the secret."""
        return {
            "id": self.id,
            "user": self.user,
            "name": self.name,
            "prefix": self.prefix + "…",
            "scopes": sorted(self.scopes),
            "apis": sorted(self.apis) if self.apis is not None else None,
            "status": self.status,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "last_used_at": self.last_used_at,
            "quota": self.quota,
            "rate": self.rate,
            "burst": self.burst,
        }


@dataclass(frozen=True)
class User:
    name: str
    plan: str
    is_admin: bool = False
    created_at: float = 0.0


@dataclass(frozen=True)
class KeyUsage:
    """Metered calls of one key on one API version and UTC day, by status class."""

    user: str
    key_id: str
    api: str
    version: str
    period_start: int
    status_class: str
    count: int


@dataclass(frozen=True)
class KeyUsageIncrement:
    user: str
    key_id: str
    api: str
    status_class: str
    count: int = 1
    version: str = ""
    at: float | None = None


def _split(text: str | None) -> frozenset[str] | None:
    return frozenset(p for p in text.split(",") if p) if text is not None else None


class AccountsMixin(StoreBase):
    """Users, keys and per-key usage."""

    # ---- users ----------------------------------------------------------------------
    def create_user(self, name: str, *, plan: str, is_admin: bool = False) -> Any:
        now = self._now(None)
        with self._write() as conn:
            conn.execute(
                t.users.insert().values(name=name, plan=plan, is_admin=is_admin, created_at=now)
            )
        return User(name, plan, is_admin, now)

    def list_users(self) -> list[Any]:
        with self._read() as conn:
            rows = conn.execute(sa.select(t.users).order_by(_U.name)).all()
        return [User(r.name, r.plan, bool(r.is_admin), r.created_at) for r in rows]

    def delete_user(self, name: str) -> bool:
        """Delete a user and their keys (usage history stays: it is what a bill reads)."""
        with self._write() as conn:
            conn.execute(t.api_keys.delete().where(_K.user_name == name))
            return conn.execute(t.users.delete().where(_U.name == name)).rowcount > 0

    # ---- keys -----------------------------------------------------------------------
    def create_key(self, record: Any) -> None:
        with self._write() as conn:
            conn.execute(
                t.api_keys.insert().values(
                    id=record.id,
                    user_name=record.user,
                    name=record.name,
                    hash=record.hash,
                    scopes=",".join(sorted(record.scopes)),
                    apis=",".join(sorted(record.apis)) if record.apis is not None else None,
                    status=record.status,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    last_used_at=None,
                    quota=record.quota,
                    rate=record.rate,
                    burst=record.burst,
                )
            )

    def list_keys(self, user: str | None = None) -> list[Any]:
        query = sa.select(t.api_keys).order_by(_K.created_at)
        if user is not None:
            query = query.where(_K.user_name == user)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            KeyRecord(
                id=r.id,
                user=r.user_name,
                name=r.name,
                hash=r.hash,
                scopes=_split(r.scopes) or frozenset(),
                apis=_split(r.apis),
                status=r.status,
                created_at=r.created_at,
                expires_at=r.expires_at,
                last_used_at=r.last_used_at,
                quota=r.quota,
                rate=r.rate,
                burst=r.burst,
            )
            for r in rows
        ]

    def update_key(self, key_id: str, **values: Any) -> bool:
        with self._write() as conn:
            return (
                conn.execute(t.api_keys.update().where(_K.id == key_id).values(**values)).rowcount
                > 0
            )

    def delete_key(self, key_id: str) -> bool:
        with self._write() as conn:
            return conn.execute(t.api_keys.delete().where(_K.id == key_id)).rowcount > 0

    def touch_keys(self, last_used: Mapping[str, float]) -> None:
        with self._write() as conn:
            for key_id, at in last_used.items():
                conn.execute(t.api_keys.update().where(_K.id == key_id).values(last_used_at=at))

    # ---- metered usage --------------------------------------------------------------
    def add_key_usage_many(self, increments: Iterable[KeyUsageIncrement]) -> None:
        merged: dict[tuple[str, str, str, str, int, str], int] = defaultdict(int)
        for inc in increments:
            day = bucket_start(self._now(inc.at), USAGE_PERIOD_S)
            merged[(inc.user, inc.key_id, inc.api, inc.version, day, inc.status_class)] += inc.count
        rows = [
            {
                "user_name": u,
                "key_id": k,
                "api": a,
                "version": v,
                "period_start": p,
                "status_class": s,
                "count": n,
            }
            for (u, k, a, v, p, s), n in merged.items()
            if n
        ]
        with self._write() as conn:
            _add_counts(conn, t.key_usage, rows, ["count"])

    def key_usage(
        self, *, since: float | None = None, until: float | None = None, user: str | None = None
    ) -> list[KeyUsage]:
        """Per-key usage rows over [since, until), oldest first."""
        query = sa.select(t.key_usage)
        if since is not None:
            query = query.where(_KU.period_start >= bucket_start(since, USAGE_PERIOD_S))
        if until is not None:
            query = query.where(_KU.period_start < until)
        if user is not None:
            query = query.where(_KU.user_name == user)
        query = query.order_by(_KU.period_start, _KU.user_name, _KU.key_id, _KU.api)
        with self._read() as conn:
            return [
                KeyUsage(
                    r.user_name,
                    r.key_id,
                    r.api,
                    r.version,
                    r.period_start,
                    r.status_class,
                    r._mapping["count"],  # `r.count` is also the tuple method, to a type checker
                )
                for r in conn.execute(query)
            ]

    def calls_since(self, since: float) -> tuple[dict[str, int], dict[str, int]]:
        """(calls per user, calls per key) since `since` (a period start): the quota counters."""
        start = bucket_start(since, USAGE_PERIOD_S)
        by_user = sa.select(_KU.user_name, sa.func.sum(_KU.count)).where(_KU.period_start >= start)
        by_key = sa.select(_KU.key_id, sa.func.sum(_KU.count)).where(_KU.period_start >= start)
        with self._read() as conn:
            users = {u: int(n) for u, n in conn.execute(by_user.group_by(_KU.user_name))}
            keys = {k: int(n) for k, n in conn.execute(by_key.group_by(_KU.key_id))}
        return users, keys
