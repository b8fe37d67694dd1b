"""The CLI as a new user runs it: init, validate, serve, predict, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
from support import KILN, KilnServer, write


def kiln(*args: str, cwd: Path, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILN_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [*KILN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_init_serve_predict_as_a_new_user(tmp_path: Path) -> None:
    home = tmp_path / "home"
    created = kiln("init", "my-api", cwd=tmp_path, home=home)
    assert created.returncode == 0, created.stderr
    assert "kiln serve" in created.stdout
    project = tmp_path / "my-api"
    for name in ("kiln.yaml", "src/handler.py", "requirements.txt", "Dockerfile", ".dockerignore"):
        assert (project / name).is_file(), name

    again = kiln("init", "my-api", cwd=tmp_path, home=home)
    assert again.returncode == 2
    assert "already exists" in again.stderr

    checked = kiln("validate", cwd=project, home=home)
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout

    # `kiln serve` from inside the project, on a free port, found by `kiln predict` by name.
    env = {**os.environ, "KILN_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [*KILN, "serve", "--port", "0", "--management-port", "0", "--metrics-port", "0"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        pointer = home / "serve.json"
        deadline = time.monotonic() + 60
        while not pointer.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert pointer.exists(), proc.stdout.read() if proc.poll() is not None else "no serve.json"
        url = orjson.loads(pointer.read_bytes())["url"]

        answer = kiln("predict", "my-api", "sample.json", cwd=project, home=home)
        assert answer.returncode == 0, answer.stderr
        body = orjson.loads(answer.stdout)
        assert [p["label"] for p in body["predictions"]] == ["setosa", "virginica"]

        inline = kiln(
            "predict",
            f"{url}/my-api",
            '{"inputs": [[5.1, 3.5, 1.4, 0.2]]}',
            cwd=tmp_path,
            home=home,
        )
        assert orjson.loads(inline.stdout)["predictions"][0]["label"] == "setosa"

        bad = kiln("predict", "my-api", '{"inputs": [[1, 2]]}', cwd=project, home=home)
        assert bad.returncode == 1
        assert "400 InvalidInput" in bad.stderr

        missing = kiln("predict", "no-such-api", "[1]", cwd=project, home=home)
        assert missing.returncode == 2
        assert "no API named 'no-such-api'" in missing.stderr and "my-api" in missing.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "my-api" in out and url in out  # the table of APIs with their URLs
    assert not (home / "serve.json").exists()


def test_onnx_template_validates_and_serves(tmp_path: Path, serve_project) -> None:
    home = tmp_path / "home"
    assert kiln("init", "clf", "--template", "onnx", cwd=tmp_path, home=home).returncode == 0
    server = serve_project(tmp_path / "clf")
    body = server.client.post("/clf", json={"inputs": [[6.3, 3.3, 6.0, 2.5]]}).json()
    assert body["predictions"][0]["label"] == "virginica"


def test_bad_config_stops_before_listening_and_names_file_field_and_fix(tmp_path: Path) -> None:
    write(tmp_path / "kiln.yaml", "- kind: api\n  name: iris\n  onnx:\n    modle: m.onnx\n")
    for command in (["serve", "--port", "0"], ["validate"]):
        result = kiln(*command, cwd=tmp_path, home=tmp_path / "home")
        assert result.returncode == 2
        assert "kiln.yaml:4" in result.stderr
        assert "modle" in result.stderr and "'model'" in result.stderr
    assert not (tmp_path / "home" / "serve.json").exists()


def test_serve_refuses_a_public_host_without_auth(tmp_path: Path) -> None:
    result = kiln("serve", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path, home=tmp_path)
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0" in result.stderr


def test_busy_port_is_a_clear_error(tmp_path: Path, serve_project) -> None:
    write(tmp_path / "p" / "h.py", "def predict(payload, context):\n    return payload\n")
    write(tmp_path / "p" / "kiln.yaml", "- kind: api\n  name: echo\n  python:\n    handler: h.py\n")
    server = serve_project(tmp_path / "p")
    port = server.url.rsplit(":", 1)[1]
    result = kiln(
        "serve",
        str(tmp_path / "p"),
        "--port",
        port,
        "--management-port",
        "0",
        "--metrics-port",
        "0",
        cwd=tmp_path,
        home=tmp_path / "h",
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


SLOW = """
import time

def predict(payload, context):
    time.sleep(payload)
    return {"slept": payload}
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_finishes_in_flight_requests_and_leaves_no_workers(tmp_path: Path, sig) -> None:
    write(tmp_path / "p" / "slow.py", SLOW)
    write(
        tmp_path / "p" / "kiln.yaml", "- kind: api\n  name: slow\n  python:\n    handler: slow.py\n"
    )
    server = KilnServer(tmp_path / "p", tmp_path / "home")
    workers = server.worker_pids()
    assert len(workers) == 1
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(r=server.client.post("/slow", json=1.5)))
    thread.start()
    time.sleep(0.5)
    if sig == signal.SIGINT:  # Ctrl-C in a terminal reaches the whole process group
        os.killpg(server.proc.pid, signal.SIGINT)
    code = server.stop(sig)
    thread.join(10)
    assert result["r"].status_code == 200
    assert result["r"].json() == {"slept": 1.5}
    assert code == 0
    assert "Kiln stopped" in server.output()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), "worker outlived the server"


