"""The data plane layer (serving/data_plane.py): one place between the protocol adapters and
the served APIs that resolves, admits, enqueues, maps errors and meters.

Three levels: the source (no ContextVar carries the caller or the version; adapters never
admit or meter themselves), the layer alone (metering only after admission, the successor's
version reported), and real servers (a load error reaches only those who may read it:
in full on `kiln serve`, hidden from anonymous callers on `kiln server`, in full for the
admin and for an API with `serving.expose_errors: true`).
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon import Daemon
from support import write

from kiln.errors import KilnError, TooManyRequests
from kiln.serving.availability import unavailable
from kiln.serving.data_plane import DataPlane
from kiln.serving.router import Registry

SRC = Path(__file__).resolve().parent.parent / "src" / "kiln"
SECRET = "password=hunter2"


# ----- the source ------------------------------------------------------------------------
def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))]


def test_no_context_var_carries_the_caller_or_the_served_version() -> None:
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign):
                targets, value = [node.target], node.value  # type: ignore[assignment]
            else:
                continue
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            called = value.func if isinstance(value, ast.Call) else None
            is_context_var = (isinstance(called, ast.Name) and called.id == "ContextVar") or (
                isinstance(called, ast.Attribute) and called.attr == "ContextVar"
            )
            if is_context_var and names & {"CALLER", "SERVED_VERSION"}:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {sorted(names)}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in ("CALLER", "SERVED_VERSION"):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} uses {node.id}")
    assert found == []


_METERING_MODULES = ("kiln.control.quotas", "kiln.control.accounts", "kiln.control.durable")
# The inference port's app and its protocol adapters (the edge and the management port
# have `admit`/`record` methods of their own: connections, model records).
_ADAPTERS = {
    "app.py", "auth.py", "batch.py", "kserve_v1.py", "native.py", "openapi.py",
    "streaming.py", "torchserve.py", "v2.py",
    # the gRPC port (protocols/grpc/)
    "rpc.py", "v2_service.py", "torchserve_service.py", "server.py", "v2_tensors.py",
}  # fmt: skip
_GATES = {"auth", "authority", "quotas"}  # what the QuotaGate is called where it is held


def test_protocol_adapters_leave_admission_and_metering_to_the_data_plane() -> None:
    """No module of kiln.protocols imports the quota or metering modules or admits and
    meters through the QuotaGate; the adapters call `admit` on the data plane only."""
    problems = []
    for path, tree in _modules():
        if "protocols" not in path.relative_to(SRC).parts:  # protocols/ and protocols/grpc/
            continue
        where = path.relative_to(SRC)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                named = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n.startswith(m) for n in named for m in _METERING_MODULES):
                    problems.append(f"{where}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(_METERING_MODULES):
                        problems.append(f"{where}:{node.lineno} imports {alias.name}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("admit", "record")
            ):
                owner = node.func.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name in _GATES or (path.name in _ADAPTERS and name != "plane"):
                    problems.append(f"{where}:{node.lineno} calls {ast.unparse(node.func)}")
    assert problems == []


# ----- the layer alone -------------------------------------------------------------------
class _Principal:
    def __init__(self, user: str, is_admin: bool = False) -> None:
        self.user, self.is_admin = user, is_admin
        self.key_id = f"key-{user}"
        self.sees_all = is_admin
        self.scope_key = (user, is_admin)

    def sees(self, name: str) -> bool:
        return self.is_admin or name.startswith(f"{self.user}.")

    def owns(self, name: str) -> bool:
        return self.sees(name)


class _Authority:
    """QuotaGate's contract: admit() counts or raises 429, record() meters."""

    def __init__(self, calls: int) -> None:
        self.left = calls
        self.recorded: list[tuple[str, str, str, int]] = []

    def admit(self, principal: Any) -> dict[str, str]:
        if self.left <= 0:
            raise TooManyRequests("quota exceeded", retry_after=60)
        self.left -= 1
        return {"X-RateLimit-Remaining": str(self.left)}

    def record(self, principal: Any, api: str, version: str, status: int) -> None:
        self.recorded.append((principal.key_id, api, version, status))


class _Api:
    class serving:  # noqa: N801 - shaped like the config block
        startup_timeout_s = 1.0

    endpoint = "/x"
    default = False


