"""The management port: TorchServe's management API with Kiln's secure defaults (ShellTorch)."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from openapi_spec_validator import validate
from support import KilnServer, build_linear_onnx, write

ADDER = """
class Model:
    def load(self, model_dir, config):
        self.add = config["add"]

    def predict(self, payload, context):
        return {"sum": [v + self.add for v in payload], "api": context.api}
"""


def adder_project(folder: Path, name: str, add: int) -> Path:
    """A complete Kiln project (kiln.yaml + handler) serving `name`."""
    write(folder / "adder.py", ADDER)
    write(
        folder / "kiln.yaml",
        f"""
- kind: api
  name: {name}
  python: {{handler: adder.py:Model}}
  config: {{add: {add}}}
""",
    )
    return folder


def management_client(server: KilnServer) -> httpx.Client:
    info = orjson.loads((server.state / "server.json").read_bytes())
    return httpx.Client(base_url=info["management_url"], timeout=60)


def ts_error(response: httpx.Response, status: int) -> str:
    """The TorchServe error body's message, after checking its shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "type", "message"}
    assert body["code"] == status
    return body["message"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mgmt-project")
    build_linear_onnx(root / "model" / "linear.onnx", np.ones((4, 2), np.float32))
    write(root / "adder.py", ADDER)
    apis = "".join(
        f"""
- kind: api
  name: {name}
  python: {{handler: adder.py:Model}}
  config: {{add: {i}}}
"""
        for i, name in enumerate(["alpha", "beta", "gamma", "delta"])
    )
    write(
        root / "kiln.yaml",
        apis
        + """
- kind: api
  name: linear
  onnx: {model: model/linear.onnx}
""",
    )
    return root


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("mgmt-home")
    store = home / "state" / "model-store"  # the default store: <home>/model-store
    adder_project(store / "plus-ten", "plus-ten", 10)
    srv = KilnServer(project, home, extra_args=["--enable-model-api"])
    srv.store = store
    srv.mgmt = management_client(srv)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def locked(project: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same project without --enable-model-api: the default."""
    home = tmp_path_factory.mktemp("locked-home")
    adder_project(home / "state" / "model-store" / "plus-ten", "plus-ten", 10)
    srv = KilnServer(project, home)
    srv.mgmt = management_client(srv)
    yield srv
    srv.stop()


def live_pids(server: KilnServer, name: str) -> list[int]:
    described = server.mgmt.get(f"/models/{name}").json()[0]
    return [w["pid"] for w in described["workers"] if w["status"] == "READY"]


# ----- list and describe --------------------------------------------------------------
def test_list_models_paginates_every_model_exactly_once(server: KilnServer) -> None:
    everything = server.mgmt.get("/models").json()
    names = [m["modelName"] for m in everything["models"]]
    assert {"alpha", "beta", "gamma", "delta", "linear"} <= set(names)
    assert "nextPageToken" not in everything

    collected, token, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"next_page_token": token} if token else {})}
        page = server.mgmt.get("/models", params=params).json()
        assert len(page["models"]) <= 2
        collected += [m["modelName"] for m in page["models"]]
        pages += 1
        token = page.get("nextPageToken")
        if token is None:
            break
    assert collected == names
    assert pages == (len(names) + 1) // 2
    assert ts_error(server.mgmt.get("/models", params={"limit": "x"}), 400).startswith("limit")


def test_describe_reports_real_worker_pids(server: KilnServer) -> None:
    response = server.mgmt.get("/models/linear")
    assert response.status_code == 200
    [model] = response.json()
    assert model["modelName"] == "linear"
    assert model["runtime"] == "onnx"
    assert model["loadedAtStartup"] is True
    assert model["minWorkers"] == 1 and model["batchSize"] == 1
    assert model["jobQueueStatus"] == {"remainingCapacity": 100, "pendingRequests": 0}
    [worker] = model["workers"]
    assert worker["status"] == "READY"
    assert worker["gpu"] is False
    assert worker["memoryUsage"] > 0
    assert Path(f"/proc/{worker['pid']}").exists()
    assert worker["pid"] in server.worker_pids()
    assert server.mgmt.get("/models/linear/all").json()[0]["modelName"] == "linear"


def test_unknown_model_and_route_answer_in_torchserve_shape(server: KilnServer) -> None:
    assert "nothing" in ts_error(server.mgmt.get("/models/nothing"), 404)
    ts_error(server.mgmt.get("/no/such/route"), 404)
    response = server.mgmt.patch("/models/linear")
    ts_error(response, 405)
    assert "GET" in response.headers["allow"]


def test_management_api_description_is_valid_openapi(server: KilnServer) -> None:
    document = server.mgmt.options("/").json()
    validate(document)
    assert "/models/{model}/{version}/set-default" in document["paths"]


# ----- scale --------------------------------------------------------------------------
def test_scale_up_to_two_workers_and_back_to_one(server: KilnServer) -> None:
    before = live_pids(server, "linear")
    response = server.mgmt.put("/models/linear", params={"min_worker": 2, "synchronous": "true"})
    assert response.json() == {"status": "Workers scaled to 2 for model: linear"}
    two = live_pids(server, "linear")
    assert len(two) == 2 and len(set(two)) == 2
    assert set(before) <= set(two)
    assert all(pid in server.worker_pids() for pid in two)
    assert server.mgmt.get("/models/linear").json()[0]["minWorkers"] == 2
    # Both workers answer.
    for _ in range(4):
        assert server.client.post("/linear", json=[[1, 2, 3, 4]]).json() == [[10.0, 10.0]]

    response = server.mgmt.put("/models/linear", params={"min_worker": 1, "synchronous": "true"})
    assert response.status_code == 200
    one = live_pids(server, "linear")
    assert len(one) == 1 and one[0] in two
    [gone] = set(two) - set(one)
    deadline = time.monotonic() + 10
    while gone in server.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone not in server.worker_pids()
    assert server.client.post("/linear", json=[[1, 1, 1, 1]]).json() == [[4.0, 4.0]]


def test_asynchronous_scale_answers_202_then_workers_come_up(server: KilnServer) -> None:
    response = server.mgmt.put("/models/beta", params={"min_worker": 2})
    assert response.status_code == 202
    assert response.json() == {"status": "Processing worker updates..."}
    deadline = time.monotonic() + 30
    while len(live_pids(server, "beta")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(set(live_pids(server, "beta"))) == 2
    server.mgmt.put("/models/beta", params={"min_worker": 1, "synchronous": "true"})
    assert len(live_pids(server, "beta")) == 1


def test_scale_to_zero_then_predict_is_503_and_back(server: KilnServer) -> None:
    response = server.mgmt.put("/models/gamma", params={"min_worker": 0, "synchronous": "true"})
    assert response.status_code == 200
    assert server.client.post("/predictions/gamma", json=[1]).status_code == 503
    server.mgmt.put("/models/gamma", params={"min_worker": 1, "synchronous": "true"})
    assert server.client.post("/predictions/gamma", json=[1]).json()["sum"] == [3]


def test_scale_rejects_max_below_min(server: KilnServer) -> None:
    response = server.mgmt.put("/models/linear", params={"min_worker": 3, "max_worker": 2})
    assert "max_worker" in ts_error(response, 400)


# ----- secure defaults ----------------------------------------------------------------
def test_register_and_delete_are_disabled_by_default(locked: KilnServer) -> None:
    response = locked.mgmt.post("/models", params={"url": "plus-ten", "synchronous": "true"})
    assert "--enable-model-api" in ts_error(response, 405)
    assert "plus-ten" not in [m["modelName"] for m in locked.mgmt.get("/models").json()["models"]]
    assert locked.client.post("/plus-ten", json=[1]).status_code == 404
    deleted = locked.mgmt.delete("/models/alpha")
    assert "--enable-model-api" in ts_error(deleted, 405)
    assert locked.client.post("/alpha", json=[1]).json()["sum"] == [1]
    # Reading and scaling stay available.
    assert locked.mgmt.get("/models/alpha").status_code == 200


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://169.254.169.254/latest/meta-data/", "remote model URLs are not allowed"),
        ("https://example.com/model.zip", "remote model URLs are not allowed"),
        ("s3://bucket/model.zip", "remote model URLs are not allowed"),
        ("../outside", "'..'"),
        ("plus-ten/../../outside", "'..'"),
        ("file:///etc", "outside the model store"),
    ],
)
def test_remote_and_traversing_urls_are_refused(
    server: KilnServer, url: str, expected: str
) -> None:
    response = server.mgmt.post("/models", params={"url": url, "synchronous": "true"})
    assert expected in ts_error(response, 400)


def test_metadata_address_is_named_in_the_refusal(server: KilnServer) -> None:
    response = server.mgmt.post("/models", params={"url": "http://169.254.169.254/x.tar.gz"})
    message = ts_error(response, 400)
    assert "metadata" in message and "copy the archive into the model store" in message


def test_absolute_path_outside_the_store_is_refused(server: KilnServer, tmp_path: Path) -> None:
    outside = adder_project(tmp_path / "outside", "outside", 1)
    response = server.mgmt.post("/models", params={"url": str(outside), "synchronous": "true"})
    assert "outside the model store" in ts_error(response, 400)
    assert server.client.post("/outside", json=[1]).status_code == 404


def test_symlink_out_of_the_store_is_refused(server: KilnServer, tmp_path: Path) -> None:
    outside = adder_project(tmp_path / "elsewhere", "elsewhere", 1)
    (server.store / "sneaky").symlink_to(outside, target_is_directory=True)
    response = server.mgmt.post("/models", params={"url": "sneaky", "synchronous": "true"})
    assert "symlink" in ts_error(response, 400)
    # A project folder that links one of its files out of the store is refused too.
    inner = adder_project(server.store / "linked", "linked", 1)
    (inner / "adder.py").unlink()
    (inner / "adder.py").symlink_to(outside / "adder.py")
    response = server.mgmt.post("/models", params={"url": "linked", "synchronous": "true"})
    assert "symlink" in ts_error(response, 400)
    assert server.client.post("/elsewhere", json=[1]).status_code == 404


def test_zip_slip_archive_is_refused_and_writes_nothing(server: KilnServer) -> None:
    evil = server.store.parent / "zip-slip-evil.txt"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("kiln.yaml", "- kind: api\n  name: evil\n  python: {handler: h.py:M}\n")
        zf.writestr("../zip-slip-evil.txt", "pwned")
    (server.store / "evil.zip").write_bytes(buffer.getvalue())
    response = server.mgmt.post("/models", params={"url": "evil.zip", "synchronous": "true"})
    assert "zip-slip" in ts_error(response, 400)
    assert not evil.exists()
    assert not list(server.state.rglob("zip-slip-evil.txt"))


def test_tar_traversal_and_links_out_are_refused(server: KilnServer) -> None:
    def tar_with(name: str, member: tarfile.TarInfo, data: bytes = b"") -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
            yaml = b"- kind: api\n  name: t\n  python: {handler: h.py:M}\n"
            info = tarfile.TarInfo("kiln.yaml")
            info.size = len(yaml)
            tf.addfile(info, io.BytesIO(yaml))
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data) if data else None)
        (server.store / name).write_bytes(buffer.getvalue())

    tar_with("dotdot.tar.gz", tarfile.TarInfo("../../tar-evil.txt"), b"pwned")
    absolute = tarfile.TarInfo("/tmp/kiln-tar-evil.txt")
    tar_with("absolute.tar.gz", absolute, b"pwned")
    link = tarfile.TarInfo("passwd")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar_with("symlink.tar.gz", link)
    hard = tarfile.TarInfo("shadow")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../etc/shadow"
    tar_with("hardlink.tar.gz", hard)
    for name in ("dotdot.tar.gz", "absolute.tar.gz", "symlink.tar.gz", "hardlink.tar.gz"):
        response = server.mgmt.post("/models", params={"url": name, "synchronous": "true"})
        ts_error(response, 400)
    assert not list(server.home.rglob("tar-evil.txt"))
    assert not Path("/tmp/kiln-tar-evil.txt").exists()


def test_missing_url_and_missing_file(server: KilnServer) -> None:
    assert "url" in ts_error(server.mgmt.post("/models"), 400)
    assert "no 'ghost'" in ts_error(server.mgmt.post("/models", params={"url": "ghost"}), 404)


# ----- register and unregister --------------------------------------------------------
def test_register_a_project_folder_from_the_store_then_predict(server: KilnServer) -> None:
    response = server.mgmt.post(
        "/models",
        params={
            "url": "plus-ten",
            "initial_workers": 1,
            "synchronous": "true",
            "batch_size": 4,
            "max_batch_delay": 50,
        },
    )
    assert response.status_code == 200, response.text
    assert 'Model "plus-ten"' in response.json()["status"]
    assert server.client.post("/plus-ten", json=[1, 2]).json() == {
        "sum": [11, 12],
        "api": "plus-ten",
    }
    assert server.client.post("/predictions/plus-ten", json=[5]).json()["sum"] == [15]
    [model] = server.mgmt.get("/models/plus-ten").json()
    assert model["loadedAtStartup"] is False and model["modelUrl"] == "plus-ten"
    assert (model["batchSize"], model["maxBatchDelay"]) == (4, 50)
    assert Path(f"/proc/{model['workers'][0]['pid']}").exists()
    listed = [m["modelName"] for m in server.mgmt.get("/models").json()["models"]]
    assert "plus-ten" in listed
    assert server.client.get("/openapi.json").json()["paths"].get("/predictions/plus-ten")
    again = server.mgmt.post("/models", params={"url": "plus-ten", "synchronous": "true"})
    assert "already registered" in ts_error(again, 409)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_register_an_archive_from_the_store(server: KilnServer, tmp_path: Path, kind: str) -> None:
    name = f"packed-{kind.replace('.', '-')}"
    folder = adder_project(tmp_path / name, name, 100)
    archive = shutil.make_archive(
        str(tmp_path / name), "zip" if kind == "zip" else "gztar", tmp_path, name
    )
    shutil.copy(archive, server.store / f"{name}.{kind}")
    assert folder.exists()
    response = server.mgmt.post("/models", params={"url": f"{name}.{kind}"})
    assert response.status_code == 202  # asynchronous by default, like TorchServe
    # Requests sent while the model loads wait for it.
    assert server.client.post(f"/{name}", json=[1]).json()["sum"] == [101]


def test_register_with_model_name_selects_an_api(server: KilnServer) -> None:
    folder = server.store / "pair"
    adder_project(folder, "first", 1)
    write(
        folder / "kiln.yaml",
        (folder / "kiln.yaml").read_text()
        + "\n- kind: api\n  name: second\n  python: {handler: adder.py:Model}\n"
        "  config: {add: 2}\n",
    )
    wrong = server.mgmt.post("/models", params={"url": "pair", "model_name": "third"})
    assert "first, second" in ts_error(wrong, 400)
    response = server.mgmt.post(
        "/models", params={"url": "pair", "model_name": "second", "synchronous": "true"}
    )
    assert response.status_code == 200
    assert server.client.post("/second", json=[1]).json()["sum"] == [3]
    assert server.client.post("/first", json=[1]).status_code == 404


def test_invalid_project_is_a_400_with_the_config_error(server: KilnServer) -> None:
    write(server.store / "broken" / "kiln.yaml", "- kind: api\n  name: broken\n  onnx: {}\n")
    response = server.mgmt.post("/models", params={"url": "broken", "synchronous": "true"})
    assert "not valid" in ts_error(response, 400)


def test_delete_unregisters_and_stops_the_workers(server: KilnServer) -> None:
    assert server.client.post("/delta", json=[1]).status_code == 200
    [pid] = live_pids(server, "delta")
    response = server.mgmt.delete("/models/delta")
    assert response.json() == {"status": 'Model "delta" unregistered'}
    assert server.client.post("/delta", json=[1]).status_code == 404
    assert server.client.post("/predictions/delta", json=[1]).status_code == 404
    ts_error(server.mgmt.get("/models/delta"), 404)
    assert "delta" not in [m["modelName"] for m in server.mgmt.get("/models").json()["models"]]
    deadline = time.monotonic() + 10
    while pid in server.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in server.worker_pids()
    assert server.client.post("/alpha", json=[1]).json()["sum"] == [1]  # others unaffected


def test_versions_register_beside_and_delete_one_at_a_time(
    server: KilnServer, tmp_path: Path
) -> None:
    for version, add in (("1", 1), ("2", 2)):
        folder = server.store / f"multi-v{version}"
        write(folder / "adder.py", ADDER)
        write(
            folder / "kiln.yaml",
            f'- kind: api\n  name: multi\n  version: "{version}"\n'
            f"  python: {{handler: adder.py:Model}}\n  config: {{add: {add}}}\n",
        )
        response = server.mgmt.post(
            "/models", params={"url": f"multi-v{version}", "synchronous": "true"}
        )
        assert response.status_code == 200, response.text
    # Registering version 2 did not move unversioned traffic off version 1.
    assert server.client.post("/multi", json=[0]).json()["sum"] == [1]
    assert server.client.post("/predictions/multi/2", json=[0]).json()["sum"] == [2]
    assert len(server.mgmt.get("/models/multi/all").json()) == 2
    refused = server.mgmt.delete("/models/multi/1")
    assert "default" in ts_error(refused, 400)
    assert server.mgmt.delete("/models/multi/2").status_code == 200
    assert server.client.post("/predictions/multi/2", json=[0]).status_code == 404
    assert server.mgmt.delete("/models/multi/1").status_code == 200
    assert server.client.post("/multi", json=[0]).status_code == 404


def test_a_model_that_fails_to_load_is_not_registered(server: KilnServer) -> None:
    folder = server.store / "fails"
    write(
        folder / "bad.py",
        "class Model:\n    def load(self, model_dir, config):\n"
        "        raise RuntimeError('weights are missing')\n"
        "    def predict(self, payload, context):\n        return payload\n",
    )
    write(folder / "kiln.yaml", "- kind: api\n  name: fails\n  python: {handler: bad.py:Model}\n")
    response = server.mgmt.post("/models", params={"url": "fails", "synchronous": "true"})
    message = ts_error(response, 500)
    assert "failed to load" in message and "weights are missing" in message
    assert str(server.store) not in message
    ts_error(server.mgmt.get("/models/fails"), 404)
    assert server.client.post("/fails", json=[1]).status_code == 404
