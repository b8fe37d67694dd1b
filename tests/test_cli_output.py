"""What the CLI prints, as a newcomer reads it: hints that run as printed (the API key
included), tables that fold rather than cut identifiers at 80 columns, `-o wide` and
`-o json` on every listing, revisions in `kiln get API`, and a capped-replicas note
that says where its number came from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from daemon import Daemon
from rich.console import Console
from support import write

LONG = "a-rather-long-api-name-for-eighty-columns"
HANDLER = """
class Handler:
    def load(self, model_dir, config):
        pass

    def predict(self, payload, context):
        return {"version": "VERSION", "echo": payload}
"""


def _project(folder: Path, version: str) -> Path:
    write(folder / "handler.py", HANDLER.replace("VERSION", version))
    write(
        folder / "kiln.yaml",
        f"- kind: deployment\n  name: shop\n- kind: api\n  name: {LONG}\n"
        "  python:\n    handler: handler.py:Handler\n",
    )
    write(folder / "sample.json", '{"x": 1}')
    return folder


def _printed_curl(output: str, after: str) -> str:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return next(line.strip() for line in lines[start:] if line.strip().startswith("curl "))


def _bash(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a printed command exactly as a user pasting it into bash would."""
    return subprocess.run(
        ["bash", "-c", command + " -s -o /dev/null -w '%{http_code}'"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _column(output: str, index: int) -> str:
    """The text of one column of a one-row table, its folded lines joined."""
    rows = [line.split("│") for line in output.splitlines() if "│" in line]
    return "".join(parts[index].strip() for parts in rows)


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "home")
    d.start()
    yield d
    d.stop()


@pytest.mark.skipif(
    shutil.which("curl") is None and os.environ.get("CI") != "true",
    reason="runs the printed curl: sudo ./scripts/system-packages.sh installs curl",
)
def test_printed_curls_carry_the_key_and_answer_200(daemon: Daemon, tmp_path: Path) -> None:
    folder = _project(tmp_path / "shop", "v1")
    deployed = daemon.kiln("deploy", str(folder))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    curl = _printed_curl(deployed.stdout, "Try it:")
    key_file = (daemon.home / "admin.key").resolve()
    assert f'-H "x-api-key: $(cat {key_file})"' in curl
    # Run verbatim, from the folder `kiln deploy` ran in: 200, not 401.
    assert _bash(curl, daemon.home.parent, daemon.env).stdout == "200"
    without_key = re.sub(r' -H "x-api-key: [^"]*"', "", curl)
    assert _bash(without_key, daemon.home.parent, daemon.env).stdout == "401"

    # With KILN_API_KEY the hint names the variable, and runs where it is set.
    env = {**daemon.env, "KILN_API_KEY": daemon.admin_key}
    again = daemon.kiln_env(env, "get", LONG)
    assert again.returncode == 0, again.stderr
    debug = _printed_curl(again.stdout, "")
    assert '-H "x-api-key: $KILN_API_KEY"' in debug and "?debug=true" in debug
    assert _bash(debug.split("   #")[0], folder, env).stdout == "200"

    # `kiln get API` (key from the file): the debug curl, one line even at 80 columns.
    narrow = {**daemon.env, "COLUMNS": "80"}
    detail = daemon.kiln_env(narrow, "get", LONG)
    assert detail.returncode == 0, detail.stderr
    debug = _printed_curl(detail.stdout, "")
    assert f"$(cat {key_file})" in debug and debug.endswith("# in the project's folder")
    assert _bash(debug.split("   #")[0], folder, daemon.env).stdout == "200"


def test_get_at_80_columns_folds_names_and_urls_and_lists_revisions(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _project(tmp_path / "shop", "v1")
    assert daemon.kiln("deploy", str(folder)).returncode == 0
    first = daemon.apis()[LONG]["revision"]
    _project(folder, "v2")
    assert daemon.kiln("deploy", str(folder)).returncode == 0
    second = daemon.apis()[LONG]["revision"]
    assert first != second
    narrow = {**daemon.env, "COLUMNS": "80"}

    listing = daemon.kiln_env(narrow, "get")
    assert listing.returncode == 0, listing.stderr
    assert "…" not in listing.stdout
    assert all(len(line) <= 80 for line in listing.stdout.splitlines())
    url = f"{daemon.url}/shop/{LONG}"
    header = next(line for line in listing.stdout.splitlines() if "┃" in line)
    names = [h.strip() for h in header.split("┃")]
    assert _column(listing.stdout, names.index("URL")) == url
    assert _column(listing.stdout, 0) == LONG

    wide = daemon.kiln_env(narrow, "get", "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    row = next(line for line in wide.stdout.splitlines() if LONG in line)
    assert url in row and second in row and "shop" in row  # one line: URL, revision, deployment

    detail = daemon.kiln_env(narrow, "get", LONG)
    assert detail.returncode == 0, detail.stderr
    assert "revisions (kiln rollback API REVISION)" in detail.stdout
    lines = detail.stdout.splitlines()
    current = next(line for line in lines if second in line and "current" in line)
    older = next(line for line in lines if first in line and "│" in line)
    assert "live" in current and "current" not in older
    assert lines.index(current) < lines.index(older)  # newest first

    rollback_help = daemon.kiln("rollback", "--help")
    assert "kiln get API" in rollback_help.stdout  # the command that lists them


def test_every_listing_takes_wide_and_json(daemon: Daemon) -> None:
    made = daemon.kiln("users", "create", "alice-with-a-long-user-name")
    assert made.returncode == 0, made.stderr
    narrow = {**daemon.env, "COLUMNS": "80"}
    for command in (["users", "list"], ["keys", "list"], ["usage"], ["env", "list"], ["get"]):
        as_json = daemon.kiln_env(narrow, *command, "-o", "json")
        assert as_json.returncode == 0, (command, as_json.stderr)
        orjson.loads(as_json.stdout)
        wide = daemon.kiln_env(narrow, *command, "-o", "wide")
        assert wide.returncode == 0, (command, wide.stderr)
        table = daemon.kiln_env(narrow, *command)
        assert table.returncode == 0 and "…" not in table.stdout, (command, table.stdout)
    users = daemon.kiln_env(narrow, "users", "list", "-o", "wide").stdout
    assert any("alice-with-a-long-user-name" in line for line in users.splitlines())
    keys = orjson.loads(daemon.kiln("keys", "list", "-o", "json").stdout)["keys"]
    key_lines = daemon.kiln_env(narrow, "keys", "list", "-o", "wide").stdout.splitlines()
    assert all(any(k["id"] in line for line in key_lines) for k in keys)
    bad = daemon.kiln("keys", "list", "-o", "yaml")
    assert bad.returncode == 2 and "use -o table, -o wide or -o json" in bad.stderr
    jobs_help = daemon.kiln("jobs", "list", "--help")
    assert "wide" in jobs_help.stdout


def test_job_table_folds_the_job_id_at_80_columns() -> None:
    from kiln.cli.jobs_cmd import _jobs_table

    job_id = "69a8b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5"
    table = _jobs_table(
        {
            "api_name": "scorer",
            "endpoint": "/scorer",
            "jobs": [
                {
                    "job_id": job_id,
                    "status_text": "running",
                    "batches_done": 3,
                    "total_batches": 10,
                    "failed": 0,
                    "start_time": "2026-12-05T12:00:01.123",
                    "duration_s": 80.0,
                }
            ],
        }
    )
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    assert "…" not in text
    first_cells = [line.split("│")[0].strip() for line in text.splitlines() if "│" in line]
    assert "".join(first_cells) == job_id


def test_capped_note_says_where_max_replicas_came_from() -> None:
    from kiln.cli.get_cmd import capped_note

    note = capped_note({"capped": "x", "configured_max": 100, "max": 10})
    assert "max_replicas is 100 (the default of compute.max_replicas)" in note
    assert "at most 10 replicas" in note and "compute.cpu and compute.mem" in note
    own = capped_note({"capped": "x", "configured_max": 40, "max": 10})
    assert "max_replicas is 40 (compute.max_replicas)" in own and "default" not in own
