"""The shipped examples, built and served exactly as their READMEs say."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def built_copy(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(EXAMPLES / name, dest, ignore=shutil.ignore_patterns("*.onnx", "*.npz"))
    subprocess.run([sys.executable, "build_model.py"], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.parametrize(
    ("example", "api", "expected_single", "expected_batch"),
    [
        ("iris-onnx", "iris", "setosa", ["setosa", "versicolor", "virginica"]),
        ("hub-python", "digits", 0, [1, 2, 3]),
    ],
)
def test_example_serves_its_samples(
    tmp_path: Path, serve_project, example, api, expected_single, expected_batch
) -> None:
    project = built_copy(example, tmp_path)
    server = serve_project(project)
    key = "label" if example == "iris-onnx" else "digit"
    single = server.client.post(f"/{api}", content=(project / "sample.json").read_bytes())
    assert single.status_code == 200, single.text
    assert single.json()[key] == expected_single
    batch = server.client.post(f"/{api}", content=(project / "sample-batch.json").read_bytes())
    assert [item[key] for item in batch.json()] == expected_batch
    bad = server.client.post(f"/{api}", json={"nope": 1} if example == "iris-onnx" else [1, 2])
    assert bad.status_code == 400
    assert orjson.loads(bad.content)["error"]["type"] == "InvalidInput"