class _Served:
    """What the data plane reads of a ServedApi."""

    def __init__(self, name: str, version: str | None, answer: str) -> None:
        self.name, self.version, self.api = name, version, _Api()
        self.answer = answer
        self.successor: _Served | None = None
        self.state = "ready"
        self.error: str | None = None

        class _Spec:
            expose_errors = False

        self.worker_spec = _Spec()

    async def predict(self, request: Any) -> str:
        return self.answer


def _registry(*served: _Served) -> Registry:
    registry = Registry()
    for s in served:
        registry.add(s)  # type: ignore[arg-type]
    return registry


def test_a_refused_call_is_never_metered_and_an_admitted_one_once() -> None:
    served = _Served("alice.echo", None, "ok")
    authority = _Authority(calls=1)
    plane = DataPlane(_registry(served), authority)
    alice = _Principal("alice")

    admitted = plane.call(alice)
    plane.admit(admitted, "alice.echo")
    assert admitted.rate_headers == [(b"x-ratelimit-remaining", b"0")]
    assert asyncio.run(plane.predict(admitted, served, None)) == "ok"  # type: ignore[arg-type]
    plane.finish(admitted, 200)
    plane.finish(admitted, 200)  # a second finish meters nothing

    refused = plane.call(alice)
    with pytest.raises(TooManyRequests):
        plane.admit(refused, "alice.echo")
    plane.finish(refused, 429)
    assert authority.recorded == [("key-alice", "alice.echo", "", 200)]


def test_the_successor_answers_for_a_replaced_version_and_its_version_is_reported() -> None:
    old = _Served("alice.echo", "1", "from v1")
    new = _Served("alice.echo", "2", "from v2")
    authority = _Authority(calls=5)
    plane = DataPlane(_registry(old), authority)
    call = plane.call(_Principal("alice"))
    served = plane.resolve(call, "alice.echo", "1")
    old.successor, old.state = new, "stopped"  # a rollout swapped it while the call was routed
    plane.admit(call, served.name)
    assert asyncio.run(plane.predict(call, served, None)) == "from v2"  # type: ignore[arg-type]
    assert call.version == "2"
    plane.finish(call, 200)
    assert authority.recorded == [("key-alice", "alice.echo", "2", 200)]


def test_a_callers_view_hides_other_users_apis_without_any_ambient_state() -> None:
    plane = DataPlane(_registry(_Served("alice.a", None, ""), _Served("bob.b", None, "")))
    assert sorted(plane.call(None).view.groups) == ["alice.a", "bob.b"]
    assert sorted(plane.call(_Principal("alice")).view.groups) == ["alice.a"]
    assert sorted(plane.call(_Principal("root", is_admin=True)).view.groups) == [
        "alice.a",
        "bob.b",
    ]
    with pytest.raises(KilnError) as missing:
        plane.resolve(plane.call(_Principal("alice")), "bob.b", None)
    assert missing.value.status == 404


def test_a_load_error_is_shown_to_its_owner_and_hidden_from_others() -> None:
    served = _Served("alice.echo", None, "")
    served.state, served.error = "failed", f"RuntimeError: {SECRET}"
    plane = DataPlane(_registry(served))
    raised = unavailable(served)  # the 503 every path raises for a failed API
    assert raised is not None and SECRET in raised.message

    anonymous = plane.call(None)
    anonymous.api = "alice.echo"
    hidden = plane.public_error(anonymous, raised)
    assert SECRET not in hidden.message and "kiln get alice.echo" in hidden.message
    assert hidden.status == 503 and hidden.retry_after == 5  # type: ignore[attr-defined]

    owner = plane.call(_Principal("alice"))
    owner.api = "alice.echo"
    assert plane.public_error(owner, raised) is raised
    served.worker_spec.expose_errors = True  # `kiln serve`, or serving.expose_errors: true
    assert plane.public_error(anonymous, raised) is raised


# ----- real servers ----------------------------------------------------------------------
FLAKY = f"""
from pathlib import Path


class Model:
    def load(self, model_dir, config):
        if (Path(__file__).parent / "broken").exists():
            raise RuntimeError("cannot read /srv/weights.bin with {SECRET}")

    def predict(self, payload, context):
        return {{"echo": payload}}
"""
FLAKY_CONFIG = """
- kind: api
  name: flaky
  python: {handler: flaky.py:Model}
- kind: api
  name: flaky-open
  python: {handler: flaky.py:Model}
  serving: {expose_errors: true}
"""


