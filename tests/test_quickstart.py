"""scripts/quickstart.sh, the README's first command: it answers, names a busy port, cleans up.

The script runs for real (the repository's .venv, the iris example, `kiln serve` on
free ports), so a newcomer's first command cannot silently break.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "quickstart.sh"

pytestmark = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "python").exists(),
    reason="quickstart.sh uses the repository's .venv (./scripts/test.sh creates it)",
)


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run(tmp_path: Path, **ports: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KILN_HOME"}
    env.update({k: str(v) for k, v in ports.items()})
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


def test_busy_port_is_named_with_the_fix_and_no_traceback(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    management, metrics = _free_ports(2)
    try:
        result = _run(tmp_path, PORT=busy, MANAGEMENT_PORT=management, METRICS_PORT=metrics)
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {busy} (PORT) is already in use" in result.stderr
    assert f"PORT={busy + 10} ./scripts/quickstart.sh" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing left


def test_busy_management_port_names_its_variable(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    port, metrics = _free_ports(2)
    try:
        result = _run(tmp_path, PORT=port, MANAGEMENT_PORT=busy, METRICS_PORT=metrics)
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"port {busy} (MANAGEMENT_PORT) is already in use" in result.stderr


def test_answers_on_the_chosen_ports_and_removes_its_temporary_home(tmp_path: Path) -> None:
    port, management, metrics = _free_ports(3)
    result = _run(tmp_path, PORT=port, MANAGEMENT_PORT=management, METRICS_PORT=metrics)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"curl -X POST http://127.0.0.1:{port}/iris" in result.stdout
    assert '"label":"setosa"' in result.stdout  # the curl's answer
    assert '"virginica": 0.9961' in result.stdout  # kiln predict's pretty-printed batch
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not [n for n in leftovers if n.startswith("kiln-quickstart.")], leftovers
