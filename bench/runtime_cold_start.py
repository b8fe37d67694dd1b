"""Cold start and memory per runtime: `kiln serve` start -> first answer, and one replica's RSS.

For each runtime a tiny model is built in a temporary folder and served alone
(one API, one replica, `compute.cpu: 1`). The clock starts just before
`kiln serve` is spawned and stops at the first 200 answer to a real request
(the server binds its port before loading, and requests that arrive during the
load wait for it, so this is what a client sees). Memory is the resident set
(VmRSS) of the replica's worker process after a few requests, and of the
server process for comparison.

Rows: python (an echo handler: Kiln's own floor), onnx, torch (TorchScript),
torch (torch.export), sklearn (skops, and a trusted joblib file), tensorflow
(SavedModel), and the Hugging Face example (all-MiniLM-L6-v2 through
transformers).

With --sandbox every row is measured twice: `kiln serve` and `kiln serve --sandbox`
(bubblewrap namespaces, setpriv to a dedicated uid when root; see docs/architecture.md
"Where user code runs"), their cold starts interleaved (plain then sandboxed, then the
other way round). The worker's RSS is then that of the Python worker process found among
the server's descendants (bubblewrap puts it two levels down), and the RSS of the whole
worker tree (bubblewrap's own processes included) is shown beside it.

Run: .venv/bin/python bench/runtime_cold_start.py [--runs 3] [--only onnx,torch-script]
     [--sandbox]
Needs the extras of the runtimes it measures; a runtime whose framework is
missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).parents[1]
ROW = [5.1, 3.5, 1.4, 0.2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def yaml(name: str, block: str) -> str:
    return f"- kind: api\n  name: {name}\n{block}  compute:\n    cpu: 1\n"


def build_python(folder: Path) -> str:
    (folder / "echo.py").write_text("def predict(payload, context):\n    return payload\n")
    return yaml("m", "  python:\n    handler: echo.py:predict\n")


def build_onnx(folder: Path) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).random((4, 3), np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    return yaml("m", "  onnx:\n    model: model.onnx\n")


def _torch_net() -> object:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def build_torch_script(folder: Path) -> str:
    import torch

    torch.jit.script(_torch_net().eval()).save(str(folder / "model.ts"))
    return yaml("m", "  torch:\n    model: model.ts\n")


def build_torch_export(folder: Path) -> str:
    import torch

    batch = torch.export.Dim("batch")
    program = torch.export.export(
        _torch_net().eval(), (torch.randn(2, 4),), dynamic_shapes={"input": {0: batch}}
    )
    torch.export.save(program, str(folder / "model.pt2"))
    return yaml("m", "  torch:\n    model: model.pt2\n")


def build_sklearn(folder: Path) -> str:
    import skops.io as sio
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    sio.dump(LogisticRegression(max_iter=500).fit(x, y), folder / "model.skops")
    return yaml("m", "  sklearn:\n    model: model.skops\n")


def build_sklearn_joblib(folder: Path) -> str:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), folder / "model.joblib")
    return yaml("m", "  sklearn:\n    model: model.joblib\n    trusted: true\n")


def build_tensorflow(folder: Path) -> str:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.random.default_rng(0).random((4, 3), np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(x, self.w)}

    model = Model()
    tf.saved_model.save(model, str(folder / "saved"), signatures={"serving_default": model.serve})
    return yaml("m", "  tensorflow:\n    model: saved\n")


def build_hf(folder: Path) -> str:
    shutil.rmtree(folder)
    shutil.copytree(
        ROOT / "examples" / "hf-embeddings", folder, ignore=shutil.ignore_patterns("model")
    )
    subprocess.run([sys.executable, "build_model.py"], cwd=folder, check=True, capture_output=True)
    return (folder / "kiln.yaml").read_text().replace("name: embeddings", "name: m")


# name -> (builder, framework module needed, request body)
RUNTIMES: dict[str, tuple[Callable[[Path], str], str | None, object]] = {
    "python (echo)": (build_python, None, ROW),
    "onnx": (build_onnx, "onnxruntime", [ROW]),
    "torch (TorchScript)": (build_torch_script, "torch", [ROW]),
    "torch (torch.export)": (build_torch_export, "torch", [ROW]),
    "sklearn (skops)": (build_sklearn, "skops", [ROW]),
    "sklearn (joblib, trusted)": (build_sklearn_joblib, "sklearn", [ROW]),
    "tensorflow (SavedModel)": (build_tensorflow, "tensorflow", [ROW]),
    "hf example (MiniLM-L6)": (build_hf, "transformers", "A man is playing a guitar."),
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def worker_memory(server_pid: int) -> tuple[float, float]:
    """(RSS of the worker process, RSS of its whole tree incl. bubblewrap) in MiB."""
    tree = descendants(server_pid)
    workers = [p for p in tree if comm(p) not in ("bwrap", "sh", "setpriv")]
    worker = max((rss_mib(p) for p in workers), default=float("nan"))
    total = sum(rss_mib(p) for p in tree) if tree else float("nan")
    return worker, total


def measure(
    project: Path, body: object, home: Path, sandbox: bool = False
) -> tuple[float, float, float, float]:
    """(seconds to the first answer, worker RSS, worker tree RSS, server RSS in MiB)."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KILN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "kiln.cli.main", "serve", str(project), "--port", str(port)]
    command += ["--management-port", "0", "--metrics-port", "0", "--grpc-port", "0"]
    command += ["--home", str(home / "state")]
    command += ["--sandbox"] if sandbox else []
    log = open(home / "serve.out", "wb")  # noqa: SIM115
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                try:
                    response = client.post("/m", json=body)
                except httpx.TransportError:
                    if proc.poll() is not None or time.perf_counter() - started > 300:
                        raise RuntimeError((home / "serve.out").read_text()) from None
                    time.sleep(0.01)
                    continue
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                break
            cold = time.perf_counter() - started
            for _ in range(20):
                client.post("/m", json=body).raise_for_status()
        worker_rss, tree_rss = worker_memory(proc.pid)
        return cold, worker_rss, tree_rss, rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def print_table(rows: list) -> None:
    print("| runtime | cold start, median (min-max) | worker RSS | server RSS |")
    print("|---|---|---|---|")
    for name, runs in rows:
        colds = [r[0] for r in runs[False]]
        print(
            f"| {name} | {statistics.median(colds):.2f} s ({min(colds):.2f}-{max(colds):.2f}) | "
            f"{statistics.median(r[1] for r in runs[False]):.0f} MiB | "
            f"{statistics.median(r[3] for r in runs[False]):.0f} MiB |"
        )


