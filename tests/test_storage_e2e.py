"""Seed-000 configs with s3:// models, served by a real `kiln serve` against moto on 127.0.0.1.

Covers: the model downloaded once for two replicas, a restart that serves
from the cache without a second GET, a missing object reported as that API's
load error naming the path, and `kiln cache ls|prune` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from storage_servers import BUCKET, S3Server
from support import KILN, KilnServer, build_linear_onnx, write

pytest.importorskip("s3fs")
pytest.importorskip("moto")

WEIGHTS = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], dtype=np.float32)

HANDLER = """
def pre_inference(sample, signature, metadata):
    keys = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    return {signature[0].name: [sample[k] for k in keys]}


def post_inference(prediction, signature, metadata):
    scores = prediction[0][0]
    return {"scores": scores.tolist(), "label": metadata["labels"][int(scores.argmax())]}
"""

# Seed 000 (Cortex predictor era), unchanged apart from the bucket name.
SEED_000 = f"""
- kind: api
  name: my-api
  predictor:
    type: onnx
    path: handler.py
    model: s3://{BUCKET}/seed-000/iris.onnx
  tracker:
    key: label
    model_type: classification
  compute:
    min_replicas: 2
    cpu: 100m
  metadata:
    labels: [setosa, versicolor, virginica]
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "requests.log")
    yield server
    server.stop()


def cache_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KILN, "cache", *args],
        env={**os.environ, **env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_seed_000_s3_model_two_replicas_one_download_restart_reuses_cache(
    s3: S3Server, tmp_path: Path
) -> None:
    model = build_linear_onnx(tmp_path / "build" / "iris.onnx", WEIGHTS)
    s3.put("seed-000/iris.onnx", model.read_bytes())
    project = tmp_path / "project"
    write(project / "cortex.yaml", SEED_000)
    write(project / "handler.py", HANDLER)
    env = s3.env(KILN_CACHE_DIR=str(tmp_path / "cache"))
    sample = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    features = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    expected = (features @ WEIGHTS)[0]

    for run in ("first start", "restart"):
        server = KilnServer(project, tmp_path / f"home-{run[:5]}", env=env)
        try:
            response = server.client.post("/my-api", json=sample)
            assert response.status_code == 200, (run, response.text, server.output())
            body = response.json()
            np.testing.assert_allclose(body["scores"], expected, rtol=1e-6)
            assert body["label"] == ["setosa", "versicolor", "virginica"][int(expected.argmax())]
            assert len(server.worker_pids()) == 2
            assert s3.gets("seed-000/iris.onnx") == 1, run  # two replicas, two starts: one GET

            listing = cache_cli(env, "ls")
            assert listing.returncode == 0, listing.stderr
            assert f"s3://{BUCKET}/seed-000/iris.onnx" in listing.stdout
            assert "in use" in listing.stdout
            kept = cache_cli(env, "prune", "--all")
            assert "kept" in kept.stdout and "0 model(s) removed" in kept.stdout
        finally:
            server.stop()

    pruned = cache_cli(env, "prune", "--all")
    assert pruned.returncode == 0 and "1 model(s) removed" in pruned.stdout
    assert "empty" in cache_cli(env, "ls").stdout
    assert cache_cli(env, "prune").returncode == 2  # says what to remove instead of guessing


def test_missing_s3_object_is_that_apis_load_error(s3: S3Server, tmp_path: Path) -> None:
    model = build_linear_onnx(tmp_path / "fine.onnx", WEIGHTS)
    uri = f"s3://{BUCKET}/seed-000/missing.onnx"
    write(
        tmp_path / "kiln.yaml",
        f"- kind: api\n  name: gone\n  onnx:\n    model: {uri}\n"
        f"- kind: api\n  name: fine\n  onnx:\n    model: {model}\n",
    )
    server = KilnServer(tmp_path, tmp_path / "home", env=s3.env(KILN_CACHE_DIR=str(tmp_path / "c")))
    try:
        response = server.client.post("/gone", json=[1, 2, 3, 4])
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert uri in message and "does not exist" in message
        assert "Traceback" not in server.output()
        assert server.client.post("/fine", json=[1, 0, 0, 0]).json() == [1.0, 0.0, 0.0]
    finally:
        server.stop()
