"""The data-plane benchmark through the Ray backend vs `kiln serve`, on one machine, one run.

The same load as bench/data_plane.py (bench/loadgen.c, closed loop, keep-alive; the
tiny and mlp ONNX models of bench/models.py; batching 64 rows / 2 ms; 1 replica) on
two servers that are up side by side:

  local  `kiln serve DIR` (the local backend: Kiln's server and one worker process)
  ray    the same project as a Ray Serve application (kiln.backends.ray.app:build_app)
         on a 1-node Ray cluster this script starts (`ray.init`, its own processes,
         stopped by `ray.shutdown`), reached through Serve's HTTP proxy: proxy ->
         KilnIngress (Kiln's inference app, batcher) -> KilnReplica -> Kiln worker

Each (model, route, concurrency) is loaded on one then the other, the order
alternating, so drift on a shared box falls on both. Routes: native and V2. The table
gives req/s and p50 of each and ray/local ratios: the cost of Serve's proxy and the
handle hop. Also measured: deploy-to-live time on Ray (serve.run of the application
until its first 200) next to `kiln serve`'s start-to-ready time.

The Ray replica runs its worker with `sandbox: off`, as `kiln serve` does without
--sandbox, so both rows run the same worker. Writes bench/results/ray_data_plane-<ts>.json.

Run: .venv/bin/python bench/ray_data_plane.py [--duration 5] [--concurrency 1,64]
     [--models tiny,mlp] [--routes native,v2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
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

ROUTES = {"native": "/{name}", "v2": "/v2/models/{name}/infer"}
READY_TIMEOUT_S = 180.0


def bodies_for(name: str) -> dict[str, bytes]:
    return {"native": models.sample_body(name), "v2": models.v2_body(name)}


def first_answer(base: str, path: str, body: bytes, timeout: float) -> None:
    """Poll until `path` answers 200 (bounded): the API is live."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, answer = data_plane.post(base + path, body, timeout=10)
            if status == 200:
                return
            last = (status, answer[:200])
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{base}{path} not live within {timeout:g}s: {last!r}")


class RayServe:
    """A 1-node Ray cluster with Serve's proxy on 127.0.0.1, started by this process."""

    def __init__(self, cpus: int) -> None:
        import ray
        from ray import serve

        self.port = data_plane.free_port()
        ray.init(
            address="local",  # always a new cluster: not one a test left running on the box
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.port}
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def deploy(self, project: Path, name: str, probe: tuple[str, bytes]) -> float:
        """serve.run of the project's application; seconds until its first 200."""
        from ray import serve

        from kiln.backends.ray.app import build_app

        started = time.monotonic()
        app = build_app({"project_dir": str(project), "sandbox": "off"})
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(serve.run, app, name=name, route_prefix="/").result(READY_TIMEOUT_S)
        first_answer(self.base, probe[0], probe[1], READY_TIMEOUT_S)
        return time.monotonic() - started

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def start_local(project: Path, probe: tuple[str, bytes]) -> tuple[data_plane.Server, str, float]:
    args = argparse.Namespace(http=None, trace_sample=1.0)
    started = time.monotonic()
    server, base = data_plane.start_kiln(project, args, sandbox=False)
    data_plane.wait_ready(server, base, READY_TIMEOUT_S)
    first_answer(base, probe[0], probe[1], READY_TIMEOUT_S)
    return server, base, time.monotonic() - started


def load(base: str, path: str, body: bytes, concurrency: int, duration: float) -> dict:
    result = loadgen.run_load(base + path, body, concurrency, duration)
    return {
        "rps": round(float(result["rps"]), 1),
        "p50_ms": round(float(result["p50_ms"]), 3),
        "p99_ms": round(float(result["p99_ms"]), 3),
        "errors": int(result.get("errors", 0) or 0),  # non-2xx, socket errors, timeouts
    }


