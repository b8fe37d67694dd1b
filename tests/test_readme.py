"""The README's commands, run as a reader runs them (as LitServe tests its README).

The quickstart, the 5-minute tour and the platform section are executed line by line
in a temporary folder with free ports, so the README cannot drift from the product.
A block the test cannot run (a long install) says so in the README itself, with
`<!-- readme-test: skip (why) -->` right before it; a single line, with
`<!-- readme-test: skip-line COMMAND (why) -->`. Keep those few.

How lines run: each in bash, in the folder the earlier `cd` lines chose; `kiln serve`
(foreground in the README) runs in the background until its block's reader would stop
it; `-f` (follow) lines run for a few seconds; 127.0.0.1:8080 becomes the free port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CI = os.environ.get("CI") == "true"


@dataclass
class Block:
    heading: str
    lines: list[str]
    skip: str | None = None  # why the whole block cannot run here
    skip_lines: dict[str, str] = field(default_factory=dict)  # command -> why


def readme_blocks(text: str) -> list[Block]:
    """Every ```bash block with the heading it sits under and its readme-test marks."""
    blocks: list[Block] = []
    heading, pending_skip, pending_lines = "", None, {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        mark = re.match(r"<!-- readme-test: (skip-line|skip) (.*?) -->", line)
        if mark and mark.group(1) == "skip":
            pending_skip = mark.group(2)
        elif mark:
            command, _, why = mark.group(2).partition(" (")
            pending_lines[command.strip()] = why.rstrip(")")
        if line.strip() == "```bash":
            body = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append(Block(heading, _join(body), pending_skip, pending_lines))
            pending_skip, pending_lines = None, {}
        i += 1
    return blocks


def _join(body: list[str]) -> list[str]:
    """Lines with their `\\` continuations joined; blank and comment-only lines dropped."""
    out: list[str] = []
    carry = ""
    for raw in body:
        line = carry + raw.strip()
        if line.endswith("\\"):
            carry = line[:-1] + " "
            continue
        carry = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_the_readme_marks_few_blocks_and_they_say_why() -> None:
    blocks = readme_blocks((ROOT / "README.md").read_text())
    skipped = [b for b in blocks if b.skip] + [b for b in blocks if b.skip_lines]
    assert len(skipped) <= 4, [b.lines for b in skipped]
    assert all(b.skip and b.skip.startswith("(") for b in blocks if b.skip)
    headings = {b.heading for b in blocks}
    assert {"Kiln", "A 5-minute tour", "Running it as a platform"} <= headings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reader:
    """Runs README lines the way a reader at a terminal would."""

    def __init__(self, tmp: Path) -> None:
        self.cwd = tmp
        self.home = tmp / "kiln-home"
        self.home.mkdir()
        self.port = _free_port()
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "KILN_HOME": str(self.home),
            "COLUMNS": "80",
            # `kiln serve`'s ports (the README's default 8080-8082 may be taken here).
            "KILN_PORT": str(self.port),
            "KILN_MANAGEMENT_PORT": "0",
            "KILN_METRICS_PORT": "0",
            # the quickstart's
            "PORT": str(_free_port()),
            "MANAGEMENT_PORT": str(_free_port()),
            "METRICS_PORT": str(_free_port()),
            "TMPDIR": str(tmp),
        }
        for name in ("KILN_URL", "KILN_ENV", "KILN_API_KEY", "KILN_MANAGEMENT_URL"):
            self.env.pop(name, None)
        self.background: subprocess.Popen[str] | None = None
        self.ran: list[str] = []

    def run_block(
        self, block: Block, before: dict[str, object] | None = None, **env: str | None
    ) -> None:
        assert not block.skip, block.skip
        for line in block.lines:
            command = line.split("  #")[0].strip()
            if command in block.skip_lines:
                continue
            for marker, action in (before or {}).items():
                if marker in line:
                    action()  # type: ignore[operator]
            self.run(command, **env)

    def run(self, command: str, **env: str | None) -> str:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        self.ran.append(command)
        if command.startswith("cd "):
            self.cwd = (self.cwd / command[3:].strip()).resolve()
            assert self.cwd.is_dir(), command
            return ""
        if re.match(r"kiln serve\b", command):
            self._serve(command)
            return ""
        follow = re.search(r"(^|\s)-f(\s|$)", command) and command.startswith("kiln logs")
        run_env = {k: v for k, v in {**self.env, **env}.items() if v is not None}
        done = subprocess.run(
            ["bash", "-c", f"timeout -s INT 4 {command}" if follow else command],
            cwd=self.cwd,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        ok = done.returncode == 0 or (follow and done.returncode in (124, 130))
        assert ok, (
            f"`{command}` in {self.cwd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        assert "Traceback" not in done.stderr, f"`{command}`:\n{done.stderr}"
        return done.stdout

    def _serve(self, command: str) -> None:
        pointer = self.home / "serve.json"
        self.background = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.background.poll() is None, self.background.stdout.read()  # type: ignore[union-attr]
            if pointer.exists():
                return
            time.sleep(0.2)
        raise AssertionError(f"`{command}` did not start within 120 s")

    def stop_serve(self) -> None:
        if self.background is not None and self.background.poll() is None:
            self.background.send_signal(signal.SIGINT)  # the reader's Ctrl-C
            try:
                self.background.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.background.kill()
                self.background.wait()
        self.background = None


@pytest.fixture
def reader(tmp_path: Path):
    r = Reader(tmp_path)
    yield r
    r.stop_serve()
    if (r.home / "server.json").exists():
        subprocess.run(
            [str(VENV_BIN / "kiln"), "server", "stop"], env=r.env, capture_output=True, timeout=90
        )


@pytest.mark.skipif(not (VENV_BIN / "kiln").exists(), reason="needs .venv (./scripts/test.sh)")
def test_readme_quickstart_tour_and_platform_run_as_written(reader: Reader) -> None:
    blocks = readme_blocks((ROOT / "README.md").read_text())
    by_heading: dict[str, list[Block]] = {}
    for block in blocks:
        by_heading.setdefault(block.heading, []).append(block)

    # The quickstart (from the repository, as a fresh clone runs it).
    (quickstart,) = by_heading["Kiln"]
    reader.cwd = ROOT
    reader.run_block(quickstart, KILN_HOME=None)  # its own temporary home, as a reader's
    assert "./scripts/quickstart.sh" in reader.ran

    # The 5-minute tour: init, serve (in the background), then the other terminal.
    reader.cwd = reader.home.parent
    first, second = by_heading["A 5-minute tour"]
    reader.run_block(first)
    assert reader.cwd.name == "my-api" and (reader.cwd / "kiln.yaml").is_file()
    assert "predictions" in reader.run("kiln predict my-api sample.json")
    reader.run_block(second)
    reader.stop_serve()

    # The platform: the server's ports come from KILN_HOME/server.yaml (free ones here).
    if shutil.which("bwrap") is None and not CI:
        pytest.skip("the platform section needs bubblewrap: sudo ./scripts/system-packages.sh")
    (reader.home / "server.yaml").write_text("port: 0\nmanagement_port: 0\nmetrics_port: 0\n")
    handler = reader.cwd / "src" / "handler.py"

    def edit() -> None:  # "again after an edit"
        handler.write_text(handler.read_text() + "\n# edited\n")

    (platform,) = by_heading["Running it as a platform"]
    reader.run_block(platform, before={"again after an edit": edit})
    assert reader.ran.count("kiln deploy") == 2 and "kiln rollback my-api" in reader.ran
    assert not (reader.home / "server.json").exists()  # `kiln server stop` stopped it
    assert reader.ran[-1] == "kiln server stop"
