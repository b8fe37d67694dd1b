"""AsyncAPIs (issue 19, Cortex's `kind: AsyncAPI`): accept now, run from the queue, keep results.

```
POST {endpoint} -> protocols/async_api.py (admit once, read the body)
   -> AsyncManager.submit -> store.async_submit (committed) -> 202 {"id"}
runner (one asyncio task in the server):
   store.async_claim (lease) -> DataPlane.predict on the API's own replicas
   (the same handlers and runtimes as its realtime route; never admitted again)
   -> store.async_finish (status + result, once) -> webhook (once, checked target)
GET {endpoint}/{id} -> store.async_get -> {"id", "status", "result"|"error", "timestamp"}
```

The queue is the state store's `async_requests` table (store/async_queue.py), with
the Batch API queue's lease rules: a server killed mid-request leaves rows that
are claimable again when it restarts (at least once for what was running; what
was only queued runs once). An AsyncAPI is in the registry like any realtime API
(its replicas, autoscaling, `kiln get`); the adapter claims its endpoint before
the native one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from kiln.control import webhooks
from kiln.control.store.async_queue import COMPLETED, FAILED, AsyncHook, AsyncItem, AsyncRecord
from kiln.errors import KilnError, Unavailable
from kiln.serving.router import Registry, ServedApi
from kiln.serving.types import InferenceRequest

KIND = "AsyncAPI"
LEASE_S = 30.0  # a running request's lease; extended every third of it
CONCURRENCY = 64  # requests the runner has in flight, over every AsyncAPI
PER_REPLICA = 8  # in flight per replica of one AsyncAPI (at least one replica's worth)
DEPTH_EVERY_S = 1.0  # how often the queue depth is read for the autoscaler
IDLE_POLL_S = 0.5  # how often an idle runner looks at the queue (a submission wakes it)
RETRY_S = 2.0  # an API that cannot take a request now (503) gets it back after this
PRUNE_EVERY_S = 2.0
HOOK_SCAN_EVERY_S = 30.0  # webhooks a stopped server had not called


class AsyncManager:
    """Every AsyncAPI of one server: its endpoints, submissions, the runner, webhooks."""

    def __init__(
        self, store: Any, registry: Registry, log: Any, webhook_allow: list[str] | None = None
    ) -> None:
        self.store = store
        self.registry = registry
        self.log = log
        self.allow = webhooks.parse_allow(webhook_allow or [])
        self.plane: Any = None  # kiln.serving.data_plane.DataPlane, bound by the adapter
        # endpoint (no trailing /) -> API name; updated in place when the registry changes,
        # so the adapter's one reference to it is always current.
        self.endpoints: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = {}  # API name -> requests the runner holds
        self._turn = 0  # round-robin start over the APIs, so no API starves another
        self._closing = False
        registry.listeners.append(self.refresh)
        self.refresh()

    # ----- routes ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the endpoint table from the registry (a registry listener)."""
        table = {
            group.endpoint.rstrip("/") or "/": name
            for name, group in self.registry.groups.items()
            if any(s.api.kind == KIND for s in group.versions.values())
        }
        if table != self.endpoints:
            self.endpoints.clear()
            self.endpoints.update(table)

    def names(self) -> list[str]:
        return list(self.endpoints.values())

    # ----- submit and read ---------------------------------------------------------------
    async def submit(
        self, served: ServedApi, version: str | None, body: bytes, content_type: str
    ) -> str:
        """Store one request (durably, before the 202) and wake the runner; its id."""
        request_id = uuid.uuid4().hex
        block = served.api.async_  # type: ignore[attr-defined]
        await asyncio.to_thread(
            self.store.async_submit,
            request_id,
            served.name,
            version,
            body,
            content_type,
            result_ttl=float(block.result_ttl),
            webhook=block.webhook,
        )
        self._wake.set()
        return request_id

    async def get(self, name: str, request_id: str) -> dict[str, Any] | None:
        """The request's status document (None: unknown here, or its result expired)."""
        if len(request_id) > 64:
            return None
        record = await asyncio.to_thread(self.store.async_get, request_id)
        if record is None or record.api != name:
            return None
        return document(record)

    # ----- the runner --------------------------------------------------------------------
    def start(self) -> None:
        """Requeue what a stopped server was running, then run the queue."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop claiming; let running requests finish for `grace_s`, then leave the rest
        to the next start (their leases lapse, or the start requeues them)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        names = self.names()
        if names:
            await asyncio.to_thread(self.store.async_requeue_running, names)
        slots = asyncio.Semaphore(CONCURRENCY)
        next_prune = next_hooks = next_depth = 0.0
        while not self._closing:
            now = time.monotonic()
            try:
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    await asyncio.to_thread(self.store.async_prune)
                if now >= next_hooks:
                    next_hooks = now + HOOK_SCAN_EVERY_S
                    await self._pending_hooks()
                if now >= next_depth:
                    next_depth = now + DEPTH_EVERY_S
                    await self._report_depth()
                await slots.acquire()
                try:
                    item = await self._claim()
                except BaseException:
                    slots.release()
                    raise
            except Exception as exc:  # noqa: BLE001 - the store hiccuped: log, go on
                self.log.write("kiln", {"event": "async_queue_error", "error": str(exc)})
                await asyncio.sleep(IDLE_POLL_S)
                continue
            if item is None:
                slots.release()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                continue
            self._in_flight[item.api] = self._in_flight.get(item.api, 0) + 1
            task = asyncio.create_task(self._execute(item))
            self._running.add(task)
            task.add_done_callback(self._done(slots, item.api))

    def _done(self, slots: asyncio.Semaphore, api: str) -> Any:
        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._in_flight[api] = self._in_flight.get(api, 1) - 1
            slots.release()
            self._wake.set()  # the API may take another one now

        return done

    def limit(self, name: str) -> int:
        """How many of one AsyncAPI's requests the runner holds at once: PER_REPLICA per
        replica it has (one replica's worth at zero, so a request starts it), so the rest
        waits in the durable queue, where it counts as the API's backlog."""
        group = self.registry.groups.get(name)
        replicas = len(group.default.slots) if group is not None and group.versions else 0
        return PER_REPLICA * max(1, replicas)

    async def _claim(self) -> AsyncItem | None:
        """The next request, taking the APIs in turn (each below its limit), so a flood
        on one AsyncAPI never starves another."""
        names = self.names()
        if not names or self._closing:
            return None
        self._turn = (self._turn + 1) % len(names)
        for name in names[self._turn :] + names[: self._turn]:
            if self._in_flight.get(name, 0) >= self.limit(name):
                continue
            item: AsyncItem | None = await asyncio.to_thread(
                self.store.async_claim, [name], LEASE_S
            )
            if item is not None:
                return item
        return None

    async def _report_depth(self) -> None:
        """Hand each AsyncAPI's waiting requests to its live version as backlog, which the
        autoscaler counts as load (Cortex scales AsyncAPIs on their queue length)."""
        names = self.names()
        if not names:
            return
        depth: dict[str, int] = await asyncio.to_thread(self.store.async_depth, names)
        for name, waiting in depth.items():
            group = self.registry.groups.get(name)
            if group is not None and group.versions:
                group.default.backlog = waiting

    async def _execute(self, item: AsyncItem) -> None:
        try:
            await self._execute_one(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store failed: the lease lapses, it reruns
            self.log.write(
                item.api, {"event": "async_queue_error", "id": item.id, "error": str(exc)}
            )

    async def _execute_one(self, item: AsyncItem) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(item))
        try:
            outcome = await self._predict(item)
        finally:
            heartbeat.cancel()
        if outcome is None:  # the API could not take it now: back in the queue
            await asyncio.to_thread(self.store.async_release, item, RETRY_S)
            return
        status, result, result_type, error = outcome
        done = await asyncio.to_thread(
            self.store.async_finish, item, status, result, result_type, error
        )
        self.log.write(
            item.api,
            {"event": "async_request", "id": item.id, "status": status, "recorded": done},
        )
        if done:
            await self._call_hook(item.id)

    async def _predict(self, item: AsyncItem) -> tuple[str, bytes | None, str | None, str] | None:
        """(status, result, its content type, error) for a request; None: retry later."""
        plane = self.plane
        call = plane.call(None)  # admitted and metered once, at submission
        try:
            served = plane.resolve(call, item.api, item.version or None)
            request = InferenceRequest(
                api=served.name,
                version=served.version,
                request_id=item.id,
                body=item.body,
                content_type=item.content_type,
                protocol="native",
            )
            response = await plane.predict(call, served, request)
        except Unavailable:
            return None
        except KilnError as err:
            shown = plane.public_error(call, err)
            return FAILED, None, None, str(shown) or type(err).__name__
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug in Kiln: the request fails, the server lives
            return FAILED, None, None, "internal server error; the details are in the server log"
        if response.status >= 400:
            return FAILED, None, None, response.body.decode("utf-8", "replace")
        return COMPLETED, response.body, response.content_type, ""

    async def _heartbeat(self, item: AsyncItem) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.async_extend, item, LEASE_S)

    # ----- webhooks ----------------------------------------------------------------------
    async def _pending_hooks(self) -> None:
        for request_id in await asyncio.to_thread(self.store.async_hooks_pending, self.names()):
            await self._call_hook(request_id)

    async def _call_hook(self, request_id: str) -> None:
        """POST the outcome once: the store hands the call to one caller (pending ->
        sending), so the completion and the restart scan never both call it."""
        hook: AsyncHook | None = await asyncio.to_thread(self.store.async_hook_take, request_id)
        if hook is None:
            return
        body = orjson.dumps(document(hook))
        state, error = "sent", None
        try:
            await asyncio.to_thread(webhooks.post_json, hook.webhook, body, self.allow)
        except webhooks.WebhookRefused as exc:
            state, error = "refused", str(exc)
        except webhooks.WebhookFailed as exc:
            state, error = "failed", str(exc)
        await asyncio.to_thread(self.store.async_hook_done, hook.id, state, error)
        self.log.write(
            hook.api,
            {"event": "async_webhook", "id": hook.id, "state": state}
            | ({"error": error} if error else {}),
        )


def document(record: AsyncRecord | AsyncHook) -> dict[str, Any]:
    """Cortex's status shape: id, status, result (completed) or error (failed), timestamp."""
    doc: dict[str, Any] = {"id": record.id, "status": record.status}
    if record.status == COMPLETED and record.result is not None:
        doc["result"] = _result(record.result, record.result_type or "")
    elif record.status == FAILED:
        doc["error"] = record.error or "the request failed"
    doc["timestamp"] = datetime.fromtimestamp(record.updated_at, UTC).isoformat()
    if isinstance(record, AsyncRecord) and record.webhook_state is not None:
        doc["webhook"] = {"status": record.webhook_state}
        if record.webhook_error:
            doc["webhook"]["error"] = record.webhook_error
    return doc


def _result(body: bytes, content_type: str) -> Any:
    """The handler's answer as JSON: parsed JSON, text as a string, other bytes as latin-1
    text would corrupt them, so they are base64 under `{"base64": ...}`."""
    if "json" in content_type or not content_type:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    if content_type.startswith("text/") or "json" in content_type:
        return body.decode("utf-8", "replace")
    import base64

    return {"base64": base64.b64encode(body).decode(), "content_type": content_type}
