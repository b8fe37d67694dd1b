"""Users, API keys and who is calling: the Hub API's accounts, secure by default.

Keys look like `kiln_<id>_<secret>`: the id (public, shown by `kiln keys list`)
finds the record, the secret is 32 random bytes. Only SHA-256 of the whole key
is stored; a fast hash is right here because the key is high-entropy (nothing
to brute-force), and the comparison is constant-time. The server keeps every
key record in memory (re-read from the store every second, and at once after a
change made through this process), so checking a key costs one dict lookup and
one hash, and a disabled or deleted key stops working within a second.

A `Principal` is the authenticated caller. Users' APIs are named
`<user>.<api>` inside the server (served at `/<user>/<api>`), so a principal
sees an API when its name is in the user's namespace (the admin sees every
API) and, for a key scoped to some APIs, when it is one of them. The registry
filters every lookup through `Principal.sees`, which is how another user's API
answers exactly like one that does not exist.

A key never makes a broader one: a key created, rotated or enabled through a
principal must be at most as broad as the principal's own key in every limit
(scopes, APIs, expiry, monthly quota, rate and burst; `broader_than`), so a
key handed out with `--apis`, `--expires` or `--quota` cannot mint its way out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.control.store.accounts import KEY_PREFIX, KeyRecord, User
from kiln.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized

ADMIN = "admin"
SCOPES = ("invoke", "manage")
RELOAD_S = 1.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (see the module docstring)."""

    user: str
    is_admin: bool
    key_id: str
    scopes: frozenset[str]
    apis: frozenset[str] | None = None
    sees_all: bool = field(init=False)
    scope_key: Any = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sees_all", self.is_admin and self.apis is None)
        object.__setattr__(self, "scope_key", (self.user, self.is_admin, self.apis))

    def sees(self, name: str) -> bool:
        if self.apis is not None and name not in self.apis:
            return False
        return self.is_admin or name.startswith(f"{self.user}.")

    def owns(self, name: str) -> bool:
        """May change (deploy over, delete) this API: the admin, or its namespace's user."""
        return self.is_admin or name.startswith(f"{self.user}.")


def broader_than(record: KeyRecord | None, **asked: Any) -> list[str]:
    """How a key with the `asked` settings would be broader than `record` (empty: it is not).

    `asked` holds KeyRecord fields: scopes, apis, expires_at, quota, rate, burst. None
    means "no limit", which is broader than any limit. Each entry names the setting
    and the bound, for the 403 a client sees.
    """
    if record is None:
        return []
    out: list[str] = []
    scopes = frozenset(asked.get("scopes") or ())
    if not scopes <= _with_implied(record.scopes):
        extra = ", ".join(sorted(scopes - _with_implied(record.scopes)))
        out.append(f"scope {extra} (this key has {', '.join(sorted(record.scopes))})")
    apis = asked.get("apis")
    if record.apis is not None and (apis is None or not apis <= record.apis):
        wanted = "every API" if apis is None else ", ".join(sorted(apis - record.apis))
        out.append(f"APIs: {wanted} (this key may use {', '.join(sorted(record.apis))} only)")
    for name, flag, text in (
        ("expires_at", "--expires", "expiry"),
        ("quota", "--quota", "quota"),
        ("rate", "--rate", "rate"),
        ("burst", "--burst", "burst"),
    ):
        bound = getattr(record, name)
        value = asked.get(name)
        if bound is None:
            continue
        if value is None:
            out.append(f"{text}: none (this key's {text} is {_shown(name, bound)}; pass {flag})")
        elif value > bound:
            out.append(f"{text}: {_shown(name, value)} (this key's is {_shown(name, bound)})")
    return out


def _with_implied(scopes: frozenset[str]) -> frozenset[str]:
    return scopes | {"invoke"} if "manage" in scopes else scopes


def _shown(name: str, value: float) -> str:
    if name == "expires_at":
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return f"{value:g}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(id, full key)."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return given_key_id(key)
    parts = key[len(KEY_PREFIX) :].split("_", 1)
    return parts[0] if len(parts) == 2 and parts[0] else None


