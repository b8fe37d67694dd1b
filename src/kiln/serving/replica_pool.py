"""The replicas of one API version: placing, starting, scaling, stopping and their state.

`ServedApi` (served.py) owns the queue and the dispatcher; this mixin owns the
pool of `ReplicaSlot`s behind them. The seam is the slot list: the dispatcher
only reads `ready_slots()` and `state`, the pool never touches a request.

The mixin reads and sets attributes that `ServedApi.__init__` creates: `api`,
`name`, `revision`, `worker_spec`, `extra_env`, `slots`, `queue`,
`compute_unavailable`, `scaled_to_zero`, `unloaded`, `_stopping`, `_cwd`,
`_log_line`, `_changed`, `_capacity`, `_cold_start`, `_dispatcher`,
`_below_min_since`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from kiln.errors import Unavailable
from kiln.sandbox import LaunchSpec, Limits
from kiln.sandbox.policy import SandboxPolicy, base_env
from kiln.serving.availability import unavailable
from kiln.serving.batcher import RequestQueue
from kiln.serving.gpus import allocator as gpu_allocator
from kiln.serving.placement import cores_for, machine_replica_cap, worker_env
from kiln.serving.replica import LoadFailed
from kiln.serving.supervisor import ReplicaSlot
from kiln.serving.types import WorkerSpec
from kiln.storage.cache import cache_dir
from kiln.storage.uri import is_remote


class ReplicaPool:
    """Lifecycle and state of an API version's replicas (mixed into ServedApi)."""

    api: Any
    slots: list[ReplicaSlot]
    # Set by ServedApi.__init__ (see the module docstring).
    name: str
    worker_spec: WorkerSpec
    extra_env: dict[str, str]
    _cwd: str
    compute_unavailable: str | None
    revision: str | None
    bounds_override: tuple[int, int] | None
    queue: RequestQueue
    _log_line: Any
    _changed: asyncio.Event
    _capacity: asyncio.Event
    _stopping: bool
    _dispatch_loop: Callable[[], Coroutine[Any, Any, None]]  # Dispatcher's (dispatch.py)
    _dispatcher: asyncio.Task[None] | None
    _cold_start: asyncio.Task[None] | None
    tracker_warning: str | None = None

    sandbox: SandboxPolicy
    tenant: str = ""  # the user whose deployment this is ("" for the admin and `kiln serve`)
    network: str = "none"
    _fetched: str | None = None  # a remote model's cached copy, once the server fetched it

    def _env(self) -> dict[str, str]:
        return {**worker_env(self.worker_spec, self.sandbox.inherit_env), **self.extra_env}

    def _readable(self) -> list[str]:
        """What a sandboxed worker may read besides Python and its revision folder."""
        spec = self.worker_spec
        paths = list(spec.site_dirs)
        for path in (self._fetched, spec.model_path, spec.python_path):
            if path and not is_remote(path):
                full = os.path.join(self._cwd, path)
                paths.append(full if os.path.isdir(full) else os.path.dirname(full))
        return paths

    async def _fetch_model(self, slot_spec: WorkerSpec, slot_env: dict[str, str]) -> None:
        """Make a remote model local before a sandboxed worker starts (it has no network).

        The server fetches it into the shared cache in a process of its own that
        carries the deployment's environment (its credentials), never the
        server's; the worker then reads the cached copy read-only.
        """
        spec = self.worker_spec
        if not is_remote(slot_spec.model_path):
            return
        env = {**base_env(), "KILN_CACHE_DIR": str(cache_dir()), **self.extra_env}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kiln.storage.fetch",
            str(spec.model_path),
            env=env,
            cwd=self._cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            answer = orjson.loads(lines[-1])
        except (IndexError, orjson.JSONDecodeError):
            answer = {"error": err.decode(errors="replace").strip()[-500:] or "no answer"}
        if "path" not in answer:
            raise LoadFailed(f"cannot fetch the model {spec.model_path}: {answer['error']}")
        local = answer["path"]
        slot_spec.model_path = local  # this replica's spec and environment
        slot_env["MODEL_DIR"] = local if os.path.isdir(local) else os.path.dirname(local)
        self._fetched = local  # what _readable() binds read-only

    def _launch_factory(self, index: int, env: dict[str, str], devices: list[str]) -> Any:
        compute = self.api.compute
        limits = Limits(mem_bytes=compute.mem, cpu=compute.cpu)
        name = f"{self.name}-{index}".replace("/", "_")

        def launch(argv: list[str], pass_fds: tuple[int, ...]) -> LaunchSpec:
            return self.sandbox.launch(
                argv,
                env,
                cwd=self._cwd,
                pass_fds=pass_fds,
                tenant=self.tenant,
                read_only=self._readable(),
                devices=[f"/dev/nvidia{d}" for d in devices if d.isdigit()],
                network=self.network,
                limits=limits,
                name=name,
            )

        return launch

    def _new_slots(self, first: int, count: int) -> list[ReplicaSlot]:
        """Up to `count` new slots; fewer when the GPUs they need are not there.

        Sets `compute_unavailable` (Cortex's status) when not one more could be placed.
        """
        slots: list[ReplicaSlot] = []
        for index in range(first, first + count):
            slot = self._new_slot(index)
            if slot is None:
                break
            slots.append(slot)
        return slots

    def _new_slot(self, index: int) -> ReplicaSlot | None:
        spec = WorkerSpec.from_wire(self.worker_spec.to_wire())
        spec.cpus = cores_for(self.api.compute.cpu or 1) if self.api.compute.cpu else None
        env = self._env()
        devices: list[str] = []
        if self.api.compute.gpu:
            taken = gpu_allocator().acquire(self.api.compute.gpu)
            if taken is None:
                self.compute_unavailable = gpu_allocator().shortage(self.api.compute.gpu)
                self._log_line(f"compute unavailable: {self.compute_unavailable}")
                return None
            devices = taken
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        self.compute_unavailable = None
        slot = ReplicaSlot(
            index,
            spec,
            launch=self._launch_factory(index, env, devices),
            prepare=(lambda: self._fetch_model(spec, env)) if self.sandbox.enabled else None,
            startup_timeout=self.api.serving.startup_timeout_s,
            mem_limit=self.api.compute.mem,
            log_line=self._replica_log(index),
            on_change=self._on_slot_change,
        )
        slot.gpus = devices  # type: ignore[attr-defined]
        return slot

    async def _stop_slots(self, slots: list[ReplicaSlot], grace: float) -> None:
        """Stop slots and give their GPUs back."""
        await asyncio.gather(*(slot.stop(grace) for slot in slots), return_exceptions=True)
        for slot in slots:
            gpus = getattr(slot, "gpus", None)
            if gpus:
                gpu_allocator().release(gpus)
                slot.gpus = []  # type: ignore[attr-defined]

    def _replica_log(self, index: int) -> Any:
        """Log lines of one replica, tagged `<revision>-<index>` so merged logs tell them apart."""
        replica = f"{(self.revision or 'dev')[:7]}-{index}"

        def log(line: str) -> None:
            if line.startswith("tracker warning"):
                self.tracker_warning = line  # shown by `kiln get API`
            self._log_line(line, replica=replica)

        return log

    async def start(self, replicas: int | None = None) -> None:
        """Start `init_replicas` (or `replicas`) workers; wait until each is ready or failed."""
        if replicas is None:
            compute = self.api.compute
            replicas = compute.init_replicas if compute.init_replicas is not None else 1
        count = replicas if self.api.compute.min_replicas == 0 else max(1, replicas)
        self.scaled_to_zero = count == 0
        self.slots = self._new_slots(0, count)
        self._dispatcher = asyncio.create_task(self._dispatch_loop())
        await asyncio.gather(*(slot.start() for slot in self.slots))

    async def scale(self, replicas: int) -> None:
        """Grow or shrink to `replicas` workers (management API, autoscaler).

        Zero is allowed only with `min_replicas: 0`: the API then holds the next
        request while a worker starts (a cold start) instead of refusing it.
        """
        floor = 0 if (self.api.compute.min_replicas == 0) else 1
        replicas = max(floor, replicas)
        self.scaled_to_zero = replicas == 0
        if replicas > len(self.slots):
            new = self._new_slots(len(self.slots), replicas - len(self.slots))
            self.slots.extend(new)
            await asyncio.gather(*(slot.start() for slot in new))
        else:
            extra, self.slots = self.slots[replicas:], self.slots[:replicas]
            await self._stop_slots(extra, 30)
        self._on_slot_change()

    @property
    def max_replicas(self) -> int:
        """`compute.max_replicas`, capped by the machine (`machine_replica_cap`) and its GPUs."""
        cap = machine_replica_cap(self.api.compute)
        if self.api.compute.gpu:
            cap = min(cap, max(1, len(gpu_allocator().devices) // self.api.compute.gpu))
        return cap

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas the autoscaler keeps within: kiln.yaml's, or the management API's."""
        if self.bounds_override is not None:
            return self.bounds_override
        return self.api.compute.min_replicas, self.max_replicas

    async def cold_start(self) -> None:
        """Bring a scaled-to-zero API back for a waiting request, within cold_start_timeout."""
        if self._cold_start is None or self._cold_start.done():
            self._log_line("cold start: a request arrived while scaled to zero")
            self._cold_start = asyncio.create_task(self.scale(1))
        timeout = self.api.autoscaling.cold_start_timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._cold_start), timeout)
        except TimeoutError:
            raise Unavailable(
                f"API '{self.name}' is starting from zero replicas and was not ready within "
                f"{timeout:g}s (autoscaling.cold_start_timeout); retry shortly",
                retry_after=max(1, int(timeout)),
            ) from None

    async def unload(self, grace: float = 30.0) -> None:
        """Stop the workers but keep the API known (V2 repository `unload`): requests get 503."""
        self.unloaded = True
        slots, self.slots = self.slots, []
        self.queue.fail_all(self._refusal("unloaded"))
        await self._stop_slots(slots, grace)
        self._on_slot_change()

    async def load(self) -> None:
        """Start the workers again after `unload` (V2 repository `load`)."""
        if self.slots and not self.unloaded:
            return
        self.unloaded = False
        count = max(1, self.api.compute.init_replicas or self.api.compute.min_replicas or 1)
        self.slots = self._new_slots(0, count)
        await asyncio.gather(*(slot.start() for slot in self.slots))
        self._on_slot_change()

    def _on_slot_change(self) -> None:
        self._changed.set()
        self._capacity.set()
        if self.state == "failed" and len(self.queue):
            self.queue.fail_all(self._refusal("failed"))
        live = len(self.ready_slots())
        minimum = max(1, self.api.compute.min_replicas or 1)
        if live >= minimum:
            self._below_min_since = None
        elif self._below_min_since is None:
            self._below_min_since = time.monotonic()

    # ----- state -------------------------------------------------------------------
    def _refusal(self, state: str) -> Unavailable:
        """The 503 for requests caught in `state` (availability.py: one mapping for all)."""
        return unavailable(self, state) or Unavailable(f"API '{self.name}' is {state}")

    def ready_slots(self) -> list[ReplicaSlot]:
        return [slot for slot in self.slots if slot.ready]

    @property
    def state(self) -> str:
        if self._stopping:
            return "stopped"
        if self.unloaded:
            return "unloaded"
        if self.compute_unavailable and not self.slots:
            return "compute unavailable"
        if self.scaled_to_zero and not self.slots:
            return "scaled to zero"
        for slot in self.slots:  # a loop, not any(): asked twice per request
            if slot.ready:
                return "ready"
        states = {slot.state for slot in self.slots}
        if states and states <= {"failed"}:
            return "failed"
        if "restarting" in states or self.restarts:
            return "restarting"
        return "loading"

    @property
    def error(self) -> str | None:
        errors = [slot.error for slot in self.slots if slot.error and not slot.ready]
        return errors[0] if errors else None

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    @property
    def signature(self) -> dict[str, Any]:
        for slot in self.slots:
            if slot.replica is not None:
                return slot.replica.signature
        return {}

    def healthy(self) -> bool:
        """False once the API has had fewer live replicas than its minimum for too long."""
        if self.state == "failed":
            return False
        since = self._below_min_since
        return since is None or time.monotonic() - since <= self.api.serving.max_retry_timeout_s
