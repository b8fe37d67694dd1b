"""`kiln serve`'s logs as a person and a machine read them, and its banner's hints.

On a terminal: request lines and multi-line tracebacks as text; in a pipe and in the
log files: JSON lines. `--home` keeps the logs folder and the banner says where;
without it the banner says the logs are temporary. The banner's curl sends
sample.json only when it exists and still fits the handler."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from support import KILN, write

from kiln.cli.scaffold import create_project, stale_template_sample
from kiln.cli.serve_cmd import try_line

HANDLER = """
class Model:
    def load(self, model_dir, config):
        pass

    def predict(self, payload, context):
        if payload == "boom":
            return helper_that_fails()
        return {"echo": payload}


def helper_that_fails():
    raise ValueError("this handler failed on purpose")
"""


def _project(folder: Path) -> Path:
    write(folder / "kiln.yaml", "- kind: api\n  name: noisy\n  python: {handler: h.py:Model}\n")
    write(folder / "h.py", HANDLER)
    return folder


def _serve(project: Path, home: Path | None, stdout: int, stderr: int) -> subprocess.Popen:
    args = [*KILN, "serve", str(project), "--port", "0", "--management-port", "0"]
    args += ["--metrics-port", "0"]
    if home is not None:
        args += ["--home", str(home)]
    env = {**os.environ, "KILN_HOME": str(project / "kiln-home"), "COLUMNS": "200"}
    return subprocess.Popen(args, stdout=stdout, stderr=stderr, env=env, start_new_session=True)


class _Terminal:
    """A pseudo-terminal for the server's stdout and stderr, read as it writes."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.text = ""

    def read_until(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while needle not in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self.text) and (
            time.monotonic() < deadline
        ):
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.text += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self.text)  # rich's colours
        assert needle in plain, f"{needle!r} not in:\n{plain}"
        return plain


def _url(text: str) -> str:
    return text.split("Kiln is serving on ")[1].split()[0]


def _post(url: str, body: object) -> int:
    import httpx

    return httpx.post(url, json=body, timeout=30).status_code


def test_on_a_terminal_requests_and_tracebacks_are_text_and_home_keeps_logs(
    tmp_path: Path,
) -> None:
    project, home = _project(tmp_path / "p"), tmp_path / "home"
    term = _Terminal()
    server = _serve(project, home, term.slave, term.slave)
    try:
        text = term.read_until("status and signature")
        logs = (home / "logs").resolve()
        assert f"Logs: {logs} (kept after Kiln stops)" in text.replace("\r\n", " ")
        # No sample.json here: the hint is the API's status, never a file it lacks.
        assert "-d @sample.json" not in text and "has no sample.json" in text
        url = _url(text)
        assert _post(f"{url}/noisy", "hi") == 200
        assert _post(f"{url}/noisy", "boom") == 500
        term.read_until("this handler failed on purpose")
        # The request line is written when the answer is, after the worker's traceback.
        text = term.read_until("POST /noisy 500")
        lines = text.replace("\r\n", "\n").splitlines()
        assert any("POST /noisy 200" in line and "ms" in line for line in lines), text
        assert any("POST /noisy 500" in line for line in lines), text
        assert not any(line.lstrip().startswith('{"ts"') for line in lines), text
        # The traceback is several lines, each frame on its own, as Python prints it.
        assert any("Traceback (most recent call last)" in line for line in lines), text
        frames = [line for line in lines if 'File "' in line and "h.py" in line]
        assert len(frames) >= 2, text
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
        os.close(term.master)
        os.close(term.slave)
    records = [orjson.loads(line) for line in (logs / "noisy.log").read_text().splitlines()]
    assert any(r.get("event") == "request" and r.get("status") == 500 for r in records)


def test_in_a_pipe_logs_are_json_and_the_banner_says_they_are_temporary(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    server = _serve(project, None, subprocess.PIPE, subprocess.PIPE)
    out = b""
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 60
        while b"Press Ctrl-C" not in out and time.monotonic() < deadline:
            out += server.stdout.read1(65536)  # type: ignore[attr-defined]
        text = out.decode()
        assert "(temporary: removed when Kiln stops; --home DIR keeps them)" in text
        logs = Path(text.split("Logs: ")[1].split(" (temporary")[0])
        assert _post(f"{_url(text)}/noisy", "hi") == 200
    finally:
        os.killpg(server.pid, signal.SIGINT)
        _, err = server.communicate(timeout=60)
    requests = [
        orjson.loads(line)
        for line in err.decode().splitlines()
        if line.startswith("{") and '"request"' in line
    ]
    assert requests and requests[0]["status"] == 200 and requests[0]["path"] == "/noisy"
    assert not logs.exists()  # temporary, as the banner said


def test_a_template_sample_beside_another_handler_is_not_suggested(tmp_path: Path) -> None:
    project = tmp_path / "my-api"
    create_project(project, "python", name="my-api")
    assert not stale_template_sample(project)  # as created: the iris sample fits
    moved = tmp_path / "renamed"
    project.rename(moved)  # a renamed folder keeps its template handler
    assert not stale_template_sample(moved)
    assert "-d @" in try_line("http://h", "/my-api", moved)

    write(moved / "src" / "handler.py", HANDLER)  # the user's own handler now
    assert stale_template_sample(moved)
    line = try_line("http://h", "/my-api", moved)
    assert (
        "sample.json" in line
        and "-d @" not in line
        and line.startswith("Try: curl http://h/my-api")
    )

    write(moved / "sample.json", '"hi"')  # the user's own sample is suggested again
    assert not stale_template_sample(moved)
    assert "-d @" in try_line("http://h", "/my-api", moved)


@pytest.mark.parametrize("template", ["python", "onnx"])
def test_every_template_sample_fits_its_own_handler(tmp_path: Path, template: str) -> None:
    project = tmp_path / "p"
    create_project(project, template, name="p")
    assert not stale_template_sample(project)
