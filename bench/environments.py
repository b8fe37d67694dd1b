"""Python environments (kiln.environments): how long a requirements.txt takes at deploy.

Measures `Environments.ensure` directly (the step a deploy runs before loading),
in a temporary KILN_ENVS_DIR, for:

- cold:      a small package the server lacks (tabulate), never built here before
             (uv's own download cache stays warm after the first run: see --cold-uv)
- reused:    the same requirements again (another revision or API): found, not rebuilt
- server's:  numpy + torch, which the server already has: resolved locally, nothing installed
- offline:   a wheel built here, from a --find-links folder with UV_OFFLINE=1

    .venv/bin/python bench/environments.py [--repeat 5] [--cold-uv]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed(envs: object, folder: Path) -> float:
    started = time.perf_counter()
    envs.ensure(folder)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--cold-uv", action="store_true", help="an empty uv cache per cold build (downloads)"
    )
    args = parser.parse_args()
    from test_environments import tiny_wheel

    from kiln.environments import Environments

    rows: dict[str, list[float]] = {"cold": [], "reused": [], "server's": [], "offline": []}
    with tempfile.TemporaryDirectory(prefix="kiln-env-bench-") as tmp:
        base = Path(tmp)
        wheels = tiny_wheel(base / "wheels").parent
        for i in range(args.repeat):
            envs = Environments(base / f"envs-{i}")
            if args.cold_uv:
                os.environ["UV_CACHE_DIR"] = str(base / f"uv-cache-{i}")
            # A comment line makes each run's key new: a cold build every time.
            small = base / f"small-{i}"
            small.mkdir()
            (small / "requirements.txt").write_text(f"# run {i}\ntabulate\n")
            rows["cold"].append(timed(envs, small))
            rows["reused"].append(timed(Environments(envs.root), small))
            own = base / f"own-{i}"
            own.mkdir()
            (own / "requirements.txt").write_text(f"# run {i}\nnumpy\ntorch\n")
            rows["server's"].append(timed(envs, own))
            offline = base / f"offline-{i}"
            offline.mkdir()
            (offline / "requirements.txt").write_text(f"# run {i}\nkiln-offline-demo\n")
            saved = {k: os.environ.get(k) for k in ("UV_FIND_LINKS", "UV_OFFLINE")}
            os.environ.update(UV_FIND_LINKS=str(wheels), UV_OFFLINE="1")
            rows["offline"].append(timed(envs, offline))
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            os.environ.pop("UV_CACHE_DIR", None) if args.cold_uv else None
    print(
        f"Python environments, {args.repeat} runs each (milliseconds; uv cache "
        f"{'empty per run' if args.cold_uv else 'warm'})"
    )
    print(f"{'case':<10} {'median':>9} {'min':>9} {'max':>9}")
    for case, values in rows.items():
        ms = [v * 1000 for v in values]
        print(f"{case:<10} {statistics.median(ms):>9.1f} {min(ms):>9.1f} {max(ms):>9.1f}")


if __name__ == "__main__":
    main()
