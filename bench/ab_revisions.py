"""Two revisions of Kiln on one route at once, loaded in alternating rounds: which is faster?

A change worth a few percent cannot be seen by running bench/data_plane.py before
and after it on a shared VM: the same build moves up to 30% between runs minutes
apart. Here both revisions serve the same model at the same time (`kiln serve`,
each from its own copy of `src/`, one replica, batching 64 rows / 2 ms as in the
issue-13 targets), and short rounds of the C load generator alternate between
them (A then B, then B then A, ...), so drift falls on both. The table gives each
round's req/s, B/A per round, the medians and how many rounds B won.

    .venv/bin/python bench/ab_revisions.py A B [--model mlp] [--route native|v1|v2]
        [--concurrency 64] [--seconds 3] [--rounds 6]

A and B are git revisions (`HEAD~1`, a commit id) or `work` (the working tree's
src/). Each server imports its revision's `kiln` (PYTHONPATH), as do its workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
import models  # noqa: E402
from data_plane import Server, free_port, kiln_yaml, wait_ready  # noqa: E402

BODIES = {"native": models.sample_body, "v1": models.v1_body, "v2": models.v2_body}


def checkout(revision: str, into: Path) -> Path:
    """The revision's src/ copied into `into`; its path (for PYTHONPATH)."""
    into.mkdir(parents=True)
    if revision == "work":
        shutil.copytree(ROOT / "src", into / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    else:
        archive = subprocess.run(
            ["git", "archive", revision, "src"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def serve(src: Path, folder: Path, model: Path, name: str) -> tuple[Server, str]:
    project = folder / "project"
    project.mkdir(parents=True)
    shutil.copy(model, project / f"{name}.onnx")
    batching = {"max_batch_size": 64, "max_batch_delay_ms": 2}
    (project / "kiln.yaml").write_text(kiln_yaml(name, batching, 1))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src), "KILN_HOME": str(folder / "home")}
    server = Server(
        [sys.executable, "-m", "kiln.cli.main", "serve", str(project), "--port", str(port)]
        + ["--management-port", "0", "--metrics-port", "0", "--grpc-port", "0"]
        + ["--home", str(folder / "state")],
        folder / "serve.log",
        env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(server, base)
    return server, base


def url(base: str, route: str, model: str) -> str:
    return {
        "native": f"{base}/{model}",
        "v1": f"{base}/v1/models/{model}:predict",
        "v2": f"{base}/v2/models/{model}/infer",
    }[route]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="revision A: a git revision or 'work'")
    parser.add_argument("b", help="revision B: a git revision or 'work'")
    parser.add_argument("--model", default="mlp", choices=["tiny", "mlp"])
    parser.add_argument("--route", default="native", choices=list(BODIES))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    body = BODIES[args.route](args.model)
    with tempfile.TemporaryDirectory(prefix="kiln-ab-") as tmp:
        root = Path(tmp)
        model = models.build_all(root / "models")[args.model]
        servers: dict[str, tuple[Server, str]] = {}
        try:
            for side, revision in (("A", args.a), ("B", args.b)):
                src = checkout(revision, root / side)
                servers[side] = serve(src, root / f"run-{side}", model, args.model)
            rates: dict[str, list[float]] = {"A": [], "B": []}
            print(f"{args.model} {args.route} c={args.concurrency}: A={args.a} B={args.b}")
            print(f"{'round':>5} {'A req/s':>10} {'B req/s':>10} {'B/A':>6}")
            for turn in range(args.rounds):
                order = ("A", "B") if turn % 2 == 0 else ("B", "A")
                for side in order:
                    target = url(servers[side][1], args.route, args.model)
                    result = loadgen.run_load(target, body, args.concurrency, args.seconds)
                    if result.get("errors"):
                        raise SystemExit(f"{side}: {result['errors']} errors; see its serve.log")
                    rates[side].append(float(result["rps"]))
                a, b = rates["A"][-1], rates["B"][-1]
                print(f"{turn + 1:>5} {a:>10,.0f} {b:>10,.0f} {b / a:>6.3f}", flush=True)
            a_med, b_med = statistics.median(rates["A"]), statistics.median(rates["B"])
            wins = sum(b > a for a, b in zip(rates["A"], rates["B"], strict=True))
            print(f"median {a_med:>9,.0f} {b_med:>10,.0f} {b_med / a_med:>6.3f}")
            print(f"B faster in {wins} of {args.rounds} rounds")
        finally:
            for server, _ in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
