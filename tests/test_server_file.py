"""KILN_HOME/server.yaml: flags given to `kiln server start|run` are kept for later starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from daemon import Daemon

from kiln.control.server_file import ServerFileError, load, save


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_a_restart_keeps_the_ports_and_pass_env_it_was_given(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home")
    port, management, metrics = free_ports(3)
    first = d.kiln(
        "server", "start", "--port", str(port), "--management-port", str(management),
        "--metrics-port", str(metrics), "--pass-env", "AWS_*",
    )  # fmt: skip
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        assert d.info["ports"] == {"inference": port, "management": management, "metrics": metrics}
        saved = yaml.safe_load((d.home / "server.yaml").read_text())
        assert saved["pass_env"] == ["AWS_*"] and saved["port"] == port
        assert (d.home / "server.yaml").stat().st_mode & 0o777 == 0o600
    finally:
        d.stop()
    again = d.kiln("server", "start")  # no flags: the saved options
    try:
        assert again.returncode == 0, again.stdout + again.stderr
        assert d.info["ports"] == {"inference": port, "management": management, "metrics": metrics}
    finally:
        d.stop()


def test_a_bad_server_yaml_names_the_file_the_key_and_the_fix(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "server.yaml").write_text("port: 8080\nprot: 9\n")
    d = Daemon(home)
    done = d.kiln("server", "start")
    assert done.returncode == 2
    text = done.stdout + done.stderr
    assert "server.yaml" in text and "'prot'" in text and "Remove it" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "content,words",
    [
        ("port: eighty\n", ["'port'", "a port number"]),
        ("edge: {header_timeout_s: -1}\n", ["header_timeout_s", "positive"]),
        ("edge: {slow: 1}\n", ["unknown edge setting", "slow"]),
        ("- a\n", ["mapping"]),
    ],
)
def test_server_yaml_values_are_checked(tmp_path: Path, content: str, words: list[str]) -> None:
    (tmp_path / "server.yaml").write_text(content)
    with pytest.raises(ServerFileError) as caught:
        load(tmp_path)
    for word in words:
        assert word in str(caught.value)


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    save(tmp_path, {"port": 0, "edge": {"max_connections": 50}, "pass_env": ["HF_*"]})
    assert load(tmp_path) == {"port": 0, "pass_env": ["HF_*"], "edge": {"max_connections": 50}}
