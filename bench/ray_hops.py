"""Where the time of a request through Ray Serve goes: bare Serve hops vs Kiln's path, one run.

On one 1-node Ray cluster (this script's own, `ray.init` .. `ray.shutdown`), side by
side behind Serve's HTTP proxy on 127.0.0.1:

  bare        proxy -> one deployment whose `__call__` answers the body back
  bare-asgi   proxy -> one deployment that is a raw ASGI app (`serve.ingress`, as Kiln's)
  chain       proxy -> an ingress deployment (`__call__`) -> a second deployment through
              a handle (`await handle.run.remote(bytes)`), bytes back
  chain-asgi  the same with the ingress a raw ASGI app, the handle call awaited under
              `asyncio.wait_for` in a task of its own (what RemoteReplica._call does)
  kiln        Kiln's application (kiln.backends.ray.app:build_app, `sandbox: off`, the
              tiny ONNX model, batching 64 rows / 2 ms): proxy -> KilnIngress -> KilnReplica
              -> Kiln worker
  kiln-direct the same application with Serve's direct ingress on in the KilnIngress
              replica (DIRECT_ENV), loaded at that replica's own HTTP port: no proxy hop

Besides req/s and p50, each run reports the CPU milliseconds per request of every
process of the cluster (by Ray's process title): where the time goes.

Each round loads every target in turn (bench/loadgen.c, closed loop, keep-alive) for
`--duration` seconds at each concurrency; the order rotates from round to round so
drift on a shared box falls on all of them. Prints per target the median over rounds
of req/s and p50. Writes bench/results/ray_hops-<ts>.json.

A target with "+" (bare+, chain+, kiln+, ...) is the same application with Serve's
knobs in FAST_ENV set in its replicas' environment (runtime_env env_vars), so one run
compares them on the same proxy and cluster.

Run: .venv/bin/python bench/ray_hops.py [--duration 3] [--rounds 3] [--concurrency 1,64]
     [--targets bare,bare-asgi,chain,chain-asgi,kiln] (or bare+, ..., kiln+)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import data_plane  # noqa: E402
import loadgen  # noqa: E402
import models  # noqa: E402
from ray_data_plane import READY_TIMEOUT_S, RayServe, first_answer  # noqa: E402

MODEL = "tiny"
BASE_TARGETS = ("bare", "bare-asgi", "chain", "chain-asgi", "kiln")
TARGETS = BASE_TARGETS + tuple(t + "+" for t in BASE_TARGETS) + ("kiln-direct",)
# "kiln-direct": Kiln's application with Serve's direct ingress in its KilnIngress replica
# (ray/serve/_private/constants.py RAY_SERVE_ENABLE_DIRECT_INGRESS, read by the replica):
# the replica runs its own HTTP server on a port the controller allocates in
# 30000-31000, and the load goes there, without the proxy hop.
DIRECT_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
DIRECT_PORTS = range(30000, 31000)
# "+" targets: their replicas run with these (Serve's own knobs, ray/serve/_private/
# constants.py; RAY_SERVE_THROUGHPUT_OPTIMIZED sets them too, with more): user code on the
# replica's own event loop, not a second thread's; a handle's router on the caller's loop;
# request-path log lines buffered rather than written one by one.
FAST_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def bare_apps() -> dict[str, Any]:
    """The Serve applications with nothing of Kiln's in them, by target name."""
    from ray import serve

    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def asgi_echo(scope: dict, receive: Any, send: Any) -> None:
        """A raw ASGI app: the body back as JSON bytes, 200."""
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    class Bare:
        async def __call__(self, request: Any) -> bytes:
            return bytes(await request.body())

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress()
    class BareAsgi:
        def __serve_build_asgi_app__(self) -> Any:  # as KilnIngress hands Serve its app
            return asgi_echo

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
    class Backend:
        async def run(self, frame: bytes, timeout: float) -> tuple[bytes, str]:
            return frame, "node"

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    class Chain:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        async def __call__(self, request: Any) -> bytes:
            data, _ = await self.handle.run.remote(bytes(await request.body()), 1.0)
            return bytes(data)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress()
    class ChainAsgi:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        async def _call(self, body: bytes, future: asyncio.Future) -> None:
            response = self.handle.run.remote(body, 1.0)
            data, _ = await asyncio.wait_for(response, 10.0)
            future.set_result(data)

        async def _app(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await lifespan(receive, send)
                return
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            future = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(self._call(body, future))
            data = await future
            await task
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": bytes(data)})

        def __serve_build_asgi_app__(self) -> Any:
            async def app(scope: dict, receive: Any, send: Any) -> None:
                await self._app(scope, receive, send)

            return app

    def opt(deployment: Any, env: dict[str, str] | None) -> Any:
        actor: dict[str, Any] = {"num_cpus": 0}
        if env:
            actor["runtime_env"] = {"env_vars": env}
        return deployment.options(ray_actor_options=actor)

    apps: dict[str, Any] = {}
    for suffix, env in (("", None), ("+", FAST_ENV)):
        apps["bare" + suffix] = opt(Bare, env).bind()
        apps["bare-asgi" + suffix] = opt(BareAsgi, env).bind()
        apps["chain" + suffix] = opt(Chain, env).bind(opt(Backend, env).bind())
        apps["chain-asgi" + suffix] = opt(ChainAsgi, env).bind(opt(Backend, env).bind())
    return apps


def kiln_app(project: Path, env: dict[str, str] | None) -> Any:
    """Kiln's application as `build_app` makes it (`sandbox: off`); with `env`, every
    replica of it (KilnIngress, KilnReplica) runs with those environment variables."""
    from kiln.backends.ray.app import build_app
    from kiln.backends.ray.ingress import KilnIngress
    from kiln.backends.ray.options import deployment_name, deployment_options, ingress_options
    from kiln.backends.ray.replica import KilnReplica
    from kiln.config import load_project

    if not env:
        return build_app({"project_dir": str(project), "sandbox": "off"})

    def with_env(options: dict[str, Any]) -> dict[str, Any]:
        actor = {**options.get("ray_actor_options", {}), "runtime_env": {"env_vars": env}}
        return {**options, "ray_actor_options": actor}

    handles = {}
    for api in load_project(str(project)).apis:
        name = deployment_name(api)
        replica = KilnReplica.options(  # type: ignore[attr-defined]  # a serve.deployment
            name=name, **with_env(deployment_options(api))
        )
        handles[name] = replica.bind(str(project), None, api.name, api.version, "off")
    ingress = KilnIngress.options(**with_env(ingress_options()))  # type: ignore[attr-defined]
    return ingress.bind(handles, str(project))


def tree_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of this process's descendants (the Ray cluster it started: raylet,
    GCS, proxy, replicas, a Kiln worker) by pid, with a label (`ProxyActor`,
    `ServeReplica:hops-bare:Bare`, ...: Ray's process title without the running method)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    seen: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        name = argv[0].decode(errors="replace").split(" ")[0]
        if name.startswith("ray::"):
            label = name.removeprefix("ray::").split(".")[0]
        elif any(b"kiln" in a for a in argv[1:4]):
            label = "kiln worker"
        else:
            label = os.path.basename(name) or "?"
        seen[pid] = (label, (int(fields[11]) + int(fields[12])) / tick)
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        for child, up in parent.items():
            if up == pid and child not in mine:
                mine.add(child)
                todo.append(child)
    return {pid: seen[pid] for pid in mine}


def cpu_per_request(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], requests: float
) -> dict[str, float]:
    """CPU ms per request of each process (by label) between two `tree_cpu` readings."""
    out: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        spent = seconds - before.get(pid, (label, 0.0))[1]
        if spent > 0.02:
            out[label] = round(out.get(label, 0.0) + 1000 * spent / max(requests, 1.0), 3)
    return out


