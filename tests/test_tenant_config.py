"""What a tenant's kiln.yaml may reach: `${VAR}` only from the deployment's own `.env`
and `env:` mappings (the admin also from `--pass-env` server variables), paths only
inside the uploaded revision, and `env:` layered API > deployment > `.env` into the
workers. Config-level policies first, then end to end against a real `kiln server`."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
from daemon import Daemon
from support import write

from kiln.config import ConfigError, load_project
from kiln.config.policy import ADMIN, LOCAL, USER, expand_dotenv, server_variables
from kiln.control.packaging import pack_project
from kiln.control.tenancy import config_scope

SECRET = "TENANT_TEST_SECRET"  # planted in the server's environment; never for users
PASSED = "TENANT_TEST_PASSED"  # allowed to the admin with --pass-env 'TENANT_TEST_PASS*'

ENV_HANDLER = """
import os


class Env:
    def predict(self, payload, context):
        return {name: os.environ.get(name) for name in payload}
"""


ONE_API = "- kind: api\n  name: e\n  python: {handler: h.py:Env}\n"


def issues_of(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(str(i) for i in exc.value.issues)


def python_project(folder: Path, config: str, dotenv: str | None = None) -> Path:
    write(folder / "h.py", ENV_HANDLER)
    write(folder / "kiln.yaml", config)
    if dotenv is not None:
        write(folder / ".env", dotenv)
    return folder


# ---- ${VAR} policies, at the config level ---------------------------------------------

LAYERED = """\
- kind: deployment
  name: shop
  env: {A: dep, B: dep, COUNT: 007}
- kind: api
  name: envs
  env:
    B: api-${FROM_DOTENV}
  python: {handler: h.py:Env}
  config: {a: "${A}", b: "${B}", d: "${FROM_DOTENV}", n: "${COUNT}"}
