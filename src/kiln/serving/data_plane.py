"""The data plane: the one layer between the protocol adapters and the served APIs.

Every adapter (native, TorchServe, KServe V1, Open Inference V2, streaming,
explanations, Batch API submissions) decodes its wire format, then hands the
rest to this layer with an explicit `Call`: who asks (the authenticated
principal, or None with auth off) and what it may see. The layer

- resolves the API and version the caller named, in the caller's view of the
  registry (another user's API answers like a missing one);
- admits the call (quota and rate limit, through the `authority` the server
  hands in: `control/quotas.py`'s QuotaGate) before any body is read;
- enqueues it on the version that is live (a version a rollout replaced hands
  the call to its successor, and the successor's version is what is reported);
- turns API state into the caller's error: a load error reaches only those who
  may read it (`public_error`);
- meters the call once, at the end, and only when admission succeeded
  (`finish`): a call refused with 429 is never recorded, so it is neither billed
  nor counted again when the quota counters are rebuilt after a restart.

Nothing here travels in a ContextVar: the caller and the version that
answered live on the `Call` the adapter was given, which is how MLServer's
DataPlane sits between its REST/gRPC servers and the models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

from kiln.errors import KilnError, NotFound, Unavailable
from kiln.serving.router import ApiGroup, Caller, Registry, RegistryView, ServedApi
from kiln.serving.types import InferenceRequest, InferenceResponse

__all__ = ["Call", "DataPlane"]


class Call:
    """One HTTP request's business with the data plane (one small object per request).

    `caller` and `view` are fixed when the request is authenticated; `api` and
    `version` say which API version answered (for metering, metrics and logs);
    `admitted` is set only when the quota and rate limit let the call in, and is
    what `DataPlane.finish` meters; `rate_headers` are the X-RateLimit-* headers
    the response carries.
    """

    __slots__ = ("caller", "view", "api", "version", "admitted", "rate_headers", "shadow", "trace")

    def __init__(self, caller: Caller | None, view: Registry | RegistryView) -> None:
        self.caller = caller
        self.view = view
        self.api = ""
        self.version = ""
        self.admitted = False
        self.rate_headers: list[tuple[bytes, bytes]] | None = None
        # serving/tracing.py RequestTrace of a traced request (set by the transport), or None
        self.trace: Any = None
        # The shadow version this call's prediction is mirrored to (traffic shadowing).
        self.shadow: ServedApi | None = None


def _live(served: ServedApi) -> ServedApi:
    """The version that takes a call now: a version a rollout replaced and that is
    draining hands new calls to its successor (served.py does the same inside)."""
    while served.successor is not None and served.state == "stopped":
        served = served.successor
    return served


class DataPlane:
    """Resolve, admit, enqueue, await, map errors and meter: once, for every protocol."""

    # Shadow copies in flight at once, over every API: past it a copy is dropped, never
    # queued, so a slow shadow version cannot pile work up in the server.
    MAX_SHADOWS = 256

    def __init__(self, registry: Registry, authority: Any = None, log: Any = None) -> None:
        self.registry = registry
        # API keys, quotas and metering (control/quotas.py QuotaGate), or None: auth off.
        self.authority = authority
        self.log = log  # the API logs (LogSink): shadow answers are written there
        self._shadows: set[asyncio.Task[None]] = set()

    # ----- who asks ------------------------------------------------------------------
    def call(self, caller: Caller | None = None) -> Call:
        """A new call for `caller` (None: auth off, or an open route)."""
        return Call(caller, self.registry.view(caller))

    # ----- resolve -------------------------------------------------------------------
    def group(self, call: Call, name: str) -> ApiGroup | None:
        """The API `name` as the caller sees it (None: missing, or not the caller's)."""
        return call.view.groups.get(name)

    def resolve(
        self,
        call: Call,
        name: str,
        version: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> ServedApi:
        """The version of `name` an inference request goes to: `version` when given,
        else the API's traffic split or default (`ApiGroup.route`).

        `headers` (lower-case names) are read only for a `traffic_sticky_header`."""
        group = call.view.groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; GET /apis lists the APIs this server has")
        return self.pick(call, group, version, headers)

    def pick(
        self,
        call: Call,
        group: ApiGroup,
        version: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> ServedApi:
        """`resolve` for an adapter that found the group itself (by endpoint, alias)."""
        if version is None and group.routing is not None:
            served = group.route(None, headers)
            call.shadow = group.shadow_target(served)
        else:
            served = group.get(version)
        call.api = served.name
        return served

    def lookup(self, call: Call, name: str, version: str | None) -> ServedApi:
        """The version `name` means for a metadata route: `version`, else the default
        (never a draw over the split)."""
        group = call.view.groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; GET /apis lists the APIs this server has")
        served = group.get(version)
        call.api = served.name
        return served

    # ----- admit ---------------------------------------------------------------------
    def admit(self, call: Call, api: str) -> None:
        """Let one inference call of `api` in, or raise 429 (quota or rate limit).

        Called by the adapters before they read a body, once per HTTP call (a V1
        request of many instances is one call). Admission checks and counts in one
        synchronous step (control/quotas.py), so concurrent callers never overshoot.
        """
        call.api = api
        caller = call.caller
        if caller is None or self.authority is None:
            return
        headers = self.authority.admit(caller)  # TooManyRequests: never admitted, never metered
        call.admitted = True
        if headers:
            call.rate_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    # ----- enqueue and await ---------------------------------------------------------
    # These return the served version's own coroutine rather than awaiting it in a
    # wrapper: the hot path gets no extra coroutine or await (docs/performance.md).
    def predict(
        self, call: Call, served: ServedApi, request: InferenceRequest
    ) -> Awaitable[InferenceResponse]:
        """Queue one request on the live version; await the result for its answer."""
        target = served if served.successor is None else _live(served)
        call.version = target.version or ""
        if call.trace is not None:  # serving/tracing.py: set only on a traced request
            request.trace = call.trace
        if call.shadow is not None:
            self._mirror(call, request)
        return target.predict(request)

    # ----- shadow ------------------------------------------------------------------
    def _mirror(self, call: Call, request: InferenceRequest) -> None:
        """Send a copy of `request` to the call's shadow version, fire-and-forget.

        Dropped (counted as "dropped") when the shadow version is not ready, its queue
        is full, or MAX_SHADOWS copies are in flight: a shadow never waits, queues
        past its limit or slows the caller, and its answer or error never reaches it.
        """
        shadow = call.shadow
        call.shadow = None
        if shadow is None:
            return
        shadow = _live(shadow)
        queue = shadow.queue
        if (
            shadow.state != "ready"
            or len(queue) >= queue.max_size
            or len(self._shadows) >= self.MAX_SHADOWS
        ):
            self._shadow_done(shadow, request.request_id, "dropped", 0.0)
            return
        copy = dataclasses.replace(  # not in the caller's trace: it may outlive it
            request, version=shadow.version, request_id=request.request_id + "-shadow", trace=None
        )
        task = asyncio.get_running_loop().create_task(self._shadow_run(shadow, copy))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow_run(self, shadow: ServedApi, request: InferenceRequest) -> None:
        started = time.perf_counter()
        try:
            response = await shadow.predict(request)
            status = str(response.status)
        except KilnError as err:
            status = str(err.status)
        except Exception:  # noqa: BLE001 - a shadow's failure is only counted and logged
            status = "500"
        self._shadow_done(shadow, request.request_id, status, time.perf_counter() - started)

    def _shadow_done(self, shadow: ServedApi, request_id: str, status: str, seconds: float) -> None:
        version = shadow.version or ""
        record = getattr(shadow.observer, "shadow", None)  # control/metrics.py Metrics
        if record is not None:
            record(shadow.name, version, status)
        if self.log is not None:
            self.log.write(
                shadow.name,
                {
                    "event": "shadow",
                    "request_id": request_id,
                    "version": version,
                    "status": status,
                    "latency_ms": round(seconds * 1000, 3),
                },
            )

    def explain(
        self, call: Call, served: ServedApi, request: InferenceRequest
    ) -> Awaitable[InferenceResponse]:
        """One explanation from the live version (never batched)."""
        target = served if served.successor is None else _live(served)
        call.version = target.version or ""
        return target.explain(request)

    def stream(
        self, call: Call, served: ServedApi, request: InferenceRequest
    ) -> AsyncIterator[tuple[bytes, str]]:
        """The handler's chunks as it yields them (never batched)."""
        target = served if served.successor is None else _live(served)
        call.version = target.version or ""
        return target.stream(request)

    def wait_ready(self, call: Call, served: ServedApi) -> Awaitable[None]:
        """Wait for a ready replica (a GET loads a model scaled to zero); 503 otherwise."""
        call.version = served.version or ""
        return served.wait_ready(served.api.serving.startup_timeout_s)

    # ----- errors --------------------------------------------------------------------
    def exposes(self, call: Call, served: ServedApi) -> bool:
        """Whether this caller may read the API's load error as it is.

        On `kiln serve` (the developer's own server) and for APIs that set
        `serving.expose_errors: true`, always (the server sets
        `worker_spec.expose_errors` for both). On `kiln server`, only its owner
        and the admin: the message may name files, hosts or secrets of the owner.
        """
        if served.worker_spec.expose_errors:
            return True
        caller = call.caller
        return caller is not None and caller.owns(served.name)

    def shown_error(self, call: Call, served: ServedApi) -> str | None:
        """The API's load error as this caller may read it (None: no error)."""
        error = served.error
        if error is None or self.exposes(call, served):
            return error
        return f"the load error is not shown to callers; {_hidden(served.name)}"

    def public_error(self, call: Call, err: KilnError) -> KilnError:
        """The error the caller gets: a 503 that carries an API's load error (marked with
        `load_error_of` where it is made, serving/availability.py) is rewritten for callers
        who may not read it (see `exposes`); every other error is as raised."""
        name = getattr(err, "load_error_of", None)
        if name is None or not call.api:
            return err
        group = self.registry.groups.get(call.api)
        served = (
            None
            if group is None
            else next((s for s in group.versions.values() if s.name == name), None)
        )
        if served is not None and self.exposes(call, served):
            return err
        return Unavailable(  # hidden also when the API is gone and its owner unknown
            f"API '{name}' failed to load; {_hidden(name)}",
            retry_after=getattr(err, "retry_after", None),
        )

    # ----- meter ---------------------------------------------------------------------
    def finish(self, call: Call, status: int) -> None:
        """Meter an admitted call once, with the status it was answered with."""
        if call.admitted and self.authority is not None:
            call.admitted = False  # once, whatever calls finish again
            self.authority.record(call.caller, call.api, call.version, status)


def _hidden(name: str) -> str:
    return (
        f"its owner can see why with `kiln get {name}` or `kiln logs {name}` "
        f"(or set serving.expose_errors: true to show load errors to callers)"
    )