def test_get_and_logs_show_what_the_server_is_doing(tmp_path: Path) -> None:
    write(tmp_path / "p" / "h.py", "def predict(payload, context):\n    return payload\n")
    write(
        tmp_path / "p" / "kiln.yaml",
        "- kind: api\n  name: echo\n  python:\n    handler: h.py\n"
        "  tracker: {model_type: classification}\n",
    )
    server = KilnServer(tmp_path / "p", tmp_path / "home")
    try:
        for body in ["x", "x", "y"]:
            server.client.post("/echo", json=body, headers={"X-Request-ID": f"req-{body}"})
        server.client.post("/echo", content=b"{bad")
        listing = kiln("get", "-o", "json", cwd=tmp_path, home=server.state)
        assert listing.returncode == 0, listing.stderr
        echo = orjson.loads(listing.stdout)["apis"][0]
        assert echo["name"] == "echo" and echo["status"] == "live"
        assert echo["requests"]["2xx"] == 3 and echo["requests"]["4xx"] == 1
        assert echo["url"] == f"{server.url}/echo"
        detail = kiln("get", "echo", cwd=tmp_path, home=server.state)
        assert detail.returncode == 0, detail.stderr
        assert "tracker" in detail.stdout and "classification" in detail.stdout
        as_json = orjson.loads(
            kiln("get", "echo", "-o", "json", cwd=tmp_path, home=server.state).stdout
        )
        assert as_json["tracker"]["classes"] == {"x": 2, "y": 1}
        assert "?debug=true" in detail.stdout
        server.api_log("echo", until=lambda rs: len([r for r in rs if r.get("status")]) >= 4)
        logs = kiln("logs", "echo", cwd=tmp_path, home=server.state)
        assert logs.returncode == 0, logs.stderr
        assert "POST /echo 200" in logs.stdout and "id=req-y" in logs.stdout
        missing = kiln("get", "nope", cwd=tmp_path, home=server.state)
        assert missing.returncode == 2 and "no API named 'nope'" in missing.stderr
    finally:
        server.stop()


def test_version_short_help_and_no_bool_types(tmp_path: Path) -> None:
    from kiln import __version__

    for flag in ("--version", "-V"):
        done = kiln(flag, cwd=tmp_path, home=tmp_path / "home")
        assert done.returncode == 0 and done.stdout.strip() == f"kiln {__version__}"
    short = kiln("-h", cwd=tmp_path, home=tmp_path / "home")
    assert short.returncode == 0 and "Usage:" in short.stdout and "deploy" in short.stdout
    sub = kiln("jobs", "list", "-h", cwd=tmp_path, home=tmp_path / "home")
    assert sub.returncode == 0 and "jobs list" in sub.stdout and "wide" in sub.stdout
    serve_help = kiln("serve", "--help", cwd=tmp_path, home=tmp_path / "home")
    assert "--sandbox" in serve_help.stdout and "<bool>" not in serve_help.stdout
    assert "<int>" in serve_help.stdout  # options that take a value keep their type


def test_validate_counts_batch_apis(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "predictor.py",
        "class PythonPredictor:\n    def __init__(self, config, job_spec):\n        pass\n\n"
        "    def predict(self, payload, batch_id):\n        return payload\n",
    )
    write(
        tmp_path / "p" / "kiln.yaml",
        "- kind: BatchAPI\n  name: scorer\n  predictor: {type: python, path: predictor.py}\n",
    )
    done = kiln("validate", "p", cwd=tmp_path, home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert "kiln.yaml is valid: 1 Batch API" in done.stdout and "0 API" not in done.stdout
    assert "scorer" in done.stdout
    write(
        tmp_path / "p" / "kiln.yaml",
        "- kind: BatchAPI\n  name: scorer\n  predictor: {type: python, path: predictor.py}\n"
        "- kind: api\n  name: echo\n  python: {handler: predictor.py:PythonPredictor}\n",
    )
    both = kiln("validate", "p", cwd=tmp_path, home=tmp_path / "home")
    assert "valid: 1 API and 1 Batch API" in both.stdout, both.stdout + both.stderr


def test_predict_refuses_to_guess_between_serve_and_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        servers = (("serve.json", "serve", 18080), ("server.json", "server", 28080))
        for (name, mode, port), proc in zip(servers, sleepers, strict=True):
            info = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}", "mode": mode}
            (home / name).write_bytes(orjson.dumps(info))
        done = kiln("predict", "echo", "{}", cwd=tmp_path, home=home)
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "two Kiln servers run in KILN_HOME" in message
    assert "kiln serve at http://127.0.0.1:18080 (--url http://127.0.0.1:18080)" in message
    assert "kiln server at http://127.0.0.1:28080 (--url http://127.0.0.1:28080)" in message


def test_predict_names_its_server_and_where_debug_goes(tmp_path: Path) -> None:
    write(tmp_path / "p" / "h.py", "def predict(payload, context):\n    return payload\n")
    write(tmp_path / "p" / "kiln.yaml", "- kind: api\n  name: echo\n  python:\n    handler: h.py\n")
    server = KilnServer(tmp_path / "p", tmp_path / "home")
    try:
        done = kiln("predict", "echo", '{"a": 1}', "--debug", cwd=tmp_path, home=server.state)
        assert done.returncode == 0, done.stderr
        assert orjson.loads(done.stdout) == {"a": 1}  # stdout is the answer alone
        message = " ".join(done.stderr.split())
        assert f"kiln serve: POST {server.url}/echo" in message
        assert "debug stages of request" in message and "`kiln logs echo`" in message
        assert f"{server.state}/logs/" in message
    finally:
        server.stop()
