"""Test support: tiny models built here, and `kiln serve` run as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

KILN = [sys.executable, "-m", "kiln.cli.main"]


def build_linear_onnx(path: Path, weights: np.ndarray, input_name: str = "x") -> Path:
    """y = x @ W for x [N, in]; W is float32 [in, out]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", weights.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["y"])], "lin", [x], [y], [w]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def build_two_input_onnx(path: Path) -> Path:
    """sum = a + b (float32 [N, 3]), idx = int64 [N, 2] doubled: exercises names and int dtypes."""
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    i = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 2])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3])
    d = helper.make_tensor_value_info("doubled", TensorProto.INT64, ["N", 2])
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Add", ["idx", "idx"], ["doubled"]),
    ]
    graph = helper.make_graph(nodes, "two", [a, b, i], [s, d])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class KilnServer:
    """`kiln serve` in a subprocess on a free port, with its own KILN_HOME."""

    def __init__(
        self,
        project: Path,
        home: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.project = project
        self.home = home
        self.state = home / "state"
        self.log_path = home / "serve.out"
        home.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "KILN_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
        self._out = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *KILN,
                "serve",
                str(project),
                "--port",
                "0",
                "--management-port",
                "0",
                "--metrics-port",
                "0",
                "--home",
                str(self.state),
                *(extra_args or []),
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        self.url = self._wait_for_url()
        info = orjson.loads((self.state / "server.json").read_bytes())
        self.management_url: str | None = info.get("management_url")
        self.metrics_url: str | None = info.get("metrics_url")
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def _wait_for_url(self, timeout: float = 60) -> str:
        info_path = self.state / "server.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if info_path.exists():
                try:
                    return orjson.loads(info_path.read_bytes())["url"]
                except (orjson.JSONDecodeError, KeyError):
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited early:\n{self.output()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"kiln serve did not start in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log_path.read_text(errors="replace")

    def api_log(self, api: str, until: Any = None, timeout: float = 5) -> list[dict[str, Any]]:
        """The API's log records; with `until`, poll until until(records) is true.

        Records are flushed a few times a second, so a test waits for the ones it expects.
        """
        path = self.state / "logs" / f"{api}.log"
        deadline = time.monotonic() + timeout
        while True:
            records = []
            if path.exists():
                lines = path.read_bytes().splitlines()
                records = [orjson.loads(line) for line in lines if line.strip()]
            if until is None or until(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """Children of the server process, read from /proc (no procps needed)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                children.append(int(stat.parent.name))
        return children

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.proc.returncode
