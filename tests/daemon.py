"""Test support: the durable Kiln server (`kiln server start`) and the CLI, as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from support import KILN


class Daemon:
    """`kiln server start` with its own KILN_HOME and free ports; every command is the real CLI."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "KILN_HOME": str(home), "COLUMNS": "200"}
        self.env.pop("KILN_URL", None)
        self.env.pop("KILN_ENV", None)

    def kiln(
        self, *args: str, timeout: float = 180, cwd: Path | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KILN, *args],
            cwd=cwd or self.home.parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def kiln_env(
        self, env: dict[str, str], *args: str, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """The CLI with another environment (e.g. KILN_API_KEY of a user)."""
        return subprocess.run(
            [*KILN, *args],
            cwd=self.home.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *extra: str) -> subprocess.CompletedProcess[str]:
        done = self.kiln(
            "server",
            "start",
            "--port",
            "0",
            "--management-port",
            "0",
            "--metrics-port",
            "0",
            *extra,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    @property
    def admin_key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """Headers that carry the admin key (API keys are on by default)."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    @property
    def http(self) -> httpx.Client:
        """An HTTP client that sends the admin key."""
        if getattr(self, "_http", None) is None:
            self._http = httpx.Client(headers=self.auth, timeout=60)
        return self._http

    @property
    def info(self) -> dict[str, Any]:
        return orjson.loads((self.home / "server.json").read_bytes())

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def management_url(self) -> str:
        return self.info["management_url"]

    def apis(self) -> dict[str, dict[str, Any]]:
        done = self.kiln("get", "-o", "json")
        assert done.returncode == 0, done.stderr
        return {a["name"]: a for a in orjson.loads(done.stdout)["apis"]}

    def worker_pids(self, pid: int | None = None) -> list[int]:
        parent = pid or self.info["pid"]
        out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def wait_until(self, check: Any, timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = check()
            except (httpx.HTTPError, KeyError, AssertionError, OSError, ValueError):
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        try:
            pid = self.info["pid"]
        except (OSError, ValueError):
            return
        self.kiln("server", "stop", timeout=90)
        if getattr(self, "_http", None) is not None:
            self._http.close()
            self._http = None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
