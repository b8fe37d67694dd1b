"""The Ray backend's pure parts, without a cluster: the flags' checks, the spec a control
plane sends a node, Serve's failure text, a job's plan rebased on a node, and the sandbox
rule for nodes without bubblewrap."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
from support import write

pytest.importorskip("ray.serve")

from kiln.backends.ray.batch import rebased  # noqa: E402
from kiln.backends.ray.cluster import _failure  # noqa: E402
from kiln.backends.ray.replica import api_from_args, sandbox_policy, spec_args  # noqa: E402
from kiln.cli.server_backend import BackendFlagError, check_backend, normalized_store  # noqa: E402
from kiln.config import load_project  # noqa: E402
from kiln.control.shared_quotas import in_namespace  # noqa: E402
from kiln.sandbox.probe import SandboxUnavailable  # noqa: E402

PG = "postgresql://kiln:secret@db/kiln"


def test_backend_flags_are_checked_before_anything_starts() -> None:
    check_backend({"backend": "local"})
    check_backend({"backend": "ray", "ray_address": "auto", "store": PG})
    with pytest.raises(BackendFlagError, match="use `local` or `ray`"):
        check_backend({"backend": "k8s"})
    with pytest.raises(BackendFlagError, match="needs --ray-address"):
        check_backend({"backend": "ray", "store": PG})
    with pytest.raises(BackendFlagError, match="needs a store the cluster shares"):
        check_backend({"backend": "ray", "ray_address": "auto", "store": None})
    with pytest.raises(BackendFlagError, match="SQLite stays on this machine"):
        check_backend({"backend": "ray", "ray_address": "auto", "store": "sqlite:////tmp/s.db"})
    assert normalized_store(PG) == "postgresql+psycopg://kiln:secret@db/kiln"
    assert normalized_store("postgres://a@b/c") == "postgresql+psycopg://a@b/c"
    assert normalized_store("sqlite:///x.db") == "sqlite:///x.db"


def test_a_users_api_travels_with_its_namespace_and_paths_under_the_nodes_folder(
    tmp_path: Path,
) -> None:
    root = tmp_path / "artifacts" / "alice.shop" / "abc123"
    write(root / "handler.py", "def predict(payload, context):\n    return payload\n")
    write(root / "kiln.yaml", "- kind: api\n  name: echo\n  python: {handler: handler.py}\n")
    api = in_namespace(load_project(root).apis[0], "alice")
    sent = spec_args(api, str(root))
    assert str(root) not in orjson.dumps(sent).decode()  # no control-plane path on the wire
    node = api_from_args(sent, "/tmp/ray/session/runtime_resources/working_dir_files/pkg")
    assert node.name == "alice.echo" and node.endpoint == "/alice/echo"
    assert node.python.handler.startswith("/tmp/ray/session/runtime_resources/")
    assert node.python_path == "/tmp/ray/session/runtime_resources/working_dir_files/pkg"
    assert node.model_dump(exclude={"python", "python_path"}) == api.model_dump(
        exclude={"python", "python_path"}
    )


SERVE_MESSAGE = (
    "Failed to update the deployments ['api'].\nThe deployment failed to start 6 times in a "
    "row. See controller logs for details. Error:\n\x1b[36mray::ServeReplica:echo-4634:api."
    'initialize_and_get_metadata()\x1b[39m (pid=8261, ip=127.0.0.1)\n  File "x.py", line 1, '
    "in result\n    return self.__get_result()\nRuntimeError: Traceback (most recent call last):"
    '\n  File "/work/main/src/kiln/serving/replica.py", line 205, in start\n    raise '
    "LoadFailed(message.error, message.permanent)\nkiln.serving.replica.LoadFailed: "
    "RuntimeError: this revision cannot load its model"
)


def test_a_failed_application_reports_the_workers_own_error_line() -> None:
    entry = {
        "status": "DEPLOY_FAILED",
        "message": "",
        "deployments": {"api": {"message": SERVE_MESSAGE}},
    }
    assert _failure(entry) == "RuntimeError: this revision cannot load its model"
    assert _failure({"message": ""}) == "Ray Serve could not start the API"


@dataclasses.dataclass(frozen=True)
class _Job:
    plan: str


def test_a_jobs_frozen_plan_is_rebased_onto_the_nodes_working_dir(tmp_path: Path) -> None:
    old = "/home/kiln/artifacts/scoring/abc"
    plan = {
        "root": old,
        "python_path": old,
        "predictor_path": f"{old}/predictor.py",
        "site_dirs": [str(tmp_path), "/nonexistent/env/site-packages"],
    }
    moved = orjson.loads(rebased(_Job(orjson.dumps(plan).decode()), "/node/wd/").plan)
    assert moved["root"] == "/node/wd" and moved["predictor_path"] == "/node/wd/predictor.py"
    assert moved["site_dirs"] == [str(tmp_path)]  # environments absent on the node go


def test_sandbox_on_refuses_a_node_without_bubblewrap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Tenants' replicas and job workers run with sandbox "on": a node without bubblewrap
    refuses them (the deploy fails with this message) instead of running them bare."""
    from kiln.sandbox.probe import probe

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, no setpriv on this "node"
    probe.cache_clear()  # the machine's answer is cached per process
    try:
        with pytest.raises(SandboxUnavailable):
            sandbox_policy("on")
        assert sandbox_policy("auto").enabled is False
        assert sandbox_policy("off").enabled is False
    finally:
        monkeypatch.undo()
        probe.cache_clear()  # later tests probe the real machine again


def test_requirements_become_the_runtime_envs_pip_packages(tmp_path: Path) -> None:
    from kiln.backends.ray.project_env import pip_packages

    assert pip_packages(tmp_path) == []
    write(tmp_path / "requirements.txt", "# pinned\nrequests==2.32.3  # http\n\nnumpy>=1.26\n")
    assert pip_packages(tmp_path) == ["requests==2.32.3", "numpy>=1.26"]