"""


def test_env_layers_feed_workers_and_var_api_over_deployment_over_dotenv(tmp_path: Path) -> None:
    folder = python_project(tmp_path / "p", LAYERED)
    dotenv = {"FROM_DOTENV": "dv", "A": "dotenv", "ONLY_DOTENV": "x"}
    for policy in (USER, ADMIN):
        project = load_project(folder, policy=policy, dotenv=dotenv)
        api = project.apis[0]
        # env: values are text as written (007 stays 007), and may use ${VAR} from .env
        assert api.env == {"A": "dep", "B": "api-dv", "COUNT": "007"}
        assert api.worker_env == {**dotenv, "A": "dep", "B": "api-dv", "COUNT": "007"}
        assert api.config == {"a": "dep", "b": "api-dv", "d": "dv", "n": "007"}
        assert "ONLY_DOTENV" not in str(api.model_dump())  # .env values stay out of reports


def test_a_users_kiln_yaml_cannot_read_the_servers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET, "s3cr3t")
    folder = python_project(
        tmp_path / "p",
        "- kind: api\n  name: envs\n  python: {handler: h.py:Env}\n"
        f"  config: {{home: '${{HOME}}', key: '${{{SECRET}}}', ok: '${{MISSING:-fallback}}'}}\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_project(folder, policy=USER, dotenv={})
    text = issues_of(exc)
    assert "variable HOME is not set" in text and f"variable {SECRET} is not set" in text
    assert "field config.home" in text and "field config.key" in text
    assert "only from the project's .env and its env: mappings" in text
    assert "s3cr3t" not in text
    # the same file under `kiln serve` (LOCAL) reads the environment, as before
    project = load_project(folder, policy=LOCAL)
    assert project.apis[0].config["key"] == "s3cr3t"
    assert project.apis[0].config["ok"] == "fallback"
    # and a user's .env may set what the file reads
    project = load_project(folder, policy=USER, dotenv={"HOME": "/h", SECRET: "mine"})
    assert project.apis[0].config == {"home": "/h", "key": "mine", "ok": "fallback"}


def test_the_admin_reads_only_allow_listed_server_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET, "s3cr3t")
    monkeypatch.setenv(PASSED, "passed")
    folder = python_project(
        tmp_path / "p",
        "- kind: api\n  name: envs\n  python: {handler: h.py:Env}\n"
        f"  env: {{TOKEN: '${{{PASSED}}}'}}\n  config: {{key: '${{{SECRET}}}'}}\n",
        dotenv=f"FROM_FILE=${{{SECRET}}}-${{{PASSED}}}\n",
    )
    server = SimpleNamespace(pass_env=["TENANT_TEST_PASS*"], options=SimpleNamespace(mode="server"))
    scope = config_scope(folder, None, server)
    assert scope.policy is ADMIN
    # python-dotenv would expand ${SECRET} from the server's environment: not here
    assert scope.dotenv == {"FROM_FILE": "-passed"}
    with pytest.raises(ConfigError) as exc:
        load_project(folder, **scope.kwargs())
    text = issues_of(exc)
    assert f"variable {SECRET} is not set" in text and "--pass-env" in text
    assert "TOKEN" not in text  # the allowed one resolved
    # a user's deployment of the same folder reads no server variable at all
    user = config_scope(folder, "mallory", server)
    assert user.policy is USER and user.dotenv == {"FROM_FILE": "-"}
    with pytest.raises(ConfigError) as exc:
        load_project(folder, **user.kwargs())
    assert f"variable {PASSED} is not set" in issues_of(exc)
    # `kiln serve` (mode serve) passes every variable to the admin's deploys, as before
    serve = SimpleNamespace(options=SimpleNamespace(mode="serve"))
    assert load_project(folder, **config_scope(folder, None, serve).kwargs())


def test_server_variables_and_dotenv_expansion() -> None:
    environ = {"AWS_KEY": "k", "AWS_REGION": "r", "HOME": "/root", "aws_lower": "x"}
    assert server_variables(environ, ["AWS_*"]) == {"AWS_KEY": "k", "AWS_REGION": "r"}
    assert server_variables(environ, []) == {}
    raw = {"A": "1", "B": "${A}-${NOPE}-${NOPE:-d}", "C": "$${A}", "D": None}
    assert expand_dotenv(raw, {}) == {"A": "1", "B": "1--d", "C": "${A}"}


@pytest.mark.parametrize(
    "env,message",
    [
        ("{KILN_API: x}", "KILN_API is set by Kiln"),
        ("{PYTHONPATH: x}", "python_path"),
        ("{CUDA_VISIBLE_DEVICES: '0'}", "compute.gpu"),
        ("{1BAD: x}", "invalid variable name"),
        ("{A: [1, 2]}", "must be text"),
        ("[A, B]", "mapping"),
    ],
)
def test_env_names_are_checked(tmp_path: Path, env: str, message: str) -> None:
    folder = python_project(
        tmp_path / "p",
        f"- kind: api\n  name: envs\n  python: {{handler: h.py:Env}}\n  env: {env}\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_project(folder)
    assert message in issues_of(exc) and "field env" in issues_of(exc)


def test_a_users_dotenv_may_not_set_reserved_names(tmp_path: Path) -> None:
    folder = python_project(
        tmp_path / "p", "- kind: api\n  name: e\n  python: {handler: h.py:Env}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_project(folder, policy=USER, dotenv={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert issues_of(exc).startswith(".env: CUDA_VISIBLE_DEVICES is set by Kiln")
    assert load_project(folder, policy=ADMIN, dotenv={"CUDA_VISIBLE_DEVICES": "0"})


# ---- path policies, at the config level -----------------------------------------------


@pytest.mark.parametrize(
    "block,field",
    [
        ("python: {handler: ../outside/h.py:Env}", "python.handler"),
        ("python: {handler: /OUTSIDE/h.py:Env}", "python.handler"),
        ("python: {handler: h.py:Env, model: ~/m.onnx}", "python.model"),
        ("python: {handler: h.py:Env}\n  python_path: ../outside", "python_path"),
        ("onnx: {model: /OUTSIDE/m.onnx}", "onnx.model"),
        ("onnx: {model: file:///OUTSIDE/m.onnx}", "onnx.model"),
        ("onnx: {model: m.onnx, request_handler: ../outside/h.py}", "onnx.request_handler"),
        ("onnx: {model: link/m.onnx}", "onnx.model"),
        ("predictor: {type: python, path: ../outside/h.py}", "predictor.path"),
    ],
)
def test_a_users_paths_must_stay_inside_the_project(tmp_path: Path, block: str, field: str) -> None:
    outside = tmp_path / "outside"
    write(outside / "h.py", ENV_HANDLER)
    write(outside / "m.onnx", "not a model")
    block = block.replace("/OUTSIDE", str(outside))
    folder = python_project(tmp_path / "p", f"- kind: api\n  name: e\n  {block}\n")
    write(folder / "m.onnx", "not a model")
    (folder / "link").symlink_to(outside)
    with pytest.raises(ConfigError) as exc:
        load_project(folder, policy=USER, dotenv={})
    text = issues_of(exc)
    assert f"kiln.yaml:3: api 'e': field {field}: " in text or f"field {field}: " in text, text
    assert "outside the deployed project" in text or "absolute path" in text, text
    assert "Fix: name a" in text
    if "~" not in block:  # the admin and `kiln serve` may still name such paths
        assert load_project(folder, policy=ADMIN, dotenv={})
        assert load_project(folder, policy=LOCAL)


def test_inside_paths_and_remote_models_are_fine_for_users(tmp_path: Path) -> None:
    folder = python_project(
        tmp_path / "p",
        "- kind: api\n  name: e\n  python: {handler: sub/../h.py:Env, model: 's3://bucket/m.onnx'}\n"
        "  python_path: .\n- kind: api\n  name: f\n  onnx: {model: models/./m.onnx}\n",
    )
    write(folder / "models" / "m.onnx", "x")
    project = load_project(folder, policy=USER, dotenv={}, check_files=False)
    assert project.apis[0].runtime_block.model == "s3://bucket/m.onnx"
    assert project.apis[1].model_path == str(folder / "models" / "m.onnx")


# ---- end to end: a real `kiln server`, a user and the admin --------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tenant")
    d = Daemon(root / "home")
    d.env.update({SECRET: "s3cr3t-server-value", PASSED: "passed-to-admin"})
    d.start("--pass-env", "TENANT_TEST_PASS*")
    made = d.kiln("users", "create", "mallory", "-o", "json")
    assert made.returncode == 0, made.stderr
    d.mallory = orjson.loads(made.stdout)["key"]
    d.root = root
    yield d
    d.stop()


def upload(d: Daemon, key: str, archive: bytes) -> httpx.Response:
    return httpx.post(
        f"{d.management_url}/deployments",
        content=archive,
        headers={"Content-Type": "application/gzip", "Authorization": f"Bearer {key}"},
        timeout=60,
    )


def deploy(d: Daemon, key: str, folder: Path) -> httpx.Response:
    return upload(d, key, pack_project(folder).archive)


def wait_live(d: Daemon, key: str, name: str) -> None:
    def live() -> bool:
        got = httpx.get(
            f"{d.management_url}/deployments/{name}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()
        assert got["rollout"]["status"] != "error", got
        return got["rollout"]["status"] == "live"

    d.wait_until(live, 60, f"deployment {name} to go live")


@pytest.mark.parametrize(
    "config,needles",
    [
        (
            "  config: {home: '${HOME}'}\n  env: {K: '${" + SECRET + "}'}\n",
            ["variable HOME is not set", f"variable {SECRET} is not set", ".env"],
        ),
        ("  python_path: ../..\n", ["field python_path", "outside the deployed project"]),
        ("  python_path: /etc\n", ["field python_path", "absolute path '/etc'"]),
    ],
    ids=["variables", "dotdot-python-path", "absolute-python-path"],
)
def test_a_users_deploy_is_refused_with_400(
    server: Daemon, tmp_path: Path, config: str, needles: list[str]
) -> None:
    folder = python_project(
        tmp_path / "p",
        "- kind: deployment\n  name: bad\n- kind: api\n  name: envs\n"
        "  python: {handler: h.py:Env}\n" + config,
    )
    response = deploy(server, server.mallory, folder)
    assert response.status_code == 400, response.text
    body = response.json()
    text = "\n".join(body["issues"])
    for needle in needles:
        assert needle in text, text
    assert all(issue.startswith("kiln.yaml:") for issue in body["issues"])
    assert "s3cr3t" not in response.text


@pytest.mark.parametrize(
    "runtime,field",
    [
        ("onnx: {model: /etc/passwd}", "onnx.model"),
        ("onnx: {model: ../../../../etc/passwd}", "onnx.model"),
        ("python: {handler: /OTHER/h.py:Env}", "python.handler"),
        ("python: {handler: ../other/h.py:Env}", "python.handler"),
    ],
)
def test_a_user_cannot_name_files_outside_their_revision(
    server: Daemon, tmp_path: Path, runtime: str, field: str
) -> None:
    other = python_project(
        tmp_path / "other", "- kind: api\n  name: x\n  python: {handler: h.py:Env}\n"
    )
    runtime = runtime.replace("/OTHER", str(other))
    folder = python_project(tmp_path / "p", f"- kind: api\n  name: envs\n  {runtime}\n")
    response = deploy(server, server.mallory, folder)
    assert response.status_code == 400, response.text
    assert any(f"field {field}: " in issue for issue in response.json()["issues"]), response.text


def test_an_uploaded_link_out_of_the_revision_is_refused(server: Daemon) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        config = b"- kind: api\n  name: envs\n  onnx: {model: m.onnx}\n"
        info = tarfile.TarInfo("kiln.yaml")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        link = tarfile.TarInfo("m.onnx")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    response = upload(server, server.mallory, buffer.getvalue())
    assert response.status_code == 400 and "m.onnx" in response.text


def test_env_layers_reach_the_users_workers_and_the_servers_do_not(
    server: Daemon, tmp_path: Path
) -> None:
    folder = python_project(
        tmp_path / "p",
        "- kind: deployment\n  name: layers\n  env: {B: deployment, C: deployment}\n"
        "- kind: api\n  name: envs\n  python: {handler: h.py:Env}\n"
        "  env: {C: 'api-${FROM_DOTENV}'}\n",
        dotenv="A=dotenv\nB=dotenv\nC=dotenv\nFROM_DOTENV=dv\nLEAK=${" + SECRET + "}\n",
    )
    response = deploy(server, server.mallory, folder)
    assert response.status_code == 202, response.text
    wait_live(server, server.mallory, "layers")
    names = ["A", "B", "C", "LEAK", SECRET, PASSED, "KILN_STATE_URL"]
    answer = httpx.post(
        f"{server.url}/mallory/envs",
        json=names,
        headers={"Authorization": f"Bearer {server.mallory}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["A"] == "dotenv" and got["B"] == "deployment" and got["C"] == "api-dv"
    assert got["LEAK"] == ""  # a .env's ${VAR} never reads the server's environment
    # the worker's base environment is another part of the sandbox issue (placement.py)
    assert got[SECRET] is None and got[PASSED] is None, got


def test_the_admin_reads_allow_listed_server_variables_only(server: Daemon, tmp_path: Path) -> None:
    config = (
        "- kind: deployment\n  name: adm\n- kind: api\n  name: admin-envs\n"
        "  python: {handler: h.py:Env}\n  env: {TOKEN: '${" + PASSED + "}'}\n"
    )
    refused = deploy(
        server,
        server.admin_key,
        python_project(tmp_path / "bad", config + "  config: {k: '${" + SECRET + "}'}\n"),
    )
    assert refused.status_code == 400, refused.text
    assert f"variable {SECRET} is not set" in refused.text and "--pass-env" in refused.text
    assert "s3cr3t" not in refused.text
    response = deploy(server, server.admin_key, python_project(tmp_path / "ok", config))
    assert response.status_code == 202, response.text
    wait_live(server, server.admin_key, "adm")
    started = time.monotonic()
    answer = server.http.post(f"{server.url}/adm/admin-envs", json=["TOKEN", SECRET])
    assert answer.status_code == 200, (answer.text, time.monotonic() - started)
    assert answer.json() == {"TOKEN": "passed-to-admin", SECRET: None}
    assert os.environ.get(SECRET) is None  # the test process itself never had them


BATCH_PREDICTOR = """
import os


