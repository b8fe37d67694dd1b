"""Where and how a replica runs: its worker spec, environment, CPU cores and the machine cap.

Kept apart from `served.py` (queueing and dispatch) because these are decisions
about processes and the machine, not about requests.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

from kiln.sandbox.policy import base_env
from kiln.storage.cache import cache_dir
from kiln.storage.uri import is_remote
from kiln.worker_spec import WorkerSpec


def worker_spec_for(api: Any) -> WorkerSpec:
    """The plain data a worker needs, from a validated `ApiSpec` or a runtime `BatchApiSpec`.

    One builder for both, so a model served by a realtime API and the same model in a
    batch job load with the same runtime options; batch APIs have no version,
    batching, tracker or envelope, so those keep their defaults.
    """
    block = api.runtime_block
    with_handler = ("python", "torch", "torchserve")
    handler = getattr(block, "handler", None) if api.runtime in with_handler else None
    batching = getattr(api, "batching", None)
    tracker = getattr(api, "tracker", None)
    return WorkerSpec(
        api=api.name,
        version=getattr(api, "version", None),
        runtime=api.runtime,
        model_path=getattr(block, "model", None),
        request_handler=getattr(block, "request_handler", None),
        handler=handler,
        signature_key=getattr(block, "signature_key", None),
        method=getattr(block, "method", "predict"),
        trusted=bool(getattr(block, "trusted", False)),
        signature=getattr(block, "signature", None),
        serialized_file=getattr(block, "serialized_file", None),
        model_file=getattr(block, "model_file", None),
        config=dict(api.config or {}),
        metadata=dict(api.metadata or {}),
        python_path=api.python_path,
        threads=max(1, math.ceil(api.compute.cpu or 1)),
        gpu=api.compute.gpu,
        max_batch_size=batching.max_batch_size if batching else 1,
        tracker_key=tracker.key if tracker else None,
        tracker_type=tracker.model_type if tracker else None,
        response_envelope=getattr(api, "response_envelope", "none"),
        expose_errors=bool(getattr(getattr(api, "serving", None), "expose_errors", False)),
    )


_next_core = itertools.count()


def cores_for(cpu: float) -> list[int] | None:
    """Cores for the next replica: `ceil(cpu)` of them, round-robin over the worker cores.

    The first core is left to the server process (HTTP, routing, IPC) when the
    machine has more than one, so workers never compete with the gateway that
    feeds them; with one core there is nothing to pin.
    """
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    workers = available[1:] if len(available) > 1 else available
    want = max(1, math.ceil(cpu))
    if len(available) == 1 or want > len(workers):
        return None
    start = next(_next_core) * want
    return [workers[(start + i) % len(workers)] for i in range(want)]


def worker_env(spec: WorkerSpec, inherit: bool = False) -> dict[str, str]:
    """The worker's environment: PYTHONPATH, MODEL_DIR (before user code imports), threads.

    It starts from a minimal base (`sandbox.policy.base_env`), never the server's
    own environment, which holds its secrets; only `kiln serve` without
    --sandbox (`inherit`) passes the developer's shell environment on. The
    deployment's own variables (`.env`, `env:`) are added by the caller.
    """
    env = dict(os.environ) if inherit else base_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (spec.python_path, env.get("PYTHONPATH")) if p)
    if spec.model_path and not is_remote(spec.model_path):  # remote: the worker sets it
        path = spec.model_path
        env["MODEL_DIR"] = path if os.path.isdir(path) else os.path.dirname(path)
    env["KILN_CACHE_DIR"] = str(cache_dir())  # every replica and API shares one model cache
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec.threads)
    if spec.gpu == 0 and spec.runtime in ("tensorflow", "torch", "torchserve"):
        # A replica that asked for no GPU must not take one: TensorFlow would reserve all
        # of its memory, and probing CUDA on a machine without it only fills the log.
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env["KILN_API"] = spec.api
    env["PYTHONUNBUFFERED"] = "1"
    return env


def machine_replica_cap(compute: Any) -> int:
    """`compute.max_replicas`, capped by what this machine can hold.

    The seed default of 100 must not fork 100 processes on a laptop: the sum of
    replicas' CPU (and memory, when `compute.mem` is set) requests stays within
    the machine's cores and memory.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    cap = min(compute.max_replicas, max(1, int(cores / max(compute.cpu or 1.0, 0.01))))
    if compute.mem:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = min(cap, max(1, total // compute.mem))
    return max(cap, compute.min_replicas or 0, 1)
