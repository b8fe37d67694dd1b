"""Deploy-to-live time on Ray vs the local backend: `kiln server start`, `kiln deploy`, an update.

The real CLI (`python -m kiln.cli.main`, as tests/support.py's KILN) against a real
`kiln server start` with its own KILN_HOME and free ports, the same small Python API
(1 replica, a handler that answers its VERSION) on two backends, in one run:

  local  `kiln server start` (worker processes on this machine, its SQLite store)
  ray    `kiln server start --backend ray --ray-address ADDR --ray-http-port P
         --store postgresql://...` on a fresh 2-node `ray.cluster_utils.Cluster`
         (this script's own processes on 127.0.0.1, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
         with a throwaway PostgreSQL; every answer is read through Ray Serve's HTTP
         proxy (http://127.0.0.1:P), the admin key in x-api-key

Each of --repeat rounds, per backend, from a clean slate (a new KILN_HOME; on Ray an
empty database and no Serve running, so the control plane starts Serve's controller,
proxies and its ingress application itself):

  server start   `kiln server start` until the CLI returns (management port answers),
                 and until the data port (local: the server's own; ray: Serve's proxy)
                 answers GET /ping with 200
  deploy (first) `kiln deploy DIR` until the CLI returns ("is live"), and until the
                 first 200 from POST /shop/echo with the revision's answer
  update         the handler changed (a new revision, a rolling update): until the
                 CLI returns, and until the first answer from the new revision

A poller thread starts with each command (50 ms apart), so a first answer that comes
before the CLI returns is seen as such; the answers that were not 200 while the update
rolled are counted. Every wait is bounded; servers are stopped with `kiln server stop`
and then by their PID; the Serve applications are removed, Serve shut down, the
cluster stopped by the processes it started (never `ray stop`), and the PostgreSQL
stopped and its folder removed. Writes bench/results/ray_deploy-<ts>.json.

Run: .venv/bin/python bench/ray_deploy.py [--repeat 3] [--store URL] [--backends local,ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

# Read when Ray is imported: every node stays on 127.0.0.1 (see tests/ray_cluster.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import httpx  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ray_batch import RayCluster, ThrowawayPostgres  # noqa: E402

KILN = [sys.executable, "-m", "kiln.cli.main"]
CLI_TIMEOUT_S = 300.0
LIVE_TIMEOUT_S = 300.0
POLL_S = 0.05
ENDPOINT = "/shop/echo"  # the deployment's name, then the API's

HANDLER = """
VERSION = "{version}"


class Handler:
    def predict(self, payload, context):
        return {{"version": VERSION, "echo": payload}}
"""

CONFIG = """
- kind: deployment
  name: shop
- kind: api
  name: echo
  python: {handler: handler.py:Handler}
  compute: {min_replicas: 1, max_replicas: 1, cpu: 100m}
