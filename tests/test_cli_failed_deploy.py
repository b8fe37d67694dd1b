"""A first deploy that fails is visible: `kiln get` lists the API as `error` with its reason,
`kiln get API` shows it, a fixed deploy replaces it and `kiln delete` forgets it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from daemon import Daemon
from support import write

BROKEN = "class Handler:\n    def predict(self, payload, context)\n        return payload\n"
FIXED = "class Handler:\n    def predict(self, payload, context):\n        return payload\n"


def _project(folder: Path, handler: str, name: str = "first-fail") -> Path:
    write(folder / "handler.py", handler)
    write(
        folder / "kiln.yaml",
        f"- kind: deployment\n  name: {name}\n- kind: api\n  name: {name}\n"
        "  python:\n    handler: handler.py:Handler\n",
    )
    return folder


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "home")
    d.start()
    yield d
    d.stop()


def test_a_failed_first_deploy_shows_in_kiln_get(daemon: Daemon, tmp_path: Path) -> None:
    folder = _project(tmp_path / "first-fail", BROKEN)
    deployed = daemon.kiln("deploy", str(folder))
    assert deployed.returncode != 0, deployed.stdout
    assert "SyntaxError" in deployed.stdout + deployed.stderr

    listed = daemon.kiln("get", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    apis = {a["name"]: a for a in orjson.loads(listed.stdout)["apis"]}
    entry = apis["first-fail"]
    assert entry["status"] == "error"
    assert "SyntaxError" in entry["error"] and "handler.py, line 2" in entry["error"]
    assert entry["deployment"] == "first-fail" and entry["revision"]
    assert entry["replicas"]["ready"] == 0

    table = daemon.kiln("get")
    assert table.returncode == 0 and "first-fail" in table.stdout and "error" in table.stdout

    detail = daemon.kiln("get", "first-fail")
    assert detail.returncode == 0, detail.stderr
    assert "not serving" in detail.stdout and "SyntaxError" in detail.stdout
    assert "kiln deploy" in detail.stdout
    shown = orjson.loads(daemon.kiln("get", "first-fail", "-o", "json").stdout)
    assert shown["status"] == "error" and shown["revisions"][0]["status"] == "error"

    # The fixed deploy is live and the error entry is gone.
    write(folder / "handler.py", FIXED)
    again = daemon.kiln("deploy", str(folder))
    assert again.returncode == 0, again.stdout + again.stderr
    entry = daemon.apis()["first-fail"]
    assert entry["status"] == "live" and "error" not in entry


def test_a_failed_first_deploy_can_be_deleted(daemon: Daemon, tmp_path: Path) -> None:
    folder = _project(tmp_path / "gone", BROKEN, name="gone")
    assert daemon.kiln("deploy", str(folder)).returncode != 0
    assert daemon.apis()["gone"]["status"] == "error"
    deleted = daemon.kiln("delete", "gone", "-f")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "gone" not in daemon.apis()


def test_deploy_does_not_send_the_template_sample_to_another_handler(
    daemon: Daemon, tmp_path: Path
) -> None:
    from kiln.cli.scaffold import create_project

    project = tmp_path / "mine"
    create_project(project, "python", name="mine")
    write(
        project / "src" / "handler.py",
        "class Model:\n    def predict(self, payload, context):\n        return payload['text']\n",
    )
    deployed = daemon.kiln("deploy", str(project))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    hint = deployed.stdout.split("Try it:")[1]
    assert "iris example" in hint
    curl = next(line.strip() for line in hint.splitlines() if line.strip().startswith("curl "))
    assert curl.startswith(f"curl {daemon.url}/mine") and "-d" not in curl
