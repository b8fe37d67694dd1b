"""AsyncAPI requests (issue 19): a durable queue whose rows keep their result.

One table, `async_requests`, holds each accepted request from submission until
its result expires. The delivery rules are the Batch API queue's (jobs.py):

- a row is claimable while `status` is in_queue, or in_progress with a lapsed
  lease (`visible_at <= now`): claiming stamps a fresh `lease` token, sets
  `visible_at = now + lease_s` and bumps `receive_count`; the runner extends
  the lease while the request runs, so a server killed mid-request leaves a
  row that is delivered again (at least once);
- only the holder of the current lease may finish the row, and finishing writes
  the status and the result in the same transaction, so a request completes
  exactly once whatever happened to earlier deliveries;
- a row delivered `max_receive_count` times without finishing fails with that
  reason instead of running again (a request that kills its server each time).

Results are kept until `expires_at` (finish time + the API's `result_ttl`) and
pruned after; an expired row reads as missing even before the prune. Webhook
delivery is tracked on the row (`webhook_state`) so a restart delivers the
completions a killed server had not yet announced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as t
from .base import StoreBase

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED = "in_queue", "in_progress", "completed", "failed"
MAX_RECEIVE_COUNT = 3


# The live definition (schema.py's convention, kept here beside its queries: a change is
# a new step in migrations.py AND an edit here, never one without the other).
C = sa.Column
async_requests = sa.Table(
    "async_requests",
    t.metadata,
    C("id", sa.String(64), primary_key=True),
    C("api", sa.String(128), nullable=False),
    C("version", sa.String(63), nullable=False),  # "": the API's default at run time
    C("status", sa.String(16), nullable=False),
    C("body", sa.LargeBinary, nullable=False),
    C("content_type", sa.String(255), nullable=False),
    C("created_at", sa.Double, nullable=False),
    C("updated_at", sa.Double, nullable=False),
    C("visible_at", sa.Double, nullable=False),
    C("lease", sa.String(32), nullable=True),
    C("receive_count", sa.Integer, nullable=False),
    C("result_ttl", sa.Double, nullable=False),
    C("expires_at", sa.Double, nullable=True),
    C("result", sa.LargeBinary, nullable=True),
    C("result_type", sa.String(255), nullable=True),
    C("error", sa.Text, nullable=True),
    C("webhook", sa.Text, nullable=True),
    C("webhook_state", sa.String(16), nullable=True),  # pending sending sent refused failed
    C("webhook_error", sa.Text, nullable=True),
    sa.Index("ix_async_requests_visible", "status", "visible_at"),
    sa.Index("ix_async_requests_expires", "expires_at"),
)
_Q = async_requests.c


@dataclass(frozen=True)
class AsyncItem:
    """One request as the runner claims it."""

    id: str
    api: str
    version: str
    body: bytes
    content_type: str
    lease: str
    receive_count: int


@dataclass(frozen=True)
class AsyncRecord:
    """One request as `GET {endpoint}/{id}` reads it."""

    id: str
    api: str
    status: str
    created_at: float
    updated_at: float
    result: bytes | None
    result_type: str | None
    error: str | None
    webhook_state: str | None
    webhook_error: str | None


@dataclass(frozen=True)
class AsyncHook:
    """A finished request whose webhook is still to be called."""

    id: str
    api: str
    status: str
    updated_at: float
    webhook: str
    result: bytes | None
    result_type: str | None
    error: str | None


class AsyncQueueMixin(StoreBase):
    """Submit, claim, extend, finish, read and prune AsyncAPI requests."""

    def async_submit(
        self,
        request_id: str,
        api: str,
        version: str | None,
        body: bytes,
        content_type: str,
        *,
        result_ttl: float,
        webhook: str | None,
        at: float | None = None,
    ) -> None:
        """Accept one request: committed before the caller gets its 202."""
        now = self._now(at)
        with self._write() as conn:
            conn.execute(
                async_requests.insert().values(
                    id=request_id,
                    api=api,
                    version=version or "",
                    status=IN_QUEUE,
                    body=body,
                    content_type=content_type,
                    created_at=now,
                    updated_at=now,
                    visible_at=now,
                    receive_count=0,
                    result_ttl=result_ttl,
                    webhook=webhook,
                )
            )

    def async_claim(
        self, apis: list[str], lease_s: float, *, at: float | None = None
    ) -> AsyncItem | None:
        """The oldest claimable request of one of `apis`, under a fresh lease (None: none)."""
        if not apis:
            return None
        now = self._now(at)
        with self._write() as conn:
            while True:
                row = conn.execute(
                    sa.select(_Q.id, _Q.api, _Q.version, _Q.body, _Q.content_type, _Q.receive_count)
                    .where(
                        _Q.status.in_((IN_QUEUE, IN_PROGRESS)),
                        _Q.visible_at <= now,
                        _Q.api.in_(apis),
                    )
                    .order_by(_Q.created_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if row is None:
                    return None
                if row.receive_count >= MAX_RECEIVE_COUNT:
                    self._async_end(
                        conn,
                        row.id,
                        None,
                        FAILED,
                        None,
                        None,
                        f"delivered {row.receive_count} times without finishing (the server "
                        f"stopped while it ran each time); not run again",
                        now,
                    )
                    continue
                lease = os.urandom(16).hex()
                took = conn.execute(
                    async_requests.update()
                    .where(_Q.id == row.id, _Q.visible_at <= now)
                    .values(
                        status=IN_PROGRESS,
                        lease=lease,
                        visible_at=now + lease_s,
                        receive_count=_Q.receive_count + 1,
                        updated_at=now,
                    )
                ).rowcount
                if took:
                    return AsyncItem(
                        row.id,
                        row.api,
                        row.version,
                        row.body,
                        row.content_type,
                        lease,
                        row.receive_count + 1,
                    )

    def async_depth(self, apis: list[str], *, at: float | None = None) -> dict[str, int]:
        """Requests of each of `apis` waiting to be claimed now (the autoscaler's backlog)."""
        if not apis:
            return {}
        now = self._now(at)
        with self._read() as conn:
            rows = conn.execute(
                sa.select(_Q.api, sa.func.count())
                .where(
                    _Q.status.in_((IN_QUEUE, IN_PROGRESS)),
                    _Q.visible_at <= now,
                    _Q.api.in_(apis),
                )
                .group_by(_Q.api)
            ).all()
        depth = dict.fromkeys(apis, 0)
        depth.update({api: int(count) for api, count in rows})
        return depth

    def async_extend(self, item: AsyncItem, seconds: float, *, at: float | None = None) -> bool:
        """Keep a running request invisible (the runner's heartbeat)."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    async_requests.update()
                    .where(_Q.id == item.id, _Q.lease == item.lease)
                    .values(visible_at=self._now(at) + seconds)
                ).rowcount
            )

    def async_release(self, item: AsyncItem, delay_s: float, *, at: float | None = None) -> None:
        """Put a claimed request back (its API could not take it now), not counting
        this delivery."""
        now = self._now(at)
        with self._write() as conn:
            conn.execute(
                async_requests.update()
                .where(_Q.id == item.id, _Q.lease == item.lease)
                .values(
                    status=IN_QUEUE,
                    lease=None,
                    visible_at=now + delay_s,
                    receive_count=_Q.receive_count - 1,
                )
            )

    def async_requeue_running(self, apis: list[str], *, at: float | None = None) -> int:
        """At start: requests a stopped server was running are claimable at once, and
        webhooks it was calling are pending again (the one server holding the home's lock
        is the only runner)."""
        if not apis:
            return 0
        now = self._now(at)
        with self._write() as conn:
            conn.execute(  # a webhook a killed server was calling: called again
                async_requests.update()
                .where(_Q.webhook_state == "sending", _Q.api.in_(apis))
                .values(webhook_state="pending")
            )
            return int(
                conn.execute(
                    async_requests.update()
                    .where(_Q.status == IN_PROGRESS, _Q.api.in_(apis))
                    .values(visible_at=now, lease=None)
                ).rowcount
            )

    def async_finish(
        self,
        item: AsyncItem,
        status: str,
        result: bytes | None,
        result_type: str | None,
        error: str | None,
        *,
        at: float | None = None,
    ) -> bool:
        """Record the outcome once; False when the lease was lost (someone else decides)."""
        with self._write() as conn:
            return self._async_end(
                conn, item.id, item.lease, status, result, result_type, error, self._now(at)
            )

    def async_get(self, request_id: str, *, at: float | None = None) -> AsyncRecord | None:
        """One request (None: unknown, or its result expired)."""
        now = self._now(at)
        with self._read() as conn:
            r = conn.execute(sa.select(async_requests).where(_Q.id == request_id)).first()
        if r is None or (r.expires_at is not None and r.expires_at <= now):
            return None
        status = IN_QUEUE if r.status == IN_PROGRESS and r.visible_at <= now else r.status
        return AsyncRecord(
            r.id,
            r.api,
            status,
            r.created_at,
            r.updated_at,
            r.result,
            r.result_type,
            r.error,
            r.webhook_state,
            r.webhook_error,
        )

    def async_hooks_pending(self, apis: list[str], *, limit: int = 32) -> list[str]:
        """Finished requests whose webhook has not been called yet (their ids)."""
        if not apis:
            return []
        with self._read() as conn:
            rows = conn.execute(
                sa.select(_Q.id)
                .where(_Q.webhook_state == "pending", _Q.api.in_(apis))
                .order_by(_Q.updated_at)
                .limit(limit)
            )
            return [r.id for r in rows]

    def async_hook_take(self, request_id: str) -> AsyncHook | None:
        """Take the right to call one request's webhook (pending -> sending): of two
        callers, one gets it. None: nothing to call, or already taken."""
        with self._write() as conn:
            took = conn.execute(
                async_requests.update()
                .where(_Q.id == request_id, _Q.webhook_state == "pending")
                .values(webhook_state="sending")
            ).rowcount
            if not took:
                return None
            r = conn.execute(sa.select(async_requests).where(_Q.id == request_id)).one()
            return AsyncHook(
                r.id, r.api, r.status, r.updated_at, r.webhook, r.result, r.result_type, r.error
            )

    def async_hook_done(self, request_id: str, state: str, error: str | None = None) -> bool:
        """Mark a taken webhook called (`sent`), refused or failed."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    async_requests.update()
                    .where(_Q.id == request_id, _Q.webhook_state == "sending")
                    .values(webhook_state=state, webhook_error=error)
                ).rowcount
            )

    def async_prune(self, *, at: float | None = None) -> int:
        """Delete requests whose result has expired; how many went."""
        now = self._now(at)
        with self._write() as conn:
            return int(conn.execute(async_requests.delete().where(_Q.expires_at <= now)).rowcount)

    def _async_end(
        self,
        conn: Connection,
        request_id: str,
        lease: str | None,
        status: str,
        result: bytes | None,
        result_type: str | None,
        error: str | None,
        now: float,
    ) -> bool:
        where = [_Q.id == request_id, _Q.status.in_((IN_QUEUE, IN_PROGRESS))]
        if lease is not None:
            where.append(_Q.lease == lease)
        return bool(
            conn.execute(
                async_requests.update()
                .where(*where)
                .values(
                    status=status,
                    result=result,
                    result_type=result_type,
                    error=error,
                    lease=None,
                    updated_at=now,
                    expires_at=now + _Q.result_ttl,
                    webhook_state=sa.case((_Q.webhook.is_not(None), "pending"), else_=None),
                )
            ).rowcount
        )