"""

ROWS = [
    ("start_cli", "server start: CLI returns"),
    ("start_live", "server start: /ping 200"),
    ("deploy_cli", "deploy: CLI returns"),
    ("deploy_live", "deploy: first 200"),
    ("update_cli", "update: CLI returns"),
    ("update_live", "update: first new answer"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_project(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "handler.py").write_text(HANDLER.format(version=version))
    (folder / "kiln.yaml").write_text(CONFIG)
    return folder


class Poller:
    """From `start()`, asks `probe()` every POLL_S until it says done; records when.

    `probe` returns (done, failed): `failed` counts an answer that was not 200 (the
    requests an update failed). Bounded by LIVE_TIMEOUT_S."""

    def __init__(self, probe: Callable[[], tuple[bool, bool]], what: str) -> None:
        self.probe, self.what = probe, what
        self.started = 0.0
        self.done_at: float | None = None
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Poller:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:  # the command failed: stop asking
            self.stop.set()

    def _run(self) -> None:
        deadline = self.started + LIVE_TIMEOUT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                done, failed = self.probe()
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                done, failed = False, False  # not listening yet (or the route is not up)
            self.failed += failed
            if done:
                self.done_at = time.monotonic()
                return
            time.sleep(POLL_S)

    def seconds(self) -> float:
        """Seconds from start to the first done answer; raises if there was none in time."""
        self.thread.join(LIVE_TIMEOUT_S + 10)
        self.stop.set()
        if self.done_at is None:
            raise RuntimeError(f"{self.what}: no answer within {LIVE_TIMEOUT_S:g}s")
        return self.done_at - self.started


class Server:
    """`kiln server start` with its own KILN_HOME; every command is the real CLI."""

    def __init__(self, home: Path, flags: list[str], proxy: str | None) -> None:
        self.home = home
        self.flags = flags
        self.proxy = proxy  # Ray Serve's proxy: where the answers are read on Ray
        self.env = {**os.environ, "KILN_HOME": str(home), "COLUMNS": "200"}
        for name in ("KILN_URL", "KILN_ENV", "KILN_API_KEY"):
            self.env.pop(name, None)
        self.client = httpx.Client(timeout=10)

    def kiln(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*KILN, *args],
            cwd=self.home.parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kiln {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def info(self) -> dict[str, Any]:
        return json.loads((self.home / "server.json").read_text())

    def data_url(self) -> str:
        """Where answers are read: Serve's proxy on Ray, the server's own port locally."""
        return self.proxy or self.info()["url"]

    def key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    def start(self) -> dict[str, float]:
        def ping() -> tuple[bool, bool]:
            return self.client.get(f"{self.data_url()}/ping").status_code == 200, False

        poller = Poller(ping, "GET /ping after `kiln server start`").start()
        ports = ["--port", "0", "--management-port", "0", "--metrics-port", "0"]
        with poller:
            self.kiln("server", "start", *ports, *self.flags)
        cli = time.monotonic() - poller.started
        return {"start_cli": cli, "start_live": poller.seconds()}

    def deploy(self, folder: Path, version: str, prefix: str) -> dict[str, float]:
        """`kiln deploy` of `folder` (now answering `version`): CLI and first-answer seconds."""
        headers = {"x-api-key": self.key()}

        def answer() -> tuple[bool, bool]:
            r = self.client.post(f"{self.data_url()}{ENDPOINT}", json=1, headers=headers)
            if r.status_code != 200:
                return False, True
            return r.json().get("version") == version, False

        poller = Poller(answer, f"{version} through {ENDPOINT}").start()
        with poller:
            done = self.kiln("deploy", str(folder))
        cli = time.monotonic() - poller.started
        live = poller.seconds()
        if "is live" not in done.stdout:
            raise RuntimeError(f"`kiln deploy` did not say the API is live:\n{done.stdout}")
        return {f"{prefix}_cli": cli, f"{prefix}_live": live, f"{prefix}_failed": poller.failed}

    def endpoint(self) -> str:
        listed = json.loads(self.kiln("get", "-o", "json").stdout)
        return next(a["endpoint"] for a in listed["apis"] if a["name"] == "echo")

    def stop(self) -> None:
        self.client.close()
        try:
            pid = int(self.info()["pid"])
        except (OSError, ValueError, KeyError):
            return
        subprocess.run(
            [*KILN, "server", "stop"], env=self.env, capture_output=True, timeout=120, check=False
        )
        try:
            os.kill(pid, signal.SIGKILL)  # what `server stop` left, by its PID only
        except ProcessLookupError:
            pass


def one_round(server: Server, work: Path) -> dict[str, float]:
    """server start, first deploy, a rolling update; the server stopped at the end."""
    folder = write_project(work / "shop", "v1")
    try:
        row = server.start()
        row.update(server.deploy(folder, "v1", "deploy"))
        if (endpoint := server.endpoint()) != ENDPOINT:
            raise RuntimeError(f"the API's endpoint is {endpoint}, not {ENDPOINT}")
        row.update(server.deploy(write_project(folder, "v2"), "v2", "update"))
    finally:
        server.stop()
    return row


# ---- Ray ------------------------------------------------------------------------------


def clean_cluster() -> None:
    """What a round placed goes: Kiln's Serve applications (as the tests' teardown),
    then Serve itself and the control plane's log collector, so the next round's
    control plane starts on a cluster with nothing of Kiln's on it."""
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from kiln.backends.ray.telemetry import collector

    try:
        client = serve.context._get_global_client()
    except Exception:  # noqa: BLE001 - Serve never started: nothing placed
        client = None
    if client is not None:
        client.deploy_apps(ServeDeploySchema(applications=[]))
        deadline = time.monotonic() + 60
        while serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)
        left = list(serve.status().applications)
        serve.shutdown()
        if left:
            raise RuntimeError(f"Serve applications not removed within 60s: {left}")
    actor = collector()
    if actor is not None:
        ray.kill(actor)


