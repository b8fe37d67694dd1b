"""Failures at load time: a clear state and message, never a crashed server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from support import build_linear_onnx, write

REPO = Path(__file__).resolve().parents[1]  # this checkout, where `pip install -e` runs

BROKEN = """
raise RuntimeError("weights file is corrupt")
"""


def test_a_model_that_fails_to_load_is_reported_and_others_still_serve(
    tmp_path: Path, serve_project
) -> None:
    write(tmp_path / "broken.py", BROKEN)
    build_linear_onnx(tmp_path / "m.onnx", np.eye(4, 2, dtype=np.float32))
    write(
        tmp_path / "kiln.yaml",
        "- kind: api\n  name: broken\n  python:\n    handler: broken.py\n"
        "- kind: api\n  name: fine\n  onnx:\n    model: m.onnx\n",
    )
    server = serve_project(tmp_path)
    assert "weights file is corrupt" in server.output()  # shown in the table at start
    for response in (server.client.get("/broken"), server.client.post("/broken", json=1)):
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "Unavailable"
        assert "RuntimeError: weights file is corrupt" in response.json()["error"]["message"]
    statuses = {a["name"]: a["status"] for a in server.client.get("/apis").json()["apis"]}
    assert statuses == {"broken": "failed", "fine": "ready"}
    assert server.client.post("/fine", json=[1, 2, 3, 4]).json() == [1.0, 2.0]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="tensorflow is installed here"
)
def test_tensorflow_without_the_extra_says_how_to_install_it(tmp_path: Path, serve_project) -> None:
    (tmp_path / "saved").mkdir()
    write(tmp_path / "kiln.yaml", "- kind: api\n  name: tf\n  tensorflow:\n    model: saved\n")
    server = serve_project(tmp_path)
    response = server.client.post("/tf", json=[1])
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    # Kiln is not on PyPI: the hint installs the extra from Kiln's own folder.
    assert f"pip install -e '{REPO}[tensorflow]'" in message and "kiln-serve" not in message


def test_a_missing_framework_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere (CI installs every extra, so the served variant above is skipped there)."""
    import kiln.runtimes as registry
    from kiln.serving.types import WorkerSpec

    entry = ("kiln.runtimes.torch", "TorchRuntime", "torch", "kiln_no_such_framework")
    monkeypatch.setitem(registry._REGISTRY, "torch", entry)
    with pytest.raises(registry.MissingFramework) as raised:
        registry.load_runtime(WorkerSpec(api="net", version=None, runtime="torch"))
    # Kiln is not on PyPI: the hint is the editable install of this checkout, as the README's.
    assert f"pip install -e '{REPO}[torch]'" in str(raised.value)
    assert "kiln-serve" not in str(raised.value)
