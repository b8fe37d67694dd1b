"""`--busy-poll-us` / server.yaml `busy_poll_us`: the busy-poll limit as a server option.

The merge (flag over server.yaml over the default, saved for later starts, bad
values refused before anything is saved) is tested where it lives,
`kiln.cli.server_settings`; the flag on `kiln server start|run` and `kiln serve`
through the real CLI: a bad value exits 2 naming the flag, a good one serves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
import typer
import yaml
from daemon import Daemon
from support import KILN, KilnServer, write

from kiln.cli.server_cmd_edge import BUSY_POLL_DEFAULT_US
from kiln.cli.server_settings import merge_settings, server_options
from kiln.control.server import ServerOptions

ACCEPTS = "must be an int from 0 to 100000 (microseconds; 0: polling off)"


def _saved(home: Path) -> dict[str, object]:
    return yaml.safe_load((home / "server.yaml").read_text())


def _one_line(text: str) -> str:
    """Rich wraps long messages at the terminal's width; the words are what count."""
    return " ".join(text.split())


def test_the_cli_default_is_the_servers_default() -> None:
    assert BUSY_POLL_DEFAULT_US == ServerOptions().busy_poll_us == 500


def test_no_flag_and_no_file_is_the_default_and_saves_nothing(tmp_path: Path) -> None:
    settings = merge_settings(tmp_path, {"busy_poll_us": None})
    assert settings["busy_poll_us"] == 500
    assert server_options(tmp_path, settings).busy_poll_us == 500
    assert not (tmp_path / "server.yaml").exists()


def test_a_flag_is_saved_then_read_back_and_a_later_flag_overrides_it(tmp_path: Path) -> None:
    first = merge_settings(tmp_path, {"busy_poll_us": 0, "port": 9000})
    assert first["busy_poll_us"] == 0 and server_options(tmp_path, first).busy_poll_us == 0
    assert _saved(tmp_path) == {"port": 9000, "busy_poll_us": 0}
    again = merge_settings(tmp_path, {"busy_poll_us": None})  # no flag: the file's value
    assert again["busy_poll_us"] == 0 and again["port"] == 9000
    later = merge_settings(tmp_path, {"busy_poll_us": 100000})  # the flag wins, and is saved
    assert server_options(tmp_path, later).busy_poll_us == 100000
    assert _saved(tmp_path) == {"port": 9000, "busy_poll_us": 100000}


def test_a_value_written_in_server_yaml_is_used(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text("busy_poll_us: 250\n")
    assert server_options(tmp_path, merge_settings(tmp_path, {})).busy_poll_us == 250


@pytest.mark.parametrize("value", [-1, 100001])
def test_a_bad_flag_names_the_flag_and_saves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: int
) -> None:
    (tmp_path / "server.yaml").write_text("busy_poll_us: 250\n")
    with pytest.raises(typer.Exit) as stopped:
        merge_settings(tmp_path, {"busy_poll_us": value, "port": 9000})
    assert stopped.value.exit_code == 2
    assert f"--busy-poll-us {ACCEPTS}, not {value}" in _one_line(capsys.readouterr().err)
    assert _saved(tmp_path) == {"busy_poll_us": 250}  # unchanged: neither key saved


@pytest.mark.parametrize(
    "written,shown", [("-3", "-3"), ("100001", "100001"), ("fast", "'fast'"), ("true", "True")]
)
def test_a_bad_server_yaml_value_names_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], written: str, shown: str
) -> None:
    (tmp_path / "server.yaml").write_text(f"busy_poll_us: {written}\n")
    with pytest.raises(typer.Exit) as stopped:
        merge_settings(tmp_path, {"busy_poll_us": 100})  # a good flag does not hide it
    assert stopped.value.exit_code == 2
    message = _one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'server.yaml'}: 'busy_poll_us' {ACCEPTS}, not {shown}" in message
    assert (tmp_path / "server.yaml").read_text() == f"busy_poll_us: {written}\n"


# ---- the real CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["start", "run"])
@pytest.mark.parametrize("value", ["-1", "100001", "abc"])
def test_kiln_server_refuses_a_bad_flag_before_anything_starts(
    tmp_path: Path, command: str, value: str
) -> None:
    d = Daemon(tmp_path / "home")
    done = d.kiln("server", command, "--busy-poll-us", value, timeout=60)
    text = _one_line(done.stdout + done.stderr)
    assert done.returncode == 2, text
    assert "--busy-poll-us" in text and "Traceback" not in text
    if value != "abc":  # not an int: the CLI parser says so, naming the flag
        assert f"--busy-poll-us {ACCEPTS}, not {value}" in text
    assert not (d.home / "server.yaml").exists() and not (d.home / "server.json").exists()


def test_kiln_server_start_saves_the_flag_and_run_reads_it_back(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home")
    d.start("--busy-poll-us", "0")
    try:
        assert _saved(d.home)["busy_poll_us"] == 0
        assert httpx.get(f"{d.url}/healthz", timeout=10).status_code == 200
    finally:
        d.stop()
    # `kiln server run` with no flag runs with the saved value; a flag updates the file.
    run = _run_in_foreground(d, "--busy-poll-us", "300")
    try:
        assert _saved(d.home)["busy_poll_us"] == 300
        assert _saved(d.home)["port"] == 0  # what start saved stays
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(60)


def _run_in_foreground(d: Daemon, *flags: str) -> subprocess.Popen[bytes]:
    """`kiln server run FLAGS`, once it answers (its server.json names it)."""
    run = subprocess.Popen(
        [*KILN, "server", "run", *flags],
        env=d.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if orjson.loads((d.home / "server.json").read_bytes()).get("pid") == run.pid:
                return run
        except (OSError, orjson.JSONDecodeError):
            pass
        assert run.poll() is None, "kiln server run exited while starting"
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGKILL)
    raise AssertionError("kiln server run did not start in 60 s")


HANDLER = """
class Model:
    def load(self, model_dir, config):
        pass

    def predict(self, payload, context):
        return {"doubled": [2 * x for x in payload["x"]]}
"""


def _project(folder: Path) -> Path:
    write(folder / "kiln.yaml", "- kind: api\n  name: twice\n  python: {handler: h.py:Model}\n")
    write(folder / "h.py", HANDLER)
    return folder


def test_kiln_serve_refuses_a_bad_flag_with_exit_code_2(tmp_path: Path) -> None:
    root = _project(tmp_path / "project")
    done = subprocess.run(
        [*KILN, "serve", str(root), "--port", "0", "--busy-poll-us", "-1"],
        env={**os.environ, "KILN_HOME": str(tmp_path / "home"), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = _one_line(done.stdout + done.stderr)
    assert done.returncode == 2, text
    assert f"--busy-poll-us {ACCEPTS}, not -1" in text and "Traceback" not in text
    assert "Kiln is serving" not in text


@pytest.mark.parametrize("limit", ["0", "100000"])
def test_kiln_serve_answers_with_polling_off_and_at_the_limit(
    tmp_path: Path, serve_project: Callable[..., KilnServer], limit: str
) -> None:
    server = serve_project(_project(tmp_path / "project"), "--busy-poll-us", limit)
    for x in range(5):  # several, so a worker that polled (or not) between them still answers
        response = server.client.post("/twice", json={"x": [x, 10]})
        assert response.status_code == 200, response.text
        assert response.json() == {"doubled": [2 * x, 20]}
