"""Batch jobs over remote storage and into parquet: sources listed and read from a real
S3-compatible server (moto on 127.0.0.1), results written back to it, and parquet output
read back with pyarrow, each item exactly once."""

from __future__ import annotations

import io
import time
from typing import Any

import orjson
import pytest
from storage_servers import BUCKET, S3Server
from support import KilnServer, write

PREDICTOR = """
class PythonPredictor:
    def __init__(self, config, job_spec):
        pass

    def predict(self, payload, batch_id):
        return [item["x"] * 10 for item in payload]
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("s3fs")
    server = S3Server(tmp_path_factory.mktemp("moto") / "requests.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(s3: S3Server, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("batch-storage")
    write(root / "predictor.py", PREDICTOR)
    write(
        root / "kiln.yaml",
        "- kind: BatchAPI\n  name: times10\n  predictor: {type: python, path: predictor.py}\n"
        "  jobs: {visibility_timeout: 2}\n",
    )
    srv = KilnServer(root, tmp_path_factory.mktemp("home"), env=s3.env())
    yield srv
    srv.stop()


def run_job(server: KilnServer, spec: dict[str, Any]) -> dict[str, Any]:
    response = server.client.post("/times10", content=orjson.dumps(spec))
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 60
    while True:
        status = server.client.get("/times10", params={"jobID": job_id}).json()
        if status["job_status"]["status"] not in ("status_enqueuing", "status_running"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def test_delimited_files_from_s3_into_s3(server: KilnServer, s3: S3Server) -> None:
    for part in range(3):
        lines = b"".join(b'{"x": %d}\n' % (part * 10 + i) for i in range(10))
        s3.put(f"in/part-{part}.jsonl", lines)
    s3.put("in/ignore.txt", b"not json")
    spec = {
        "workers": 2,
        "delimited_files": {
            "s3_paths": [f"s3://{BUCKET}/in/"],
            "includes": ["**.jsonl"],
            "batch_size": 7,
        },
        "output": {"path": f"s3://{BUCKET}/out/", "format": "jsonl"},
    }
    dry = server.client.post("/times10", params={"dryRun": "true"}, content=orjson.dumps(spec))
    assert dry.status_code == 200, dry.text
    assert len([f for f in dry.text.split('"') if f.endswith(".jsonl")]) == 3
    status = run_job(server, spec)
    assert status["job_status"]["status"] == "status_succeeded", status
    job_id = status["job_status"]["job_id"]
    location = f"s3://{BUCKET}/out/{job_id}/"  # written by the server, not the workers
    assert status["job_status"]["output"]["location"] == location
    keys = [
        o["Key"] for o in s3.s3.list_objects_v2(Bucket=BUCKET, Prefix="out/").get("Contents", [])
    ]
    rows = []
    for key in keys:
        body = s3.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        rows += [orjson.loads(line) for line in body.splitlines()]
    assert all(key.startswith(f"out/{job_id}/part-") for key in keys), keys
    assert sorted(r["index"] for r in rows) == list(range(30))  # every item, once
    assert sorted(r["result"] for r in rows) == [x * 10 for x in range(30)]


def test_an_empty_s3_prefix_fails_the_job_while_enqueuing_and_says_why(server: KilnServer) -> None:
    lister = {"s3_paths": [f"s3://{BUCKET}/nothing-here/"], "batch_size": 1}
    spec = {"workers": 1, "file_path_lister": lister}
    status = run_job(server, spec)
    assert status["job_status"]["status"] == "status_enqueue_failed", status
    assert "nothing-here" in str(status)


def test_parquet_output_holds_every_item_once(server: KilnServer) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    spec = {
        "workers": 2,
        "item_list": {"items": [{"x": i} for i in range(23)], "batch_size": 5},
        "output": {"path": "results", "format": "parquet"},
    }
    status = run_job(server, spec)
    assert status["job_status"]["status"] == "status_succeeded", status
    out = server.project.resolve() / "results" / status["job_status"]["job_id"]
    assert status["job_status"]["output"]["location"] == f"{out}/"
    parts = sorted(out.glob("*.parquet"))  # kiln serve: <project>/<path>/<job_id>/part-N
    assert len(parts) == 5
    table = [pq.read_table(io.BytesIO(p.read_bytes())).to_pylist() for p in parts]
    rows = [row for part in table for row in part]
    assert sorted(r["index"] for r in rows) == list(range(23))
    assert sorted(orjson.loads(r["result"]) for r in rows) == [i * 10 for i in range(23)]
