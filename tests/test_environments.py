"""Per-project Python environments: requirements.txt installed at deploy, through the real CLI.

A small pure-Python package the server lacks (tabulate) is installed from PyPI;
numpy and torch are satisfied by the server and never downloaded; a broken
requirements.txt fails the deploy with uv's message while the old revision
serves; the same requirements reuse the environment; Hub layout reads
src/requirements.txt; offline installs come from a wheel folder.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import orjson
import pytest
from daemon import Daemon
from support import write

PACKAGE = "tabulate"  # small, pure Python, and not a dependency of the server

HANDLER = """
import {module}


class Handler:
    def predict(self, payload, context):
        return {{"version": "{version}", "module": {module}.__name__,
                 "file": {module}.__file__}}
"""

CONFIG = """
- kind: deployment
  name: {name}
- kind: api
  name: {name}
  python:
    handler: handler.py:Handler
"""


def project(
    folder: Path, name: str, requirements: str, version: str = "v1", module: str = PACKAGE
) -> Path:
    write(folder / "handler.py", HANDLER.format(version=version, module=module))
    write(folder / "kiln.yaml", CONFIG.format(name=name))
    write(folder / "requirements.txt", requirements)
    return folder


def env_folders(home: Path) -> dict[str, dict]:
    envs = home / "envs"
    return {
        p.name: orjson.loads((p / "env.json").read_bytes())
        for p in (envs.iterdir() if envs.is_dir() else [])
        if not p.name.startswith(".")
    }


def predict(d: Daemon, api: str) -> dict:
    done = d.kiln("predict", api, "{}")
    assert done.returncode == 0, done.stdout + done.stderr
    return orjson.loads(done.stdout)


def env_seconds(output: str) -> float:
    match = re.search(r"Python environment \w+ (?:built|reused) in ([0-9.]+)s", output)
    assert match, output
    return float(match.group(1))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    assert subprocess.run([sys.executable, "-c", f"import {PACKAGE}"]).returncode != 0, (
        f"the server's environment has {PACKAGE}: these tests need a package it lacks"
    )
    d = Daemon(tmp_path_factory.mktemp("envs") / "home")
    d.start()
    yield d
    d.stop()


def test_requirements_install_reuse_and_broken_requirements(daemon: Daemon, tmp_path: Path):
    folder = project(tmp_path / "tab", "tab", f"{PACKAGE}\n")
    done = daemon.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is live" in done.stdout and "built" in done.stdout
    answer = predict(daemon, "tab")
    assert answer["module"] == PACKAGE and "/envs/" in answer["file"]

    (key, manifest), *others = [
        (k, m) for k, m in env_folders(daemon.home).items() if "tabulate" in m["requirements"]
    ]
    assert not others and manifest["packages"][0].startswith(f"{PACKAGE}==")
    site = daemon.home / "envs" / key / "site"
    before = (site.stat().st_ino, site.stat().st_mtime_ns, manifest["created"])

    # A new revision with the same requirements: the environment is reused, not rebuilt.
    project(folder, "tab", f"{PACKAGE}\n", version="v2")
    done = daemon.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reused" in done.stdout and env_seconds(done.stdout) < 1.0
    assert predict(daemon, "tab")["version"] == "v2"
    manifest = env_folders(daemon.home)[key]
    assert (site.stat().st_ino, site.stat().st_mtime_ns, manifest["created"]) == before

    # A package that does not exist: a clean deploy error naming it; v2 keeps serving.
    project(folder, "tab", f"{PACKAGE}\nkiln-no-such-package-3141\n", version="v3")
    done = daemon.kiln("deploy", str(folder))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "kiln-no-such-package-3141" in output and "could not be installed" in output
    assert "Traceback" not in output
    assert predict(daemon, "tab")["version"] == "v2"

    # `kiln cache ls` lists the environment; prune keeps it while the server holds it.
    listing = daemon.kiln("cache", "ls")
    assert listing.returncode == 0 and key in listing.stdout and "in use" in listing.stdout
    rows = orjson.loads(daemon.kiln("cache", "ls", "--json").stdout)
    assert any(r["kind"] == "environment" and r["key"] == key and r["in_use"] for r in rows)
    pruned = daemon.kiln("cache", "prune", "--all")
    assert f"kept environment {key}" in pruned.stdout, pruned.stdout
    assert site.is_dir()


def test_numpy_and_torch_are_the_servers_own(daemon: Daemon, tmp_path: Path):
    folder = project(tmp_path / "np", "np", "numpy\ntorch\n", module="numpy")
    done = daemon.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to add" in done.stdout and env_seconds(done.stdout) < 5
    answer = predict(daemon, "np")
    assert "/envs/" not in answer["file"]  # the server's numpy
    manifest = next(m for m in env_folders(daemon.home).values() if "torch" in m["requirements"])
    assert manifest["packages"] == []


def test_hub_layout_reads_src_requirements(daemon: Daemon, tmp_path: Path):
    folder = tmp_path / "hub"
    write(folder / "src" / "requirements.txt", f"{PACKAGE}  # Hub layout\n")
    write(
        folder / "src" / "main.py",
        f"import kiln\nimport {PACKAGE}\n\n\n@kiln.handler\ndef predict(payload):\n"
        f"    return {{'file': {PACKAGE}.__file__}}\n",
    )
    write(
        folder / "kiln.yaml",
        "- kind: deployment\n  name: hub\n- kind: api\n  name: hub\n"
        "  python:\n    handler: src/main.py\n",
    )
    done = daemon.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "/envs/" in predict(daemon, "hub")["file"]
    assert any(
        m["requirement_files"] == "src/requirements.txt" for m in env_folders(daemon.home).values()
    )


def tiny_wheel(folder: Path, name: str = "kiln_offline_demo", version: str = "1.0") -> Path:
    """A pure-Python wheel built here: offline installs need no index at all."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: kiln-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text)}")
    record.append(f"{dist}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def test_kiln_serve_builds_offline_from_a_wheel_folder(serve_project, tmp_path: Path):
    wheels = tiny_wheel(tmp_path / "wheels").parent
    folder = project(
        tmp_path / "offline",
        "offline",
        "kiln-offline-demo==1.0\nnumpy\n",
        module="kiln_offline_demo",
    )
    server = serve_project(
        folder,
        UV_FIND_LINKS=str(wheels),
        UV_OFFLINE="1",
        UV_CACHE_DIR=str(tmp_path / "empty-uv-cache"),  # nothing cached: only the folder
    )
    response = server.client.post("/offline/offline", json={})
    assert response.status_code == 200, (response.text, server.output())
    answer = response.json()
    assert answer["module"] == "kiln_offline_demo" and "/envs/" in answer["file"]
    assert "Python environment" in server.output()


def test_concurrent_builds_of_one_key_build_once(tmp_path: Path, monkeypatch):
    from kiln.environments import Environments

    monkeypatch.setenv("UV_FIND_LINKS", str(tiny_wheel(tmp_path / "wheels").parent))
    monkeypatch.setenv("UV_OFFLINE", "1")
    folder = write(tmp_path / "p" / "requirements.txt", "kiln-offline-demo\n").parent
    results = []

    def build() -> None:  # two servers' caches: their own leases, one shared folder
        results.append(Environments(tmp_path / "envs").ensure(folder))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].site_dirs == results[1].site_dirs
    assert not list((tmp_path / "envs" / ".tmp").iterdir())