def wipe(store_url: str) -> None:
    """An empty database for the next round's control plane (as the tests' fixture)."""
    import sqlalchemy as sa

    engine = sa.create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


def ray_rounds(args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    postgres = None if args.store else ThrowawayPostgres()
    store_url = args.store or postgres.url  # type: ignore[union-attr]
    rows: list[dict[str, float]] = []
    try:
        cluster = RayCluster(args.cpus_per_node)  # ray_batch's: a head on 127.0.0.1 ...
        try:
            cluster.add_node()  # ... and a second node, both alive
            for i in range(args.repeat):
                wipe(store_url)
                port = free_port()
                flags = ["--backend", "ray", "--ray-address", cluster.cluster.address]
                flags += ["--ray-http-port", str(port)]
                flags += ["--store", store_url.replace("postgresql+psycopg://", "postgresql://")]
                server = Server(work / f"ray-{i}" / "home", flags, f"http://127.0.0.1:{port}")
                try:
                    rows.append(one_round(server, work / f"ray-{i}"))
                finally:
                    clean_cluster()
                print(f"ray round {i + 1}: {fmt_round(rows[-1])}", flush=True)
        finally:
            cluster.stop()
    finally:
        if postgres is not None:
            postgres.stop()
    return rows


def local_rounds(args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    rows = []
    for i in range(args.repeat):
        rows.append(one_round(Server(work / f"local-{i}" / "home", [], None), work / f"local-{i}"))
        print(f"local round {i + 1}: {fmt_round(rows[-1])}", flush=True)
    return rows


# ---- the run ----------------------------------------------------------------------------


def fmt_round(row: dict[str, float]) -> str:
    return ", ".join(f"{key} {row[key]:.2f}s" for key, _ in ROWS)


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key, _ in ROWS:
        values = [r[key] for r in rows]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="kiln-ray-deploy-bench-"))
    result: dict[str, Any] = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "cpus_per_node": args.cpus_per_node,
        "backends": {},
    }
    try:
        for backend in args.backends:
            rounds = local_rounds(args, work) if backend == "local" else ray_rounds(args, work)
            result["backends"][backend] = {"rounds": rounds, "summary": summary(rounds)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def print_report(result: dict[str, Any]) -> None:
    backends = result["backends"]
    print(
        f"\n{result['repeat']} rounds per backend, {result['cpus']} cores on this machine; "
        f"seconds, median [min-max]"
    )
    names = list(backends)
    header = f"{'measurement':<27}" + "".join(f" {name:<20}" for name in names)
    if names == ["local", "ray"]:
        header += f" {'ray/local':>9}"
    print(header.rstrip())
    for key, label in ROWS:
        line = f"{label:<27}"
        for name in names:
            s = backends[name]["summary"][key]
            cell = f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"
            line += f" {cell:<20}"
        if names == ["local", "ray"]:
            ray, local = (backends[b]["summary"][key]["median"] for b in ("ray", "local"))
            line += f" {f'{ray / local:.1f}x':>9}"
        print(line.rstrip())
    for name in names:
        failed = sum(int(r["update_failed"]) for r in backends[name]["rounds"])
        first = sum(int(r["deploy_failed"]) for r in backends[name]["rounds"])
        print(
            f"{name}: non-200: {failed} during the updates, "
            f"{first} before the first deploys answered"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--backends", default="local,ray", help="comma-separated: local,ray")
    parser.add_argument("--store", help="PostgreSQL URL (wiped each round; default: throwaway)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    if not set(args.backends) <= {"local", "ray"} or args.repeat < 1:
        parser.error("--backends takes local and/or ray; --repeat at least 1")
    result = run(args)
    print_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray_deploy-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