def deploy_all(ray_serve: RayServe, targets: list[str], folder: Path) -> dict[str, str]:
    """Deploy every target, each as its own Serve application; the path each answers at."""
    from ray import serve

    paths: dict[str, str] = {}
    body = models.sample_body(MODEL)
    apps = bare_apps()
    model_paths: dict[str, Path] = {}
    for name in targets:
        prefix = f"/hops-{name.replace('+', '-fast')}"
        if name.startswith("kiln"):
            # Kiln routes on the full path (no root_path), so each Kiln application is
            # its own API name at the prefix of the same name: /tiny, /tinyfast.
            api = {"kiln": MODEL, "kiln+": f"{MODEL}fast"}.get(name, f"{MODEL}direct")
            model_paths = model_paths or models.build_all(folder)
            project = folder / f"kiln-{api}"
            project.mkdir()
            shutil.copy(model_paths[MODEL], project / f"{api}.onnx")
            yaml = data_plane.kiln_yaml(api, data_plane.BATCHING, 1)
            (project / "kiln.yaml").write_text(yaml)
            env = {"kiln": None, "kiln+": FAST_ENV}.get(name, DIRECT_ENV)
            app = kiln_app(project, env)
            prefix = path = f"/{api}"
        else:
            app, path = apps[name], prefix
        started = time.monotonic()
        app_name = f"hops-{name.replace('+', '-fast')}"
        serve.run(app, name=app_name, route_prefix=prefix)
        first_answer(ray_serve.base, path, body, READY_TIMEOUT_S)
        if name == "kiln-direct":
            path = direct_url(app_name, path, body)
        print(f"{name}: live in {time.monotonic() - started:.2f}s at {path}", flush=True)
        paths[name] = path
    return paths


