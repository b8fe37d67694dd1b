"""KILN_HOME/server.yaml: flags given to `kiln server start|run` are kept for later starts."""

from __future__ import annotations

import socket
import time
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


def test_edge_flags_are_saved_under_edge_and_take_effect(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home")
    # An OTLP endpoint nobody answers: saved like the other options, costs requests nothing.
    otlp = ["--otlp-endpoint", "http://127.0.0.1:9", "--otlp-protocol", "grpc"]
    d.start(
        "--max-connections", "5", "--header-timeout-s", "4", "--max-header-bytes", "4096", *otlp
    )
    try:
        saved = yaml.safe_load((d.home / "server.yaml").read_text())
        assert (saved["otlp_endpoint"], saved["otlp_protocol"]) == ("http://127.0.0.1:9", "grpc")
        assert saved["edge"] == {
            "max_connections": 5,
            "header_timeout_s": 4.0,
            "max_header_bytes": 4096,
        }
        host, port = d.url.removeprefix("http://").rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(5)]
        try:
            for sock in held:  # a body in flight: never the one that makes room
                sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\nxx")
            time.sleep(0.3)
            with socket.create_connection((host, int(port)), timeout=10) as sixth:
                sixth.settimeout(5)
                data = sixth.recv(4096)
            assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data.lower()
        finally:
            for sock in held:
                sock.close()
        # The server counts a closed connection out when it reads the close, so room may
        # take a moment: a 503 (still full) is retried, a bounded number of times.
        answer = b""
        for _ in range(50):
            with socket.create_connection((host, int(port)), timeout=10) as big:
                pad = b"a" * 5000
                big.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + pad + b"\r\n\r\n")
                big.settimeout(5)
                answer = big.recv(4096)
            if not answer.startswith(b"HTTP/1.1 503"):
                break
            time.sleep(0.1)
        assert answer.startswith(b"HTTP/1.1 431"), answer  # --max-header-bytes 4096
    finally:
        d.stop()
    # A later flag changes its own key; the others stay as saved.
    d.start("--keepalive-timeout-s", "2")
    try:
        saved = yaml.safe_load((d.home / "server.yaml").read_text())
        assert saved["edge"] == {
            "max_connections": 5,
            "header_timeout_s": 4.0,
            "max_header_bytes": 4096,
            "keepalive_timeout_s": 2.0,
        }
    finally:
        d.stop()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-connections", "0"], "--max-connections must be a positive number, not 0"),
        (["--body-idle-timeout-s", "0"], "--body-idle-timeout-s must be a positive number"),
        (["--max-header-bytes", "10"], "--max-header-bytes must be at least 1024, not 10"),
        (["--otlp-protocol", "thrift"], "--otlp-protocol: OTLP protocol 'thrift' is not"),
        (["--otlp-endpoint", "collector:4318"], "--otlp-endpoint: OTLP endpoint"),
    ],
)
def test_a_bad_edge_flag_names_the_flag_and_saves_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    d = Daemon(tmp_path / "home")
    done = d.kiln("server", "start", *args)
    assert done.returncode == 2
    assert message in " ".join((done.stdout + done.stderr).split())
    assert "Traceback" not in done.stderr
    assert not (d.home / "server.yaml").exists() and not (d.home / "server.json").exists()