def run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="kiln-ray-bench-"))
    model_paths = models.build_all(folder)
    rows: list[dict] = []
    deploys: list[dict] = []
    ray_serve = RayServe(cpus=max(2, os.cpu_count() or 2))
    turn = 0
    try:
        for name in args.models:
            project = folder / f"kiln-{name}"
            project.mkdir()
            shutil.copy(model_paths[name], project / f"{name}.onnx")
            (project / "kiln.yaml").write_text(data_plane.kiln_yaml(name, data_plane.BATCHING, 1))
            bodies = bodies_for(name)
            probe = (ROUTES["native"].format(name=name), bodies["native"])
            server, local_base, local_ready = start_local(project, probe)
            try:
                ray_live = ray_serve.deploy(project, f"bench-{name}", probe)
                deploys.append(
                    {
                        "model": name,
                        "ray_deploy_to_live_s": round(ray_live, 2),
                        "local_start_to_ready_s": round(local_ready, 2),
                    }
                )
                print(
                    f"{name}: live on Ray in {ray_live:.2f}s (kiln serve: {local_ready:.2f}s)",
                    flush=True,
                )
                for route in args.routes:
                    path = ROUTES[route].format(name=name)
                    for c in args.concurrency:
                        order = ["local", "ray"] if turn % 2 == 0 else ["ray", "local"]
                        turn += 1
                        measured: dict[str, dict] = {}
                        for which in order:
                            base = local_base if which == "local" else ray_serve.base
                            measured[which] = load(base, path, bodies[route], c, args.duration)
                        local, ray_row = measured["local"], measured["ray"]
                        row = {
                            "model": name,
                            "route": route,
                            "c": c,
                            "first": order[0],
                            "local": local,
                            "ray": ray_row,
                            "rps_ratio": round(ray_row["rps"] / local["rps"], 3)
                            if local["rps"]
                            else None,
                            "p50_ratio": round(ray_row["p50_ms"] / local["p50_ms"], 2)
                            if local["p50_ms"]
                            else None,
                        }
                        rows.append(row)
                        print(
                            f"  {name} {route} c={c}: local {local['rps']:.0f} req/s, "
                            f"ray {ray_row['rps']:.0f} req/s",
                            flush=True,
                        )
            finally:
                server.stop()
                try:
                    ray_serve.delete(f"bench-{name}")
                except Exception as exc:  # noqa: BLE001 - the report says so
                    print(f"  could not delete bench-{name}: {exc}", file=sys.stderr)
    finally:
        ray_serve.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": data_plane.machine_info(),
        "duration_s": args.duration,
        "batching": data_plane.BATCHING,
        "replicas": 1,
        "rows": rows,
        "deploys": deploys,
    }


def print_report(result: dict) -> None:
    print()
    print(
        f"{'model':6} {'route':6} {'c':>3}  {'local req/s':>11} {'p50 ms':>7}  "
        f"{'ray req/s':>9} {'p50 ms':>7}  {'req/s ray/local':>15} {'p50 ray/local':>13}"
    )
    for r in result["rows"]:
        local, ray_row = r["local"], r["ray"]
        errors = ""
        if local["errors"] or ray_row["errors"]:
            errors = f"  errors: local {local['errors']}, ray {ray_row['errors']}"
        print(
            f"{r['model']:6} {r['route']:6} {r['c']:>3}  {local['rps']:>11.0f} "
            f"{local['p50_ms']:>7.2f}  {ray_row['rps']:>9.0f} {ray_row['p50_ms']:>7.2f}  "
            f"{r['rps_ratio'] if r['rps_ratio'] is not None else 'n/a':>15} "
            f"{r['p50_ratio'] if r['p50_ratio'] is not None else 'n/a':>13}{errors}"
        )
    print()
    for d in result["deploys"]:
        print(
            f"deploy to live, {d['model']}: Ray {d['ray_deploy_to_live_s']:.2f}s "
            f"(serve.run until the first 200), kiln serve {d['local_start_to_ready_s']:.2f}s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--models", default="tiny,mlp")
    parser.add_argument("--routes", default="native,v2")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.models = [m for m in args.models.split(",") if m]
    args.routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in args.routes if r not in ROUTES] + [
        m for m in args.models if m not in data_plane.MODELS
    ]
    if unknown:
        parser.error(f"unknown route or model: {', '.join(unknown)}")
    result = run(args)
    print_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray_data_plane-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
