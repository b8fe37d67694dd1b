"""`kiln build` (issue 15): a project becomes a runnable, reproducible OCI image.

The image is built with no container daemon (mmdebstrap base, wheels resolved on the
host), then checked with the tools a user has: skopeo inspects it, podman loads and
runs it, and a request through the published port needs the key. The base and the
wheels are cached once per session (one KILN_HOME for every build here); set
KILN_TEST_BUILD_HOME to keep that cache between sessions.

On these machines `podman run` needs `--runtime runc` (crun fails on their cgroup
setup) and explicit ulimits (the default ones cannot be raised).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.build.install import check_tags
from kiln.build.oci import Entry, write_layer

REPO = Path(__file__).resolve().parents[1]
KILN = [sys.executable, "-m", "kiln.cli.main"]
PODMAN_RUN = [
    "podman",
    "run",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
]
KEY = "test-admin-key-0123456789abcdef"
TOOLS = ("mmdebstrap", "podman", "skopeo")
LOADED: list[str] = []  # images podman_load loaded, removed at the session's end
# The first image test builds the base (about 40 s) and downloads the wheels.
pytestmark = pytest.mark.timeout(900)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- fast: the pieces that make digests reproducible --------------------------------


def test_a_layer_has_one_digest_whatever_the_file_times_and_order(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "b").mkdir(parents=True)
    (tree / "b" / "x.py").write_text("x = 1\n")
    (tree / "a.txt").write_text("hello\n")
    from kiln.build.oci import tree_entries

    first = write_layer(tree_entries(tree, "/app"), tmp_path / "blobs")
    os.utime(tree / "a.txt", (1, 1))
    os.utime(tree / "b" / "x.py", (2_000_000_000, 2_000_000_000))
    second = write_layer(list(reversed(tree_entries(tree, "/app"))), tmp_path / "blobs")
    assert first == second
    with tarfile.open(tmp_path / "blobs" / first.digest.split(":")[1]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["app", "app/a.txt", "app/b", "app/b/x.py"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    (tree / "a.txt").write_text("changed\n")
    assert write_layer(tree_entries(tree, "/app"), tmp_path / "blobs").digest != first.digest


def test_a_layer_can_give_the_runtime_user_its_home(tmp_path: Path) -> None:
    layer = write_layer([Entry("home/kiln", "dir", mode=0o755, uid=10001, gid=10001)], tmp_path)
    with tarfile.open(tmp_path / layer.digest.split(":")[1]) as tar:
        (member,) = tar.getmembers()
    assert (member.name, member.uid, member.gid, member.isdir()) == (
        "home/kiln",
        10001,
        10001,
        True,
    )


def test_a_wheel_for_another_python_fails_naming_both_versions(tmp_path: Path) -> None:
    check_tags(Path("numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl"), "3.11")
    check_tags(Path("six-1.16.0-py2.py3-none-any.whl"), "3.12")
    check_tags(Path("protobuf-5.0-cp310-abi3-manylinux2014_x86_64.whl"), "3.11")
    from kiln.build.base import BuildError

    with pytest.raises(BuildError) as raised:
        check_tags(Path("numpy-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl"), "3.11")
    assert "Python cp312" in str(raised.value) and "Python 3.11" in str(raised.value)


def test_extras_asked_for_join_the_projects_and_unknown_ones_are_refused(
    tmp_path: Path,
) -> None:
    """`kiln build --extra ray --extra postgres`: the image a KubeRay cluster runs needs them."""
    from kiln.build.base import BuildError
    from kiln.build.wheels import project_extras, requirement_lines
    from kiln.config import load_project

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "kiln.yaml").write_text("- kind: api\n  name: m\n  onnx: {model: model.onnx}\n")
    project = load_project(tmp_path)
    assert project_extras(project) == ["onnx"]
    extras = project_extras(project, ("ray", "postgres"))
    assert extras == ["onnx", "postgres", "ray"]
    lines = requirement_lines(tmp_path / "kiln_serve-1-py3-none-any.whl", extras, None)
    assert lines[0].startswith("kiln-serve[onnx,postgres,ray]")
    with pytest.raises(BuildError, match="--extra torchx: not an extra kiln build adds"):
        project_extras(project, ("torchx",))


def test_serve_refuses_a_short_admin_key_before_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [*KILN, "serve", str(tmp_path), "--host", "0.0.0.0", "--auth"],
        env={**os.environ, "KILN_API_KEY": "short", "KILN_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "at least 16 characters" in result.stderr and "Traceback" not in result.stderr
    missing = subprocess.run(
        [*KILN, "serve", str(tmp_path), "--auth"],
        env={**os.environ, "KILN_API_KEY_FILE": str(tmp_path / "nope"), "KILN_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "KILN_API_KEY_FILE names" in missing.stderr


# --- images, built and run ----------------------------------------------------------


def _need_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = (
            f"kiln build's image tests need {', '.join(missing)} "
            f"(sudo ./scripts/system-packages.sh installs them)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def build_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One KILN_HOME for every build of the session: the base and wheels build once."""
    _need_tools()
    given = os.environ.get("KILN_TEST_BUILD_HOME")
    home = Path(given) if given else tmp_path_factory.mktemp("build-home")
    # One kiln-serve wheel for the whole session (KILN_WHEEL), so every build here has
    # the same environment layer even while Kiln's source changes under a running test.
    from kiln.build.wheels import kiln_wheel

    wheel = tmp_path_factory.mktemp("kiln-wheel") / "w"
    wheel.mkdir()
    built = kiln_wheel(home, lambda _: None)
    os.environ["KILN_WHEEL"] = str(shutil.copy(built, wheel / built.name))
    yield home
    os.environ.pop("KILN_WHEEL", None)
    for image in LOADED:  # podman's storage outlives the session: leave nothing there
        subprocess.run(["podman", "rmi", "-f", image], capture_output=True, timeout=120)


