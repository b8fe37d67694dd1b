"""What a worker spends per request in `Worker.handle_batch`, in process, without a socket.

For tiny and mlp (bench/models.py) this loads the API as `kiln serve` does (a
project with an `onnx:` entry, `worker_spec_for`, `build_pipeline`: onnxruntime,
one thread), encodes a batch of `--batch` requests as the server encodes them
(native JSON bodies, KServe V1 instances, V2 JSON bodies), decodes the frame as
the worker does, and calls `Worker.handle_batch` on it: the best of `--rounds`
rounds of `--calls` calls, in microseconds per request. "model" is onnxruntime's
own `session.run` on the same rows, per row: what no worker can avoid.

This is the worker's share of the data plane's c=64 throughput
(docs/performance.md); bench/data_plane.py measures the whole path.

Run: .venv/bin/python bench/worker_batch.py [--batch 32] [--rounds 7] [--calls 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402

from kiln.config.loader import load_project  # noqa: E402
from kiln.handlers.pipeline import build_pipeline  # noqa: E402
from kiln.serving.ipc import decode_frame, encode_frame  # noqa: E402
from kiln.serving.messages import TO_WORKER, Batch  # noqa: E402
from kiln.serving.placement import worker_spec_for  # noqa: E402
from kiln.serving.replica import Replica  # noqa: E402
from kiln.serving.types import InferenceRequest  # noqa: E402
from kiln.serving.worker import Worker  # noqa: E402
from kiln.serving.worker_load import local_model  # noqa: E402


def requests(name: str, route: str, count: int) -> list[InferenceRequest]:
    """`count` requests of `route` as the server hands them to a replica."""
    out = []
    for i in range(count):
        common = {"api": name, "version": None, "request_id": f"r{i}"}
        if route == "native":
            out.append(InferenceRequest(**common, body=models.sample_body(name)))
        elif route == "v1":  # the server forwards each instance's bytes (kserve_v1.py)
            body = models.sample_body(name)
            out.append(InferenceRequest(**common, body=body, protocol="v1", kind="json"))
        else:  # a JSON-only V2 body is parsed in the worker (v2.py, kind="v2json")
            body = models.v2_body(name)
            out.append(
                InferenceRequest(
                    **common, body=body, protocol="v2", kind="v2json", want_tensors=True
                )
            )
    return out


def best_us(call, calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kiln-worker-batch-"))
    paths = models.build_all(root / "models")
    print(f"batch of {args.batch} requests; best of {args.rounds} x {args.calls} calls")
    print(f"{'model':<6}{'route':<8}{'us/request':>11}{'model us/row':>14}")
    for name in ("tiny", "mlp"):
        project = root / name
        project.mkdir()
        (project / f"{name}.onnx").write_bytes(paths[name].read_bytes())
        (project / "kiln.yaml").write_text(
            f"- kind: api\n  name: {name}\n  onnx:\n    model: {name}.onnx\n"
            "  batching: {max_batch_size: 64, max_batch_delay_ms: 2}\n"
            "  compute: {cpu: 1}\n"
        )
        (api,) = load_project(project).apis
        spec = worker_spec_for(api)
        spec.python_path = str(project)
        pipeline = build_pipeline(local_model(spec))
        worker = Worker(None, spec, pipeline)  # type: ignore[arg-type] - no channel needed
        session = models.session(paths[name])
        rows = models.sample_input(name, args.batch).astype(np.float32)
        model_us = best_us(lambda s=session, r=rows: s.run(None, {"x": r}), 50, args.rounds)
        for route in ("native", "v1", "v2"):
            items, buffers = Replica._encode(requests(name, route, args.batch))
            wire = b"".join(bytes(c) for c in encode_frame(Batch(1, items), buffers))
            message, views = decode_frame(wire[4:], TO_WORKER)
            reply, _ = worker.handle_batch(message, views)  # type: ignore[arg-type]
            failed = [item for item in reply.items if item.error is not None]
            if failed:
                raise SystemExit(f"{name} {route}: {failed[0].error}")
            per_batch = best_us(
                lambda w=worker, m=message, v=views: w.handle_batch(m, v),  # type: ignore[arg-type]
                args.calls,
                args.rounds,
            )
            print(
                f"{name:<6}{route:<8}{per_batch / args.batch:>11.1f}{model_us / args.batch:>14.1f}"
            )


if __name__ == "__main__":
    main()
