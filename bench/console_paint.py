"""The console's first paint with many APIs (issue 18: under 300 ms with 50 APIs).

Starts `kiln serve` on a generated project of N small Python APIs (an echo handler,
quick to load), waits for every API to be live, sends each a few requests (so the
table has numbers), then measures:

  GET /apis (REST)       what the overview reads: the limit the console adds to
  GET /console (server)  the overview's HTML, client wall time on loopback
  first paint (browser)  chromium's first-contentful-paint of /console, a fresh
                         browser context per run (no cache), through Playwright

Each is the median (and p90) of --runs runs. Needs chromium (/usr/bin/chromium) and
playwright (the `test` extra).

Run: .venv/bin/python bench/console_paint.py [--apis 50] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

KILN = [sys.executable, "-m", "kiln.cli.main"]
CHROMIUM = "/usr/bin/chromium"
HANDLER = """
class Echo:
    def predict(self, payload, context):
        return {"echo": payload}
"""


def project(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "h.py").write_text(HANDLER)
    apis = "".join(
        f"- kind: api\n  name: api-{i:02d}\n  python: {{handler: h.py:Echo}}\n" for i in range(n)
    )
    (folder / "kiln.yaml").write_text(apis)


def start(folder: Path, home: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    state = home / "state"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KILN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = open(home / "serve.out", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [*KILN, "serve", str(folder), "--port", "0", "--management-port", "0"]
        + ["--metrics-port", "0", "--grpc-port", "0", "--home", str(state)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (state / "server.json").exists():
            info = orjson.loads((state / "server.json").read_bytes())
            if info.get("management_url"):
                return proc, info
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited: see {home / 'serve.out'}")
        time.sleep(0.2)
    raise SystemExit("kiln serve did not start in 120 s")


def wait_live(management: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apis = httpx.get(f"{management}/apis", timeout=30).json()["apis"]
        if len(apis) == n and all(a["status"] == "live" for a in apis):
            return
        time.sleep(1)
    raise SystemExit(f"the {n} APIs were not all live in {timeout:.0f} s")


def timed(get: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        response = get()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, response.text[:300]
    return out


def first_paints(url: str, runs: int) -> tuple[list[float], list[float]]:
    """(first-contentful-paint, responseEnd) in ms from navigation start, per run."""
    from playwright.sync_api import sync_playwright

    paints, responses = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for i in range(runs + 1):
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(url, wait_until="load")
            fcp = None
            for _ in range(100):  # polled: the page's CSP refuses wait_for_function's eval
                fcp = page.evaluate(
                    "performance.getEntriesByName('first-contentful-paint')[0]?.startTime"
                )
                if fcp is not None:
                    break
                page.wait_for_timeout(20)
            assert fcp is not None, "no first-contentful-paint entry"
            end = page.evaluate("performance.getEntriesByType('navigation')[0].responseEnd")
            context.close()
            if i:  # the first run warms chromium itself up
                paints.append(float(fcp))
                responses.append(float(end))
        browser.close()
    return paints, responses


def row(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"| {name} | {statistics.median(values):.1f} | {p90:.1f} | {min(values):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--apis", type=int, default=50)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit("chromium is missing: apt-get install chromium")
    tmp = Path(tempfile.mkdtemp(prefix="kiln-paint-"))
    project(tmp / "project", args.apis)
    started = time.monotonic()
    proc, info = start(tmp / "project", tmp / "home")
    try:
        management, url = info["management_url"], info["url"]
        wait_live(management, args.apis)
        ready_s = time.monotonic() - started
        with httpx.Client(timeout=30) as client:
            for i in range(args.apis):
                for _ in range(3):
                    client.post(f"{url}/api-{i:02d}", json="hi")
            rest = timed(lambda: client.get(f"{management}/apis"), args.runs)
            client.get(f"{management}/console")  # the anonymous session's cookie
            html = client.get(f"{management}/console")
            server = timed(lambda: client.get(f"{management}/console"), args.runs)
        paints, responses = first_paints(f"{management}/console", args.runs)
        rows = html.text.count("<tr>") - 1
        print(
            f"\n{args.apis} APIs live in {ready_s:.0f} s; /console is {len(html.content)} bytes, "
            f"{rows} rows; {args.runs} runs each, ms\n"
        )
        print("| measure | median | p90 | min |\n|---|---|---|---|")
        print(row("GET /apis (REST, what the overview reads)", rest))
        print(row("GET /console (server, client wall time)", server))
        print(row("navigation responseEnd (browser)", responses))
        print(row("first-contentful-paint (browser)", paints))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