def kiln_build(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*KILN, "build", *args],
        env={**os.environ, "KILN_HOME": str(home), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def manifest_of(archive: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(manifest digest, manifest, config) read straight from an OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> Any:
            handle = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert handle is not None
            return json.loads(handle.read())

        handle = tar.extractfile("index.json")
        assert handle is not None
        index = json.loads(handle.read())
        digest = index["manifests"][0]["digest"]
        manifest = blob(digest)
        return digest, manifest, blob(manifest["config"]["digest"])


def layer_digests(archive: Path) -> list[str]:
    return [layer["digest"] for layer in manifest_of(archive)[1]["layers"]]


@pytest.fixture(scope="session")
def iris(build_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The iris example, its model built, and its image (the project, the archive)."""
    project = tmp_path_factory.mktemp("iris") / "iris-onnx"
    shutil.copytree(
        REPO / "examples" / "iris-onnx", project, ignore=shutil.ignore_patterns("*.onnx")
    )
    subprocess.run([sys.executable, "build_model.py"], cwd=project, check=True, capture_output=True)
    archive = project.parent / "iris.oci.tar"
    kiln_build(build_home, str(project), "-t", "iris:test", "-o", str(archive))
    return project, archive


HANDLER = """
import os
from pathlib import Path

import inflection

import kiln

SUFFIX = (Path(os.environ["MODEL_DIR"]) / "suffix.txt").read_text().strip()


@kiln.handler
def predict(inputs, context):
    return {"camel": inflection.camelize(inputs["text"]) + SUFFIX}
"""


@pytest.fixture(scope="session")
def pyproject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python-handler project whose requirements.txt names a small pure-Python package."""
    root = tmp_path_factory.mktemp("camel") / "camel"
    (root / "src").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "src" / "main.py").write_text(HANDLER)
    (root / "model" / "suffix.txt").write_text("!\n")
    (root / "requirements.txt").write_text("inflection==0.5.1\n")
    (root / "notes.log").write_text("ignored\n")
    (root / ".kilnignore").write_text("*.log\n")
    (root / "kiln.yaml").write_text(
        "- kind: api\n  name: camel\n  python:\n    handler: src/main.py\n    model: model\n"
    )
    return root


class Container:
    """A podman container of an image, published on a free loopback port."""

    def __init__(self, image: str, env: dict[str, str], secrets: tuple[Path, ...] = ()) -> None:
        self.port = free_port()
        self.name = f"kiln-build-test-{os.getpid()}-{self.port}"
        flags = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        for secret in secrets:  # mounted as /run/secrets/key, read-only
            flags += ["-v", f"{secret}:/run/secrets/key:ro"]
        subprocess.run(
            [
                *PODMAN_RUN,
                "-d",
                "--name",
                self.name,
                "-p",
                f"127.0.0.1:{self.port}:8080",
                "--health-cmd",
                _health_cmd(),
                *flags,
                image,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any, key: str | None, deadline_s: float = 90) -> httpx.Response:
        """POST, retrying while the server starts (connection refused or 503)."""
        headers = {"x-api-key": key} if key else {}
        end = time.monotonic() + deadline_s
        while True:
            try:
                response = httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30)
                if response.status_code != 503 or time.monotonic() > end:
                    return response
            except httpx.TransportError:
                if time.monotonic() > end:
                    raise AssertionError(self.logs()) from None
            time.sleep(0.2)

    def logs(self) -> str:
        result = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
        return result.stdout + result.stderr

    def stop(self) -> tuple[int, float]:
        started = time.monotonic()
        subprocess.run(["podman", "stop", "-t", "20", self.name], capture_output=True, timeout=60)
        took = time.monotonic() - started
        code = subprocess.run(
            ["podman", "inspect", self.name, "--format", "{{.State.ExitCode}}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        subprocess.run(["podman", "rm", "-f", self.name], capture_output=True)
        return int(code), took


def _health_cmd() -> str:
    from kiln.build.image import HEALTH_CMD

    return HEALTH_CMD


def podman_load(archive: Path) -> str:
    result = subprocess.run(
        ["podman", "load", "-i", str(archive)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    image = result.stdout.strip().rsplit("Loaded image: ", 1)[-1].split()[0]
    LOADED.append(image)
    return image


def test_iris_image_is_what_skopeo_sees(iris: tuple[Path, Path]) -> None:
    _, archive = iris
    result = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci-archive:{archive}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)["config"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"8080/tcp", "8081/tcp", "8082/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    assert config["Cmd"][1:4] == ["serve", "/app", "--host"] and config["Cmd"][-1] == "--auth"
    assert "--allow-unauthenticated" not in config["Cmd"]
    # OCI has no health check field: Docker's Healthcheck rides in the config (skopeo's
    # view drops it) and the same command in a label.
    assert "/healthz" in manifest_of(archive)[2]["config"]["Healthcheck"]["Test"][1]
    assert "/healthz" in config["Labels"]["io.kiln.healthcheck"]
    inspected = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True
        ).stdout
    )
    assert inspected["Digest"] == manifest_of(archive)[0]
    assert len(inspected["Layers"]) == 4  # base, environment, project, model


def test_two_builds_give_one_digest_even_with_the_layer_cache_gone(
    iris: tuple[Path, Path], build_home: Path
) -> None:
    project, first = iris
    shutil.rmtree(build_home / "build" / "layers")  # the environment layer is made again
    second = project.parent / "iris-again.oci.tar"
    kiln_build(build_home, str(project), "-t", "iris:test", "-o", str(second))
    assert manifest_of(second)[0] == manifest_of(first)[0]
    assert second.read_bytes() == first.read_bytes()


def test_iris_image_runs_as_a_user_with_keys_on_and_stops_on_sigterm(
    iris: tuple[Path, Path],
) -> None:
    project, archive = iris
    image = podman_load(archive)
    assert image == "localhost/iris:test"
    container = Container(image, {"KILN_API_KEY": KEY})
    try:
        sample = json.loads((project / "sample.json").read_text())
        answer = container.post("/iris", sample, KEY)
        assert answer.status_code == 200, container.logs()
        assert answer.json()["label"] == "setosa"
        refused = container.post("/iris", sample, None)
        assert refused.status_code == 401
        assert container.post("/iris", sample, "wrong-key-0123456789").status_code == 401
        whoami = subprocess.run(
            ["podman", "exec", container.name, "id", "-u"], capture_output=True, text=True
        )
        assert whoami.stdout.strip() == "10001"
        health = subprocess.run(
            ["podman", "healthcheck", "run", container.name], capture_output=True, text=True
        )
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        code, took = container.stop()
    assert code == 0 and took < 15, container.logs()


def test_python_handler_image_and_which_layer_each_change_moves(
    pyproject: Path, build_home: Path, tmp_path: Path
) -> None:
    pyproject = shutil.copytree(pyproject, tmp_path / "camel")
    first = tmp_path / "camel-1.tar"
    kiln_build(build_home, str(pyproject), "-t", "camel:1", "-o", str(first))
    base, env, code, model = layer_digests(first)
    with tarfile.open(first) as tar:  # .kilnignore holds: notes.log is not in the project layer
        handle = tar.extractfile(f"blobs/sha256/{code.split(':')[1]}")
        assert handle is not None
        with tarfile.open(fileobj=handle, mode="r:gz") as layer:
            names = layer.getnames()
    assert "app/src/main.py" in names and "app/notes.log" not in names
    assert not any(n.startswith("app/model/") for n in names)

    image = podman_load(first)
    # KILN_API_KEY_FILE names a file the container lacks: it refuses to start.
    name = f"kiln-build-test-nokey-{os.getpid()}"
    subprocess.run(
        [*PODMAN_RUN, "--name", name, "-e", "KILN_API_KEY_FILE=/run/secrets/key", image],
        capture_output=True,
        timeout=120,
    )
    logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
    code = subprocess.run(
        ["podman", "inspect", name, "--format", "{{.State.ExitCode}}"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    assert code == "2" and "KILN_API_KEY_FILE names /run/secrets/key" in logs.stdout + logs.stderr

    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    container = Container(image, {"KILN_API_KEY_FILE": "/run/secrets/key"}, (key_file,))
    try:
        answer = container.post("/camel", {"text": "hello_world"}, KEY)
        assert answer.status_code == 200, container.logs()
        assert answer.json() == {"camel": "HelloWorld!"}
        assert container.post("/camel", {"text": "a"}, None).status_code == 401
    finally:
        container.stop()

    (pyproject / "src" / "main.py").write_text(HANDLER.replace("+ SUFFIX", '+ SUFFIX + "?"'))
    second = tmp_path / "camel-2.tar"
    kiln_build(build_home, str(pyproject), "-t", "camel:2", "-o", str(second))
    after_code = layer_digests(second)
    assert after_code[:2] == [base, env] and after_code[3] == model and after_code[2] != code

    (pyproject / "model" / "suffix.txt").write_text("?\n")
    third = tmp_path / "camel-3.tar"
    kiln_build(build_home, str(pyproject), "-t", "camel:2", "-o", str(third))
    after_model = layer_digests(third)
    assert after_model[:3] == after_code[:3] and after_model[3] != model


def test_context_builds_with_podman_on_the_mmdebstrap_base(
    pyproject: Path, build_home: Path, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    kiln_build(build_home, str(pyproject), "--context", str(context))
    assert (context / "Dockerfile").read_text() == (
        REPO / "src" / "kiln" / "cli" / "templates" / "_common" / "Dockerfile"
    ).read_text().replace("{{name}}", "camel")
    assert (context / "wheels" / "requirements.txt").read_text().splitlines()[1:] == [
        "kiln-serve",
        "inflection==0.5.1",
    ]
    assert sorted(p.name for p in (context / "model" / "model").iterdir()) == ["suffix.txt"]
    assert not (context / "project" / "notes.log").exists()
    (base,) = (build_home / "build").glob("base-*.tar")
    tag = f"localhost/kiln-context-test:{os.getpid()}"
    before = set(_image_ids())
    built = subprocess.run(
        [
            "podman",
            "build",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--network",
            "none",
            "--build-arg",
            f"BASE=oci-archive:{base}",
            "-t",
            tag,
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    container = Container(tag, {"KILN_API_KEY": KEY})
    try:
        answer = container.post("/camel", {"text": "snake_case"}, KEY)
        assert answer.status_code == 200, container.logs()
        assert answer.json()["camel"].startswith("SnakeCase")
        assert container.post("/camel", {"text": "a"}, None).status_code == 401
    finally:
        code, _ = container.stop()
        # The image, its build stage and the imported base: what this build added.
        for image in sorted(set(_image_ids()) - before):
            subprocess.run(["podman", "rmi", "-f", image], capture_output=True, timeout=120)
    assert code == 0


def _image_ids() -> list[str]:
    listed = subprocess.run(
        ["podman", "images", "-q", "--no-trunc"], capture_output=True, text=True, timeout=60
    )
    return listed.stdout.split()


def test_a_base_without_python_is_refused_naming_the_fix(tmp_path: Path) -> None:
    from kiln.build.base import BuildError, open_base
    from kiln.build.oci import Image

    blobs = tmp_path / "blobs"
    layer = write_layer([Entry("etc/hostname", "file", data=b"x\n")], blobs)
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    Image(blobs, [layer], config, ref="nopython:1").write(tmp_path / "nopython.tar")
    with pytest.raises(BuildError) as raised:
        open_base(str(tmp_path / "nopython.tar"), None, tmp_path / "home", lambda _: None)
    assert "has no Python 3" in str(raised.value) and "Python 3.11+" in str(raised.value)


def test_base_given_as_an_archive_or_a_layout_gives_the_same_image(
    iris: tuple[Path, Path], build_home: Path, tmp_path: Path
) -> None:
    project, default = iris
    (base,) = (build_home / "build").glob("base-*.tar")
    from_archive = tmp_path / "from-archive.tar"
    kiln_build(
        build_home, str(project), "-t", "iris:test", "--base", str(base), "-o", str(from_archive)
    )
    assert manifest_of(from_archive)[0] == manifest_of(default)[0]
    layout = tmp_path / "base-layout"
    subprocess.run(
        ["skopeo", "copy", f"oci-archive:{base}", f"oci:{layout}"], check=True, capture_output=True
    )
    out_layout = tmp_path / "image-layout"  # not .tar: an OCI layout folder
    kiln_build(
        build_home, str(project), "-t", "iris:test", "--base", str(layout), "-o", str(out_layout)
    )
    index = json.loads((out_layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == manifest_of(default)[0]
    assert (out_layout / "oci-layout").is_file()


def test_push_without_a_reachable_registry_fails_clearly_after_building(
    iris: tuple[Path, Path], build_home: Path, tmp_path: Path
) -> None:
    project, _ = iris
    out = tmp_path / "pushed.tar"
    result = subprocess.run(
        [*KILN, "build", str(project), "-o", str(out), "--push", "127.0.0.1:9/kiln/iris:x"],
        env={**os.environ, "KILN_HOME": str(build_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "could not push to 127.0.0.1:9/kiln/iris:x" in result.stderr
    assert "Traceback" not in result.stderr and out.is_file()


def test_build_deploy_rolls_out_the_revision_it_built(
    iris: tuple[Path, Path], build_home: Path, tmp_path: Path
) -> None:
    from daemon import Daemon

    project, _ = iris
    home = tmp_path / "server-home"
    home.mkdir()
    (home / "build").symlink_to(build_home / "build")  # the session's base and wheels
    daemon = Daemon(home)
    daemon.start()
    try:
        done = daemon.kiln(
            "build", str(project), "-o", str(tmp_path / "d.tar"), "--deploy", timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        built = done.stdout.split("(revision ", 1)[1].split(")", 1)[0]
        assert f"Deploying iris-onnx revision {built}" in done.stdout
        sample = json.loads((project / "sample.json").read_text())
        answer = daemon.http.post(f"{daemon.url}/iris", json=sample)
        assert answer.status_code == 200 and answer.json()["label"] == "setosa"
    finally:
        daemon.stop()


def test_an_installed_distribution_becomes_a_wheel_the_installer_takes(tmp_path: Path) -> None:
    """Kiln installed from a wheel (no source tree): its wheel is made from the installed
    files; shown on pathspec (pure Python, installed with Kiln)."""
    from kiln.build.install import install
    from kiln.build.wheels import wheel_from_installed

    wheel = wheel_from_installed("pathspec", tmp_path / "wheels")
    assert wheel.name.startswith("pathspec-") and wheel.name.endswith("-py3-none-any.whl")
    install([wheel], tmp_path / "root", "/usr/bin/python3.11", "3.11", compile_pyc=False)
    site = tmp_path / "root" / "opt/kiln/venv/lib/python3.11/site-packages"
    import pathspec

    assert (site / "pathspec" / "__init__.py").read_bytes() == (
        Path(pathspec.__file__).read_bytes()
    )
    assert os.readlink(tmp_path / "root" / "opt/kiln/venv/bin/python") == "/usr/bin/python3.11"
    cfg = (tmp_path / "root" / "opt/kiln/venv/pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg and "include-system-site-packages = false" in cfg


def test_without_mmdebstrap_or_base_the_error_names_what_to_install(tmp_path: Path) -> None:
    project = tmp_path / "p"
    shutil.copytree(REPO / "examples" / "hub-python", project)
    (project / "model").mkdir(exist_ok=True)
    result = subprocess.run(
        [*KILN, "build", str(project)],
        env={**os.environ, "KILN_HOME": str(tmp_path / "home"), "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    error = " ".join(result.stderr.split())
    assert "mmdebstrap, which is not installed" in error
    assert "apt-get install mmdebstrap" in error and "--base PATH" in error
    assert "Traceback" not in error