def given_key_id(key: str) -> str:
    """The id of a key chosen outside Kiln ($KILN_API_KEY): "x" (never a hex digit, so
    never a generated id) and 7 hex digits of its hash."""
    return "x" + hashlib.sha256(key.encode()).hexdigest()[:7]


class Accounts:
    """The server's view of users and keys: authenticate, create, change, delete."""

    def __init__(self, store: Any, clock: Any = time.time) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        # Reads of the store and the swap happen as one step, so the 1 s background
        # reload can never put back a view older than a change's own reload.
        self._reload_lock = threading.Lock()
        self.keys: dict[str, KeyRecord] = {}
        self.users: dict[str, User] = {}
        self._last_used: dict[str, float] = {}
        self.reload()

    # ---- cache ----------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read users and keys from the store (every second, and after each change)."""
        with self._reload_lock:
            keys = {k.id: k for k in self.store.list_keys()}
            users = {u.name: u for u in self.store.list_users()}
            with self._lock:
                self.keys, self.users = keys, users

    def flush_last_used(self) -> None:
        with self._lock:
            pending, self._last_used = self._last_used, {}
        if pending:
            self.store.touch_keys(pending)

    # ---- authentication -------------------------------------------------------------
    def authenticate(self, key: str | None) -> Principal:
        """The principal for a presented key; 401 unknown or missing, 403 unusable."""
        if not key:
            raise Unauthorized(
                "this server needs an API key: send it as `x-api-key: <key>` or "
                "`Authorization: Bearer <key>` (create one with `kiln keys create`)"
            )
        key_id = key_id_of(key)
        record = self.keys.get(key_id) if key_id else None
        if record is None or not hmac.compare_digest(record.hash, hash_key(key)):
            raise Unauthorized("the API key is not valid; check it, or create a new one")
        if record.status != "active":
            raise Forbidden(
                f"API key {record.id} is disabled; enable it with `kiln keys enable "
                f"{record.id}` or use another key"
            )
        now = self._clock()
        if record.expires_at is not None and now >= record.expires_at:
            raise Forbidden(f"API key {record.id} has expired; create a new one")
        user = self.users.get(record.user)
        if user is None:
            raise Unauthorized("the API key is not valid; check it, or create a new one")
        self._last_used[record.id] = now
        return Principal(record.user, user.is_admin, record.id, record.scopes, record.apis)

    # ---- users ----------------------------------------------------------------------
    def ensure_admin(self) -> str | None:
        """Create the admin user and its key on first start; returns the new key, if any."""
        if ADMIN in self.users:
            return None
        self.store.create_user(ADMIN, plan="unlimited", is_admin=True)
        self.reload()
        return self.create_key(ADMIN, name="admin (created at first start)", scopes=SCOPES)[1]

    def ensure_admin_key(self, key: str) -> None:
        """The admin (created if missing) has exactly this key among its given keys: a
        key chosen outside Kiln (kiln serve --auth with $KILN_API_KEY, as in an image)."""
        if ADMIN not in self.users:
            self.store.create_user(ADMIN, plan="unlimited", is_admin=True)
            self.reload()
        key_id = key_id_of(key) or given_key_id(key)
        existing = self.keys.get(key_id)
        if existing is not None and hmac.compare_digest(existing.hash, hash_key(key)):
            return
        if existing is not None:
            self.store.delete_key(key_id)
        record = KeyRecord(
            id=key_id,
            user=ADMIN,
            name="admin (from $KILN_API_KEY)",
            hash=hash_key(key),
            scopes=frozenset(SCOPES),
            apis=None,
            created_at=self._clock(),
        )
        self.store.create_key(record)
        self.reload()

    def create_user(self, name: str, plan: str) -> User:
        if name in self.users:
            raise Conflict(f"a user named '{name}' already exists")
        user = self.store.create_user(name, plan=plan, is_admin=False)
        self.reload()
        return user

    def delete_user(self, name: str) -> None:
        if name == ADMIN:
            raise InvalidInput("the admin user cannot be deleted")
        if name not in self.users:
            raise NotFound(f"no user named '{name}'")
        self.store.delete_user(name)
        self.reload()

    # ---- keys -----------------------------------------------------------------------
    def create_key(
        self,
        user: str,
        *,
        name: str = "",
        scopes: tuple[str, ...] | frozenset[str] = ("invoke",),
        apis: frozenset[str] | None = None,
        expires_at: float | None = None,
        quota: int | None = None,
        rate: float | None = None,
        burst: int | None = None,
        creator: Principal | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key for `user`: (record, the key itself, shown once).

        `creator`, the principal asking, when a key asks (not the server itself): the
        new key may be no broader than the creator's own key (403 naming how it is).
        """
        if user not in self.users:
            raise NotFound(f"no user named '{user}'")
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise InvalidInput(f"scope must be invoke or manage, not {', '.join(unknown)}")
        if rate is not None and rate <= 0:
            raise InvalidInput("rate must be a positive number of requests per second")
        burst = burst if burst is not None else (max(1, int(rate)) if rate else None)
        self.check_within(
            creator,
            "create",
            scopes=frozenset(scopes),
            apis=apis,
            expires_at=expires_at,
            quota=quota,
            rate=rate,
            burst=burst,
        )
        key_id, key = new_key()
        record = KeyRecord(
            id=key_id,
            user=user,
            name=name,
            hash=hash_key(key),
            scopes=frozenset(scopes),
            apis=apis,
            created_at=self._clock(),
            expires_at=expires_at,
            quota=quota,
            rate=rate,
            burst=burst,
        )
        self.store.create_key(record)
        self.reload()
        return record, key

    def check_within(self, creator: Principal | None, action: str, **asked: Any) -> None:
        """403 when a key with the `asked` settings would be broader than `creator`'s key."""
        if creator is None:
            return
        own = self.keys.get(creator.key_id)
        if own is None:  # its key was deleted a moment ago: it makes nothing
            raise Unauthorized("the API key is not valid; check it, or create a new one")
        broader = broader_than(own, **asked)
        if broader:
            raise Forbidden(
                f"API key {own.id} cannot {action} a key broader than itself: "
                + "; ".join(broader)
                + ". Ask for a key within those limits, or use a key that has them"
            )

    def key_for(self, principal: Principal, key_id: str) -> KeyRecord:
        record = self.keys.get(key_id)
        if record is None or not (principal.is_admin or record.user == principal.user):
            raise NotFound(f"no API key with id '{key_id}'; `kiln keys list` shows yours")
        return record

    def set_status(self, principal: Principal, key_id: str, status: str) -> KeyRecord:
        record = self.key_for(principal, key_id)
        if status == "active" and record.id != principal.key_id:
            self.check_within(principal, "enable", **_limits(record))
        self.store.update_key(record.id, status=status)
        self.reload()
        return self.keys[record.id]

    def delete_key(self, principal: Principal, key_id: str) -> None:
        record = self.key_for(principal, key_id)
        self.store.delete_key(record.id)
        self.reload()

    def rotate(self, principal: Principal, key_id: str) -> tuple[KeyRecord, str]:
        """A new key with the same settings; the old one stops working at once."""
        old = self.key_for(principal, key_id)
        self.check_within(principal, "rotate", **_limits(old))
        record, key = self.create_key(old.user, name=old.name, **_limits(old))
        self.store.delete_key(old.id)
        self.reload()
        return record, key


def _limits(record: KeyRecord) -> dict[str, Any]:
    """A key's settings that `broader_than` compares (and `rotate` copies)."""
    return {
        "scopes": record.scopes,
        "apis": record.apis,
        "expires_at": record.expires_at,
        "quota": record.quota,
        "rate": record.rate,
        "burst": record.burst,
    }
