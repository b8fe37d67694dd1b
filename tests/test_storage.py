"""kiln.storage against real servers on 127.0.0.1: moto (S3), a GCS emulator, http.server.

What is checked: every URI form, downloads that are verified and reused (a
second Cache on the same folder, as after a restart, makes no second GET),
two processes downloading once, clear errors naming the path (missing object,
wrong credentials, unreachable endpoint, offline Hub), archive and ONNX
external-data traversal refusals, and LRU eviction under a size bound.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from storage_servers import BUCKET, GcsServer, HttpServer, S3Server, closed_port
from support import build_linear_onnx

from kiln.storage import (
    Cache,
    ModelNotFound,
    ModelUriError,
    StorageAccessDenied,
    StorageUnreachable,
    UnsafeArchive,
    materialize,
    parse_uri,
)
from kiln.storage import remote as remote_mod
from kiln.storage.errors import ModelIntegrityError

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "requests.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    return s3


def cache_at(path: Path, max_bytes: int | None = None) -> Cache:
    return Cache(path / "cache", max_bytes=max_bytes)


# -- URI forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "scheme", "path"),
    [
        ("s3://bucket-1/a/m.onnx", "s3", "bucket-1/a/m.onnx"),
        ("gs://bkt/m/", "gs", "bkt/m/"),
        ("gcs://bkt/m.onnx", "gs", "bkt/m.onnx"),
        ("https://h.example/m.onnx?x=1", "https", "https://h.example/m.onnx?x=1"),
        ("hf://org/repo@v1.0", "hf", "org/repo"),
        ("file:///abs/m.onnx", "file", "/abs/m.onnx"),
    ],
)
def test_uri_forms(value: str, scheme: str, path: str) -> None:
    uri = parse_uri(value)
    assert (uri.scheme, uri.path) == (scheme, path)


def test_relative_local_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    assert parse_uri("m/x.onnx", tmp_path).path == str(tmp_path / "m" / "x.onnx")
    assert parse_uri("hf://org/repo@abc").revision == "abc"


@pytest.mark.parametrize(
    "value",
    ["s3://AKIAXXX:topsecret@bucket/m.onnx", "https://user:topsecret@host/m.onnx"],
)
def test_credentials_in_a_uri_are_refused_and_never_repeated(value: str) -> None:
    with pytest.raises(ModelUriError) as info:
        parse_uri(value)
    assert "credentials written into it" in str(info.value)
    assert "AWS_ACCESS_KEY_ID" in str(info.value)
    assert "topsecret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("ftp://h/m.onnx", "cannot fetch"),
        ("s3://b/m.onnx", "valid bucket"),
        ("s3://bucket/", "whole bucket"),
        ("s3://bucket/a/../m.onnx", "'..' segments"),
        ("hf://just-a-name", "hf://org/repo"),
        ("", "empty"),
    ],
)
def test_bad_uris_say_what_is_wrong(value: str, words: str) -> None:
    with pytest.raises(ModelUriError, match=words):
        parse_uri(value)


# -- S3 ------------------------------------------------------------------------------------


def test_s3_object_is_downloaded_verified_and_reused_after_a_restart(
    s3_env: S3Server, tmp_path: Path
) -> None:
    data = os.urandom(5000)
    uri = s3_env.put("reuse/model.onnx.bin", data)
    first = materialize(uri, cache=cache_at(tmp_path))
    assert first.name == "model.onnx.bin" and first.read_bytes() == data
    assert s3_env.gets("reuse/model.onnx.bin") == 1
    restarted = cache_at(tmp_path)  # a new process on the same cache folder
    again = materialize(uri, cache=restarted)
    assert again == first
    assert s3_env.gets("reuse/model.onnx.bin") == 1  # one HEAD, no second GET
    assert [e.uri for e in restarted.list()] == [uri]


def test_a_changed_object_is_downloaded_again(s3_env: S3Server, tmp_path: Path) -> None:
    uri = s3_env.put("changing/m.bin", b"version one")
    assert materialize(uri, cache=cache_at(tmp_path)).read_bytes() == b"version one"
    s3_env.put("changing/m.bin", b"version two!")
    assert materialize(uri, cache=cache_at(tmp_path)).read_bytes() == b"version two!"


def test_s3_folder_keeps_its_layout_and_shares_identical_bytes(
    s3_env: S3Server, tmp_path: Path
) -> None:
    s3_env.put("saved/model/saved_model.pb", b"graph")
    s3_env.put("saved/model/variables/variables.index", b"index")
    s3_env.put("saved/model/variables/copy.index", b"index")
    folder = materialize(f"s3://{BUCKET}/saved/model/", cache=cache_at(tmp_path))
    assert (folder / "saved_model.pb").read_bytes() == b"graph"
    assert (folder / "variables" / "variables.index").read_bytes() == b"index"
    blobs = list((tmp_path / "cache" / "blobs").iterdir())
    assert len(blobs) == 2  # "index" stored once, by its SHA-256


def test_s3_tar_gz_is_unpacked_into_the_cache(s3_env: S3Server, tmp_path: Path) -> None:
    uri = s3_env.put("archives/model.tar.gz", _tar({"model/saved_model.pb": b"pb"}))
    folder = materialize(uri, cache=cache_at(tmp_path))
    assert folder.name == "model"  # the archive's single top folder is the model
    assert (folder / "saved_model.pb").read_bytes() == b"pb"


def test_two_processes_starting_together_download_once(s3_env: S3Server, tmp_path: Path) -> None:
    uri = s3_env.put("together/big.bin", os.urandom(3_000_000))
    code = (
        "import sys, time\n"
        "from kiln.storage import materialize\n"
        "while time.time() < float(sys.argv[2]): pass\n"
        "print(materialize(sys.argv[1]))\n"
    )
    start = str(time.time() + 1.5)
    env = {**os.environ}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri, start], env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert s3_env.gets("together/big.bin") == 1


def test_missing_object_names_the_path(s3_env: S3Server, tmp_path: Path) -> None:
    uri = f"s3://{BUCKET}/nowhere/model.onnx"
    with pytest.raises(ModelNotFound) as info:
        materialize(uri, cache=cache_at(tmp_path))
    assert uri in str(info.value) and "does not exist" in str(info.value)


def test_wrong_credentials_name_the_path_and_the_variables(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3_env.put("secret/m.bin", b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageAccessDenied) as info:
        materialize(uri, cache=cache_at(tmp_path))
    message = str(info.value)
    assert uri in message and "AWS_ACCESS_KEY_ID" in message
    assert "wrong" not in message.replace("WRONG", "")


def test_unreachable_endpoint_fails_fast_naming_the_path(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    uri = f"s3://{BUCKET}/any/m.onnx"
    started = time.monotonic()
    with pytest.raises(StorageUnreachable) as info:
        materialize(uri, cache=cache_at(tmp_path))
    assert time.monotonic() - started < 30
    assert uri in str(info.value) and "cannot reach" in str(info.value)


def test_a_cached_copy_serves_a_restart_while_the_store_is_down(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3_env.put("offline/m.bin", b"cached bytes")
    first = materialize(uri, cache=cache_at(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    assert materialize(uri, cache=cache_at(tmp_path)) == first


def test_a_download_that_does_not_match_its_checksum_is_refused(tmp_path: Path) -> None:
    class Liar:
        def get_file(self, remote: str, local: str) -> None:
            Path(local).write_bytes(b"tampered")

    uri = parse_uri("s3://bucket/m.bin")
    item = remote_mod.RemoteFile(
        path="bucket/m.bin", rel="m.bin", size=8, identity="x", md5="0" * 32
    )
    with pytest.raises(ModelIntegrityError, match="MD5"):
        remote_mod.fetch(Liar(), uri, item, tmp_path / "m.bin")
    short = remote_mod.RemoteFile(path="bucket/m.bin", rel="m.bin", size=99, identity="x")
    with pytest.raises(ModelIntegrityError, match="has 8 bytes"):
        remote_mod.fetch(Liar(), uri, short, tmp_path / "m.bin")


# -- GCS, HTTP, Hugging Face -----------------------------------------------------------------


def test_gcs_emulator_object_and_missing_object(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gcsfs")
    gcs = GcsServer(tmp_path_factory.mktemp("gcs") / "requests.log")
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        uri = gcs.put("models/m.bin", b"from gcs")
        path = materialize(uri, cache=cache_at(tmp_path))
        assert path.read_bytes() == b"from gcs"
        missing = f"gs://{BUCKET}/models/none.bin"
        with pytest.raises(ModelNotFound, match=missing):
            materialize(missing, cache=cache_at(tmp_path))
    finally:
        gcs.stop()


def test_http_url_and_404(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    root = tmp_path_factory.mktemp("www")
    (root / "m.bin").write_bytes(b"over http")
    web = HttpServer(root, root.parent / "http.log")
    try:
        path = materialize(f"{web.url}/m.bin", cache=cache_at(tmp_path))
        assert path.read_bytes() == b"over http" and path.name == "m.bin"
        assert materialize(f"{web.url}/m.bin", cache=cache_at(tmp_path)) == path
        assert web.requests("GET", "/m.bin") == 1
        with pytest.raises(ModelNotFound, match=f"{web.url}/none.bin"):
            materialize(f"{web.url}/none.bin", cache=cache_at(tmp_path))
    finally:
        web.stop()


def test_hf_offline_without_a_local_copy_says_it_needs_the_network(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    code = (
        "from kiln.storage import materialize, StorageError\n"
        "try:\n    materialize('hf://kiln-tests/not-cached@main')\n"
        "except StorageError as e:\n    print(type(e).__name__, '|', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("StorageUnreachable |"), out.stdout + out.stderr
    assert "hf://kiln-tests/not-cached@main needs the network" in out.stdout
    assert "local folder" in out.stdout


# -- archives and ONNX external data ----------------------------------------------------------


def _zip(members: dict[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link[0])
            info.external_attr = (0o120777 << 16) | 0x20
            zf.writestr(info, link[1])
    return buf.getvalue()


def _tar(members: dict[str, bytes], links: dict[str, tuple[str, bytes]] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (target, kind) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "payload", "words"),
    [
        ("slip.zip", _zip({"../../evil.txt": b"x"}), "zip-slip"),
        ("abs.zip", _zip({"/tmp/evil.txt": b"x"}), "absolute path"),
        ("link.zip", _zip({}, link=("ln", "/etc")), "is a symlink"),
        ("slip.tar.gz", _tar({"a/../../evil.txt": b"x"}), "zip-slip"),
        ("sym.tgz", _tar({}, {"ln": ("../../etc/passwd", tarfile.SYMTYPE)}), "outside the archive"),
        ("abs.tar.gz", _tar({}, {"ln": ("/etc/passwd", tarfile.SYMTYPE)}), "outside the archive"),
        ("hard.tar.gz", _tar({}, {"ln": ("../outside", tarfile.LNKTYPE)}), "zip-slip"),
    ],
)
def test_unsafe_archives_are_refused_and_write_nothing(
    tmp_path: Path, name: str, payload: bytes, words: str
) -> None:
    archive = tmp_path / "in" / name
    archive.parent.mkdir()
    archive.write_bytes(payload)
    with pytest.raises(UnsafeArchive, match=words):
        materialize(str(archive), cache=cache_at(tmp_path))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_a_local_archive_is_unpacked_once(tmp_path: Path) -> None:
    archive = tmp_path / "model.zip"
    archive.write_bytes(_zip({"model/a.txt": b"a", "model/sub/b.txt": b"b"}))
    folder = materialize(str(archive), cache=cache_at(tmp_path))
    assert (folder / "sub" / "b.txt").read_bytes() == b"b"
    assert materialize(str(archive), cache=cache_at(tmp_path)) == folder


def _onnx_with_external(folder: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    weights = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 2])
    weights.data_location = TensorProto.EXTERNAL
    entry = weights.external_data.add()
    entry.key, entry.value = "location", location
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], [weights]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "m.onnx")
    return folder / "m.onnx"


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_onnx_external_data_cannot_leave_the_model_folder(tmp_path: Path, location: str) -> None:
    pytest.importorskip("onnx")
    model = _onnx_with_external(tmp_path / "model", location)
    (tmp_path / "secret.bin").write_bytes(np.ones(8, np.float32).tobytes())
    with pytest.raises(UnsafeArchive) as info:
        materialize(str(model), cache=cache_at(tmp_path))
    assert "tensor 'W'" in str(info.value) and location in str(info.value)


def test_onnx_external_data_inside_the_folder_is_fine(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    model = _onnx_with_external(tmp_path / "model", "weights/w.bin")
    assert materialize(str(model), cache=cache_at(tmp_path)) == model


def test_onnx_inside_a_remote_archive_is_checked_too(s3_env: S3Server, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    model = _onnx_with_external(tmp_path / "src", "../../outside.bin")
    uri = s3_env.put("archives/escape.zip", _zip({"m.onnx": model.read_bytes()}))
    with pytest.raises(UnsafeArchive, match="outside the model's folder"):
        materialize(uri, cache=cache_at(tmp_path))


def test_a_good_onnx_model_from_s3(s3_env: S3Server, tmp_path: Path) -> None:
    model = build_linear_onnx(tmp_path / "src" / "lin.onnx", np.eye(2, dtype=np.float32))
    uri = s3_env.put("onnx/lin.onnx", model.read_bytes())
    assert materialize(uri, cache=cache_at(tmp_path)).read_bytes() == model.read_bytes()


# -- eviction --------------------------------------------------------------------------------


def test_lru_eviction_under_a_tiny_bound_spares_entries_in_use(
    s3_env: S3Server, tmp_path: Path
) -> None:
    uris = [s3_env.put(f"lru/{n}.bin", bytes([n]) * 1000) for n in range(3)]
    cache = cache_at(tmp_path, max_bytes=2500)
    first = materialize(uris[0], cache=cache)
    materialize(uris[1], cache=cache)
    cache.release()  # neither is in use any more
    time.sleep(0.02)
    materialize(uris[0], cache=cache)  # uris[0] is now the most recently used
    cache.release()
    materialize(uris[2], cache=cache)  # over the bound: the least recently used goes
    assert {e.uri for e in cache.list()} == {uris[0], uris[2]}
    assert first.exists()

    cache.release()
    busy = cache_at(tmp_path)
    held = materialize(uris[2], cache=busy)  # in use by this "API"
    removed, kept = Cache(busy.root).evict(0)  # `kiln cache prune --max-size 0`
    assert [e.uri for e in removed] == [uris[0]] and not first.exists()
    assert [e.uri for e in kept] == [uris[2]] and held.exists()
    assert len(list((tmp_path / "cache" / "blobs").iterdir())) == 1  # 0.bin's bytes are gone