def mib_delta(delta: float) -> str:
    return "±0" if abs(delta) < 0.5 else f"{delta:+.0f}"


def print_sandbox_table(rows: list) -> None:
    print(
        "| runtime | cold start, plain | cold start, sandboxed | delta | worker RSS, plain |"
        " worker RSS, sandboxed | sandboxed tree RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows:
        plain, sbx = runs[False], runs[True]
        cp, cs = [r[0] for r in plain], [r[0] for r in sbx]
        wp = statistics.median(r[1] for r in plain)
        ws = statistics.median(r[1] for r in sbx)
        ts = statistics.median(r[2] for r in sbx)
        delta = statistics.median(cs) - statistics.median(cp)
        print(
            f"| {name} | {statistics.median(cp):.2f} s ({min(cp):.2f}-{max(cp):.2f}) "
            f"| {statistics.median(cs):.2f} s ({min(cs):.2f}-{max(cs):.2f}) "
            f"| {delta:+.2f} s ({delta / statistics.median(cp):+.0%}) "
            f"| {wp:.0f} MiB | {ws:.0f} MiB ({mib_delta(ws - wp)}) | {ts:.0f} MiB |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts per runtime")
    parser.add_argument("--only", default="", help="comma-separated prefixes of row names")
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="also measure `kiln serve --sandbox`, interleaved with the plain cold starts",
    )
    # SIGTERM (a background run has SIGINT ignored) unwinds too: servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parser.parse_args()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; runs: {args.runs}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    modes = [False, True] if args.sandbox else [False]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-cold-") as tmp:
        for name, (build, framework, body) in RUNTIMES.items():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            if framework and importlib.util.find_spec(framework) is None:
                print(f"skipping {name}: {framework} is not installed")
                continue
            project = Path(tmp) / name.split()[0] / str(len(rows))
            project.mkdir(parents=True)
            (project / "kiln.yaml").write_text(build(project))
            runs: dict[bool, list] = {m: [] for m in modes}
            for run in range(args.runs):
                for sandbox in modes if run % 2 == 0 else modes[::-1]:
                    tag = "sbx" if sandbox else "plain"
                    home = Path(tmp) / f"home-{len(rows)}-{run}-{tag}"
                    runs[sandbox].append(measure(project, body, home, sandbox))
            rows.append((name, runs))
            for sandbox in modes:
                label = " (sandboxed)" if sandbox else ""
                colds = ", ".join(f"{r[0]:.2f}" for r in runs[sandbox])
                print(f"  {name}{label}: {colds} s", flush=True)
    print()
    print_table(rows)
    if args.sandbox:
        print()
        print_sandbox_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
