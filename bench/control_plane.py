"""The control plane's three clocks, against a real `kiln server` daemon on this machine.

Rows:
  deploy -> live (first)     `kiln deploy examples/iris-onnx` wall time: pack, upload,
                             extract, validate, start a replica, swap, report live
  deploy -> live (update)    the same for a changed project (a rolling update)
  deploy (unchanged)         redeploying the same content: the no-op path
  process + model load       limit: a worker's own start (python + onnxruntime + the model),
                             timed in-process by the worker (`load_s` in the API log)
  cold start from zero       request to first answer for the ONNX example scaled to zero
  warm request               the same request with a replica up (the floor)
  autoscaler: first step up  a step from 0 to 8 concurrent clients on a 50 ms handler
                             (target_replica_concurrency 1, window 10s): time to the first
                             scale-up decision, and to every requested replica ready

Run: .venv/bin/python bench/control_plane.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).parents[1]
KILN = [sys.executable, "-m", "kiln.cli.main"]
SAMPLE = orjson.loads((ROOT / "examples" / "iris-onnx" / "sample.json").read_bytes())


class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "KILN_HOME": str(home)}

    def kiln(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*KILN, *args], env=self.env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise SystemExit(f"kiln {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def start(self) -> None:
        self.kiln("server", "start", "--port", "0", "--management-port", "0", "--metrics-port", "0")
        info = orjson.loads((self.home / "server.json").read_bytes())
        self.url, self.management = info["url"], info["management_url"]
        # API keys are on, as for any user of `kiln server`: send the admin key.
        key = (self.home / "admin.key").read_text().strip()
        self.headers = {"Authorization": f"Bearer {key}"}

    def stop(self) -> None:
        subprocess.run([*KILN, "server", "stop"], env=self.env, capture_output=True, timeout=120)


def timed(action) -> float:  # noqa: ANN001
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def iris_project(folder: Path, extra: str = "") -> Path:
    shutil.copytree(ROOT / "examples" / "iris-onnx", folder, dirs_exist_ok=True)
    config = (folder / "kiln.yaml").read_text()
    (folder / "kiln.yaml").write_text(config + extra)
    return folder


def deploy_rows(d: Daemon, work: Path, repeat: int) -> list[tuple[str, list[float]]]:
    project = iris_project(work / "iris")
    first = [timed(lambda: d.kiln("deploy", str(project), "--name", "bench"))]
    updates, unchanged = [], []
    for i in range(repeat):
        with (project / "handler.py").open("a") as f:
            f.write(f"\n# revision {i}\n")
        updates.append(timed(lambda: d.kiln("deploy", str(project), "--name", "bench")))
        unchanged.append(timed(lambda: d.kiln("deploy", str(project), "--name", "bench")))
    d.kiln("delete", "iris", "-f")
    return [
        ("deploy -> live (first)", first),
        ("deploy -> live (update)", updates),
        ("deploy (unchanged)", unchanged),
    ]


def load_times(d: Daemon, api: str) -> list[float]:
    log = d.home / "logs" / f"{api}.log"
    out = []
    for line in log.read_bytes().splitlines():
        record = orjson.loads(line)
        message = str(record.get("message", ""))
        if "load_s=" in message:
            out.append(float(message.split("load_s=")[1].split()[0]))
    return out


def cold_start_rows(d: Daemon, work: Path, repeat: int) -> list[tuple[str, list[float]]]:
    extra = (
        "  compute: {min_replicas: 0, max_replicas: 1}\n"
        "  autoscaling: {idle_timeout: 1s, window: 10s, downscale_stabilization_period: 0s}\n"
    )
    project = iris_project(work / "cold", extra)
    d.kiln("deploy", str(project), "--name", "cold")
    url = f"{d.url}/iris"
    colds, warms = [], []
    with httpx.Client(timeout=120, headers=d.headers) as client:
        for _ in range(repeat):
            wait_for(lambda: api(d, "iris")["status"] == "scaled to zero", 60)
            colds.append(timed(lambda: ok(client.post(url, json=SAMPLE))))
            warms.append(
                statistics.median(
                    timed(lambda: ok(client.post(url, json=SAMPLE))) for _ in range(20)
                )
            )
    d.kiln("delete", "iris", "-f")
    return [("cold start from zero", colds), ("warm request", warms)]


def autoscaler_rows(d: Daemon, work: Path, repeat: int) -> list[tuple[str, list[float]]]:
    folder = work / "slow"
    folder.mkdir()
    (folder / "h.py").write_text(
        "import time\n\ndef predict(payload, context):\n    time.sleep(0.05)\n    return 1\n"
    )
    (folder / "kiln.yaml").write_text(
        "- kind: api\n  name: slow\n  python: {handler: h.py}\n"
        "  compute: {min_replicas: 1, max_replicas: 4, cpu: 0.25}\n"
        "  autoscaling:\n    target_replica_concurrency: 1\n    window: 10s\n"
        "    upscale_stabilization_period: 0s\n    downscale_stabilization_period: 0s\n"
    )
    d.kiln("deploy", str(folder))
    decide, ready = [], []
    for _ in range(repeat):
        wait_for(lambda: api(d, "slow")["replicas"]["requested"] == 1, 120)
        stop = threading.Event()

        def client(stop: threading.Event = stop) -> None:
            with httpx.Client(timeout=60, headers=d.headers) as c:
                while not stop.is_set():
                    c.post(f"{d.url}/slow", json=1)

        threads = [threading.Thread(target=client) for _ in range(8)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        wait_for(lambda: api(d, "slow")["replicas"]["requested"] > 1, 60)
        decide.append(time.perf_counter() - started)
        wait_for(
            lambda: (a := api(d, "slow")["replicas"])["ready"] == a["requested"] == a["max"], 60
        )
        ready.append(time.perf_counter() - started)
        stop.set()
        for t in threads:
            t.join()
    d.kiln("delete", "slow", "-f")
    return [
        ("autoscaler: first scale-up decision", decide),
        ("autoscaler: all replicas ready", ready),
    ]


def api(d: Daemon, name: str) -> dict:
    return httpx.get(f"{d.management}/apis/{name}", timeout=10, headers=d.headers).json()


def ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise SystemExit(f"request failed: {response.status_code} {response.text}")


def wait_for(check, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit("timed out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-cp-"))
    d = Daemon(work / "home")
    d.start()
    try:
        rows = deploy_rows(d, work, args.repeat)
        rows += cold_start_rows(d, work, args.repeat)
        loads = load_times(d, "iris")
        if loads:
            rows.insert(3, ("process + model load (limit)", loads))
        rows += autoscaler_rows(d, work, max(1, args.repeat // 2))
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'measurement':<38} {'median':>10} {'min':>10} {'max':>10} {'n':>4}")
    for name, values in rows:
        med, low, high = statistics.median(values), min(values), max(values)
        print(
            f"{name:<38} {med * 1000:>8.1f}ms {low * 1000:>8.1f}ms {high * 1000:>8.1f}ms "
            f"{len(values):>4}"
        )


if __name__ == "__main__":
    main()