def test_batch_job_plan_carries_the_environment(tmp_path: Path, monkeypatch):
    """A BatchAPI's workers get the environment from the job's plan (realtime: WorkerSpec)."""
    from kiln.batch.workers import worker_plan
    from kiln.config import load_project
    from kiln.environments import Environments

    monkeypatch.setenv("KILN_ENVS_DIR", str(tmp_path / "envs"))
    monkeypatch.setenv("UV_FIND_LINKS", str(tiny_wheel(tmp_path / "wheels").parent))
    monkeypatch.setenv("UV_OFFLINE", "1")
    folder = tmp_path / "batch"
    write(folder / "requirements.txt", "kiln-offline-demo\n")
    write(
        folder / "predictor.py",
        "import kiln_offline_demo\n\n\nclass PythonPredictor:\n"
        "    def __init__(self, config):\n        pass\n\n"
        "    def predict(self, payload):\n"
        "        return [kiln_offline_demo.VALUE] * len(payload)\n",
    )
    write(
        folder / "kiln.yaml",
        "- kind: BatchAPI\n  name: scorer\n  predictor:\n    type: python\n"
        "    path: predictor.py\n",
    )
    env = Environments().ensure(folder)
    batch_api = load_project(folder).batch_apis[0]
    plan = worker_plan(batch_api, folder, None)
    assert plan["site_dirs"] == env.site_dirs and env.site_dirs
    script = (
        "import sys, orjson\nfrom kiln.batch.runner import load_runner\n"
        "runner = load_runner(orjson.loads(sys.argv[1]), {}, 2)\n"
        "print(runner.run([1, 2], 'b0'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, orjson.dumps(plan).decode()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "[42, 42]", done.stderr


def test_requirements_may_not_reach_out_of_the_project(tmp_path: Path):
    """Includes and local paths stay inside the project; a user's deploy brings no sources."""
    from kiln.environments import BuildFailed, Environments

    secret = write(tmp_path / "admin.key", "kiln-admin-SECRET\n")
    folder = tmp_path / "p"
    envs = Environments(tmp_path / "envs")
    cases = {
        f"-r {secret}\n": "outside the project",
        "-r ../admin.key\n": "outside the project",
        "-f ../\nsomething\n": "outside the project",
        "pkg @ file:///etc/hosts\n": "outside the project",
        "-e .\n": "editable",
    }
    for text, expected in cases.items():
        write(folder / "requirements.txt", text)
        with pytest.raises(BuildFailed) as failed:
            envs.ensure(folder)
        assert expected in failed.value.message and "SECRET" not in failed.value.message
    restricted = {
        "--index-url https://example.invalid/simple\ntabulate\n": "server's choice",
        "tabulate @ https://example.invalid/tabulate.whl\n": "URL requirements",
    }
    for text, expected in restricted.items():
        write(folder / "requirements.txt", text)
        with pytest.raises(BuildFailed) as failed:
            envs.ensure(folder, restricted=True)
        assert expected in failed.value.message
    assert not (tmp_path / "envs").exists() or not Environments(tmp_path / "envs").list()