def listening_ports(pid: int) -> list[int]:
    """The TCP ports a process listens on (its sockets' inodes in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def direct_url(app_name: str, path: str, body: bytes) -> str:
    """The URL of `path` on the KilnIngress replica's own HTTP server (direct ingress)."""
    for pid, (label, _) in tree_cpu().items():
        if label == f"ServeReplica:{app_name}:KilnIngress":
            for port in listening_ports(pid):
                if port in DIRECT_PORTS:
                    url = f"http://127.0.0.1:{port}{path}"
                    first_answer(url, "", body, READY_TIMEOUT_S)
                    return url
    raise RuntimeError(f"no direct-ingress HTTP port found for {app_name}")


def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="kiln-ray-hops-"))
    body = models.sample_body(MODEL)
    ray_serve = RayServe(cpus=8)  # logical: each Kiln replica reserves its cpu: 1
    runs: list[dict] = []
    try:
        paths = deploy_all(ray_serve, args.targets, folder)
        for round_no in range(args.rounds):
            shift = round_no % len(args.targets)
            order = args.targets[shift:] + args.targets[:shift]
            for c in args.concurrency:
                for name in order:
                    before = tree_cpu()
                    url = paths[name] if "://" in paths[name] else ray_serve.base + paths[name]
                    result = loadgen.run_load(url, body, c, args.duration)
                    after = tree_cpu()
                    # over warmup + duration: the loadgen's warmup is loaded too
                    cpu_ms = cpu_per_request(
                        before, after, float(result["rps"]) * (args.duration + 0.5)
                    )
                    row = {
                        "round": round_no,
                        "target": name,
                        "c": c,
                        "rps": round(float(result["rps"]), 1),
                        "p50_ms": round(float(result["p50_ms"]), 3),
                        "p99_ms": round(float(result["p99_ms"]), 3),
                        "errors": int(result.get("errors", 0) or 0),
                        "cpu_ms_per_request": cpu_ms,
                    }
                    runs.append(row)
                    busy = ", ".join(
                        f"{k.removeprefix('ray::')} {v:.2f}"
                        for k, v in sorted(cpu_ms.items(), key=lambda kv: -kv[1])[:4]
                    )
                    print(
                        f"  round {round_no} c={c} {name}: {row['rps']:.0f} req/s, "
                        f"p50 {row['p50_ms']:.2f} ms; CPU ms/request: {busy}",
                        flush=True,
                    )
    finally:
        ray_serve.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": data_plane.machine_info(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "runs": runs,
        "summary": summarise(runs, args.targets, args.concurrency),
    }


def summarise(runs: list[dict], targets: list[str], concurrency: list[int]) -> list[dict]:
    rows = []
    for c in concurrency:
        for name in targets:
            mine = [r for r in runs if r["target"] == name and r["c"] == c]
            if not mine:
                continue
            rows.append(
                {
                    "target": name,
                    "c": c,
                    "rps": round(statistics.median(r["rps"] for r in mine), 1),
                    "p50_ms": round(statistics.median(r["p50_ms"] for r in mine), 3),
                    "errors": sum(r["errors"] for r in mine),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--targets", default=",".join(BASE_TARGETS))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target: {', '.join(unknown)}")
    result = run(args)
    print(f"\n{'target':11} {'c':>3}  {'req/s':>7} {'p50 ms':>7}  (median of {args.rounds} rounds)")
    for r in result["summary"]:
        errors = f"  errors {r['errors']}" if r["errors"] else ""
        print(f"{r['target']:11} {r['c']:>3}  {r['rps']:>7.0f} {r['p50_ms']:>7.2f}{errors}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray_hops-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