def _break_and_reload(d: Daemon, headers: dict[str, str]) -> list[httpx.Response]:
    """Unload, plant the marker in the deployed revision, load again: the load now fails."""
    markers = [p.parent / "broken" for p in (d.home / "artifacts").rglob("flaky.py")]
    assert markers, "the deployed revision has flaky.py"
    answers = []
    for name in ("flaky", "flaky-open"):
        url = f"{d.url}/v2/repository/models/{name}"
        assert httpx.post(f"{url}/unload", json={}, headers=headers).status_code == 200
    for marker in markers:
        marker.write_text("")
    for name in ("flaky", "flaky-open"):
        url = f"{d.url}/v2/repository/models/{name}"
        answers.append(httpx.post(f"{url}/load", json={}, headers=headers, timeout=120))
    return answers


def _load_error_answers(url: str, name: str, headers: dict[str, str]) -> list[httpx.Response]:
    """The 503 of a failed API on every protocol's inference route."""
    return [
        httpx.post(f"{url}/{name}", json=1, headers=headers),
        httpx.post(f"{url}/predictions/{name}", json=1, headers=headers),
        httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": [1]}, headers=headers),
        httpx.get(f"{url}/v1/models/{name}", headers=headers),
        httpx.post(
            f"{url}/v2/models/{name}/infer",
            json={"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]},
            headers=headers,
        ),
    ]


def _text(response: httpx.Response) -> str:
    return response.text


def test_kiln_server_hides_a_load_error_from_anonymous_callers_not_from_the_admin(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    write(project / "flaky.py", FLAKY)
    write(project / "kiln.yaml", FLAKY_CONFIG)
    d = Daemon(tmp_path / "home")
    d.start("--no-auth")
    try:
        deployed = d.kiln("deploy", str(project))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        d.wait_until(
            lambda: httpx.post(f"{d.url}/flaky", json=1).status_code == 200, what="flaky live"
        )
        loads = _break_and_reload(d, {})
        assert [r.status_code for r in loads] == [503, 503]
        assert SECRET not in loads[0].text and "kiln get flaky" in loads[0].text
        assert SECRET in loads[1].text  # serving.expose_errors: true

        hidden = _load_error_answers(d.url, "flaky", {})
        assert [r.status_code for r in hidden] == [503] * 5, [r.text for r in hidden]
        for response in hidden:
            assert SECRET not in response.text, response.text
            assert "kiln get flaky" in response.text, response.text
            assert "Traceback" not in response.text
        assert hidden[0].headers["retry-after"]
        assert hidden[1].json()["type"] == "ServiceUnavailableException"
        listed = {a["name"]: a for a in httpx.get(f"{d.url}/apis").json()["apis"]}
        assert SECRET not in str(listed["flaky"]) and "kiln get flaky" in listed["flaky"]["error"]

        shown = _load_error_answers(d.url, "flaky-open", {})
        assert [r.status_code for r in shown] == [503] * 5
        assert all(SECRET in r.text for r in shown), [r.text for r in shown]

        # The owner's tools show why: `kiln get` reads the management port.
        got = d.kiln("get", "flaky", "-o", "json")
        assert got.returncode == 0, got.stderr
        assert SECRET in got.stdout

        # With API keys on, the admin (owner of these APIs) reads the error in full.
        d.stop()
        d.start("--auth")
        d.wait_until(
            lambda: httpx.post(f"{d.url}/flaky", json=1, headers=d.auth).status_code == 503,
            what="flaky failed after the restart",
        )
        admin = _load_error_answers(d.url, "flaky", d.auth)
        assert [r.status_code for r in admin] == [503] * 5, [r.text for r in admin]
        assert all(SECRET in r.text for r in admin), [r.text for r in admin]
    finally:
        d.stop()


def test_kiln_serve_shows_a_load_error_in_full(tmp_path: Path, serve_project: Any) -> None:
    write(tmp_path / "flaky.py", FLAKY)
    write(tmp_path / "broken", "")
    write(
        tmp_path / "kiln.yaml", "- kind: api\n  name: flaky\n  python: {handler: flaky.py:Model}\n"
    )
    srv = serve_project(tmp_path)
    answers = _load_error_answers(srv.url, "flaky", {})
    assert [r.status_code for r in answers] == [503] * 5, [r.text for r in answers]
    assert all(SECRET in r.text for r in answers), [r.text for r in answers]