class PythonPredictor:
    def __init__(self, config, job_spec):
        pass

    def predict(self, payload, batch_id):
        return [{name: os.environ.get(name) for name in ("A", "B", "C")} for _ in payload]
"""


def test_env_layers_reach_batch_job_workers(server: Daemon, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    write(folder / "predictor.py", BATCH_PREDICTOR)
    write(folder / ".env", "A=dotenv\nB=dotenv\nC=dotenv\n")
    write(
        folder / "kiln.yaml",
        "- kind: deployment\n  name: bat\n  env: {B: deployment, C: deployment}\n"
        "- kind: BatchAPI\n  name: envjob\n  predictor: {type: python, path: predictor.py}\n"
        "  env: {C: api}\n",
    )
    response = deploy(server, server.admin_key, folder)
    assert response.status_code == 202, response.text
    wait_live(server, server.admin_key, "bat")
    spec = {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "output": {"path": "o"}}
    job = server.http.post(f"{server.url}/bat/envjob", json=spec)
    assert job.status_code == 200, job.text
    job_id = job.json()["job_id"]

    def done() -> dict:
        status = server.http.get(f"{server.url}/bat/envjob", params={"jobID": job_id}).json()
        state = status["job_status"]["status"]
        return status if state not in ("status_enqueuing", "status_running") else {}

    status = server.wait_until(done, 60, "the batch job to end")
    assert status["job_status"]["status"] == "status_succeeded", status
    from kiln.batch.output import read_jsonl

    records = read_jsonl(Path(status["job_status"]["output"]["location"]))
    assert records[0]["result"] == {"A": "dotenv", "B": "deployment", "C": "api"}
