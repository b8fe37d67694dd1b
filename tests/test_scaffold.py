"""The project scaffold (`kiln init`) and the shipped examples.

A scaffold that does not serve real answers as created, or an example that
drifts from its README, costs new users their first five minutes; these tests
run the generated handlers and build the example models for real.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml

import kiln
from kiln.cli import scaffold
from kiln.cli.scaffold import TEMPLATES, create_project

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LABELS = ["setosa", "versicolor", "virginica"]

COMMON_FILES = {
    ".dockerignore",
    "Dockerfile",
    "README.md",
    "kiln.yaml",
    "requirements.txt",
    "sample.json",
    "src/handler.py",
}
EXPECTED_FILES = {
    "python": COMMON_FILES | {"model/weights.json"},
    "onnx": COMMON_FILES | {"model/model.onnx", "build_model.py"},
}


def import_file(path: Path) -> ModuleType:
    """Import a user file the way a fresh process would, under a unique name."""
    spec = importlib.util.spec_from_file_location(f"user_{uuid.uuid4().hex}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_yaml(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, list)
    return data


def ort_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- create_project ---------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_creates_listed_files(tmp_path: Path, template: str) -> None:
    dest = tmp_path / "my-api"
    created = create_project(dest, template)
    assert {p.as_posix() for p in created} == EXPECTED_FILES[template]
    assert all(not p.is_absolute() and (dest / p).is_file() for p in created)
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert on_disk == EXPECTED_FILES[template]
    for rel in created:
        if rel.suffix != ".onnx":
            assert "{{" not in (dest / rel).read_text(), f"placeholder left in {rel}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_name_defaults_to_folder_and_can_be_given(tmp_path: Path, template: str) -> None:
    create_project(tmp_path / "shop-api", template)
    assert load_yaml(tmp_path / "shop-api" / "kiln.yaml")[0]["name"] == "shop-api"
    create_project(tmp_path / "Some_Folder", template, name="fraud")
    assert load_yaml(tmp_path / "Some_Folder" / "kiln.yaml")[0]["name"] == "fraud"
    assert "/fraud" in (tmp_path / "Some_Folder" / "README.md").read_text()


def test_refuses_existing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError) as err:
        create_project(dest)
    message = str(err.value)
    assert str(dest) in message and "already exists" in message
    assert "new folder name" in message and "remove" in message
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "mine"


def test_refuses_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "taken"
    dest.write_text("x")
    with pytest.raises(FileExistsError, match="a file"):
        create_project(dest)
    assert dest.read_text() == "x"


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("My_API", "'my-api'"),
        ("-leading", "'leading'"),
        ("trailing-", "'trailing'"),
        ("a" * 64, "1-63"),
        ("", "DNS label"),
        ("ping", "shadow"),
        ("models", "shadow"),
    ],
)
def test_rejects_bad_name(tmp_path: Path, name: str, hint: str) -> None:
    dest = tmp_path / "project"
    with pytest.raises(ValueError) as err:
        create_project(dest, name=name)
    assert hint in str(err.value)
    assert not dest.exists()


def test_bad_folder_name_suggests_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'my-model-v2'"):
        create_project(tmp_path / "My Model v2")


def test_unknown_template(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        create_project(tmp_path / "x", template="tensorflw")
    assert "'tensorflw'" in str(err.value)
    assert all(t in str(err.value) for t in TEMPLATES)
    assert not (tmp_path / "x").exists()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: Path, name: str) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(scaffold, "_render", boom)
    with pytest.raises(OSError, match="disk full"):
        create_project(tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_template_sources_survive_packaging() -> None:
    """Package-data globs skip dotfiles and caches; templates must not rely on them."""
    for path in scaffold.TEMPLATE_ROOT.rglob("*"):
        rel = path.relative_to(scaffold.TEMPLATE_ROOT)
        assert not any(part.startswith(".") for part in rel.parts), rel
        assert "__pycache__" not in rel.parts and path.suffix != ".pyc", rel


@pytest.mark.parametrize("template", TEMPLATES)
def test_kiln_yaml_parses_and_names_existing_files(tmp_path: Path, template: str) -> None:
    dest = tmp_path / "my-api"
    create_project(dest, template)
    (api,) = load_yaml(dest / "kiln.yaml")
    assert api["kind"] == "api" and api["name"] == "my-api"
    if template == "python":
        handler_file, _, class_name = api["python"]["handler"].partition(":")
        assert (dest / handler_file).is_file() and class_name == "Model"
        assert (dest / api["python"]["model"]).is_dir()
        assert isinstance(api["config"], dict) and isinstance(api["metadata"], dict)
    else:
        assert (dest / api["onnx"]["model"]).is_file()
        assert (dest / api["onnx"]["request_handler"]).is_file()
        assert api["metadata"]["labels"] == LABELS


@pytest.mark.parametrize("template", TEMPLATES)
def test_dockerfile_serves_on_all_interfaces_explicitly(tmp_path: Path, template: str) -> None:
    create_project(tmp_path / "app", template)
    dockerfile = (tmp_path / "app" / "Dockerfile").read_text()
    # kiln build --context writes this same file (tests/test_build.py builds it).
    assert "ARG BASE=python:3.11-slim\n" in dockerfile and "\nFROM ${BASE}\n" in dockerfile
    assert "pip install --no-index" in dockerfile and "--find-links /tmp/wheels" in dockerfile
    assert "--allow-unauthenticated" not in dockerfile
    assert '"--host", "0.0.0.0"' in dockerfile and '"--auth"]' in dockerfile
    assert "KILN_API_KEY_FILE" in dockerfile and "USER 10001:10001" in dockerfile
    readme = (tmp_path / "app" / "README.md").read_text()
    assert "kiln serve" in readme and "kiln predict app sample.json" in readme
    assert "curl -X POST http://127.0.0.1:8080/app" in readme


# --- the generated handlers answer -------------------------------------------


@pytest.fixture
def python_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dest = tmp_path / "flowers"
    create_project(dest, "python")
    model_dir = str((dest / "model").resolve())
    monkeypatch.setenv("MODEL_DIR", model_dir)
    (api,) = load_yaml(dest / "kiln.yaml")
    model = import_file(dest / "src" / "handler.py").Model()
    model.load(model_dir, api["config"])
    return dest, model


def test_python_template_predicts(python_project) -> None:
    dest, model = python_project
    sample = json.loads((dest / "sample.json").read_text())
    out = model.predict(sample, None)
    assert [p["label"] for p in out["predictions"]] == ["setosa", "virginica"]
    first = out["predictions"][0]["probabilities"]
    assert list(first) == LABELS
    assert first["setosa"] == pytest.approx(0.9816, abs=1e-4)
    assert sum(first.values()) == pytest.approx(1.0, abs=1e-3)
    assert json.loads(json.dumps(out)) == out  # JSON-encodable as is


def test_python_template_rejects_bad_input(python_project) -> None:
    _, model = python_project
    for bad in ({"inputs": [[1, 2]]}, {"inputs": "x"}, [1, 2, 3, 4], {"other": 1}):
        with pytest.raises(kiln.InvalidInput):
            model.predict(bad, None)


def test_python_template_batch_and_explain(python_project) -> None:
    _, model = python_project
    ok = {"inputs": [[7.0, 3.2, 4.7, 1.4]]}
    results = model.predict_batch(
        [ok, {"inputs": [[1]]}, {"inputs": [6.3, 3.3, 6.0, 2.5]}], [None] * 3
    )
    assert len(results) == 3
    assert results[0]["predictions"][0]["label"] == "versicolor"
    assert isinstance(results[1], kiln.InvalidInput)
    assert results[2]["predictions"][0]["label"] == "virginica"
    assert results[0] == model.predict(ok, None)
    (explained,) = model.explain(ok, None)["explanations"]
    assert explained["label"] == "versicolor"
    assert set(explained["contributions"]) == {
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
    }
    assert explained["contributions"]["sepal_length"] == pytest.approx(0.5346 * 7.0, abs=1e-4)


def test_onnx_template_model_and_handler(tmp_path: Path) -> None:
    dest = tmp_path / "flowers"
    create_project(dest, "onnx")
    session = ort_session(dest / "model" / "model.onnx")
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape[1] == 4 and inp.type == "tensor(float)"
    raw = session.run(None, {"input": np.zeros((5, 4), dtype=np.float32)})
    assert raw[0].shape == (5, 3)
    np.testing.assert_allclose(raw[0].sum(axis=1), 1.0, rtol=1e-5)

    (api,) = load_yaml(dest / "kiln.yaml")
    handler = import_file(dest / api["onnx"]["request_handler"])
    sample = json.loads((dest / "sample.json").read_text())
    feeds = handler.pre_inference(sample, session.get_inputs(), api["metadata"])
    assert feeds["input"].dtype == np.float32 and feeds["input"].shape == (2, 4)
    out = handler.post_inference(session.run(None, feeds), session.get_inputs(), api["metadata"])
    assert [p["label"] for p in out["predictions"]] == ["setosa", "virginica"]
    with pytest.raises(kiln.InvalidInput):
        handler.pre_inference({"inputs": [[1, 2, 3]]}, session.get_inputs(), api["metadata"])


def test_onnx_and_python_templates_agree(tmp_path: Path, python_project) -> None:
    _, model = python_project
    dest = tmp_path / "onnx-app"
    create_project(dest, "onnx")
    session = ort_session(dest / "model" / "model.onnx")
    rows = np.random.default_rng(0).uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(50, 4))
    (probs,) = session.run(None, {"input": rows.astype(np.float32)})
    labels = [p["label"] for p in model.predict({"inputs": rows.tolist()}, None)["predictions"]]
    assert labels == [LABELS[i] for i in probs.argmax(axis=1)]


def test_onnx_template_build_script_reproduces_model(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    dest = tmp_path / "app"
    create_project(dest, "onnx")
    shipped = (dest / "model" / "model.onnx").read_bytes()
    (dest / "model" / "model.onnx").unlink()
    subprocess.run([sys.executable, "build_model.py"], cwd=dest, check=True, capture_output=True)
    assert (dest / "model" / "model.onnx").read_bytes() == shipped


# --- examples -------------------------------------------------------------------


def copy_example(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(
        EXAMPLES / name, dest, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.npz")
    )
    return dest


def build(example: Path) -> str:
    result = subprocess.run(
        [sys.executable, "build_model.py"], cwd=example, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_iris_onnx_example(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression

    example = copy_example("iris-onnx", tmp_path)
    stdout = build(example)
    assert "150/150 rows agree" in stdout and "accuracy on the iris data set: 0.97" in stdout

    (api,) = load_yaml(example / "kiln.yaml")
    assert api["name"] == "iris" and api["metadata"]["labels"] == LABELS
    session = ort_session(example / api["onnx"]["model"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "label"]

    x, y = sklearn_datasets.load_iris(return_X_y=True)
    probabilities, label = session.run(None, {"input": x.astype(np.float32)})
    assert probabilities.shape == (150, 3) and label.shape == (150,) and label.dtype == np.int64
    expected = LogisticRegression(max_iter=1000).fit(x, y).predict(x)
    np.testing.assert_array_equal(label, expected)

    handler = import_file(example / api["onnx"]["request_handler"])
    signature, metadata = session.get_inputs(), api["metadata"]

    def ask(sample):
        feeds = handler.pre_inference(sample, signature, metadata)
        return handler.post_inference(session.run(None, feeds), signature, metadata)

    one = ask(json.loads((example / "sample.json").read_text()))
    assert one["label"] == "setosa" and list(one["probabilities"]) == LABELS
    batch = ask(json.loads((example / "sample-batch.json").read_text()))
    assert [a["label"] for a in batch] == LABELS
    with pytest.raises(kiln.InvalidInput, match="missing field"):
        handler.pre_inference({"sepal_length": 5.1}, signature, metadata)


def test_hub_python_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    example = copy_example("hub-python", tmp_path)
    assert "accuracy on the digits data set: 0.9" in build(example)

    (api,) = load_yaml(example / "kiln.yaml")
    assert api["name"] == "digits" and api["python"]["handler"] == "src/main.py"
    monkeypatch.setenv("MODEL_DIR", str((example / api["python"]["model"]).resolve()))
    main = import_file(example / api["python"]["handler"])
    assert getattr(main.inference_handler, "__kiln_handler__", False)

    out = main.inference_handler(json.loads((example / "sample.json").read_text()), None)
    assert out["digit"] == 0 and 0.5 < out["probability"] <= 1.0
    batch = main.inference_handler(json.loads((example / "sample-batch.json").read_text()), None)
    assert [a["digit"] for a in batch] == [1, 2, 3]

    digits = sklearn_datasets.load_digits()
    answers = main.inference_handler(digits.data.tolist(), None)
    accuracy = np.mean([a["digit"] for a in answers] == digits.target)
    assert accuracy > 0.95
    with pytest.raises(kiln.InvalidInput, match="8x8"):
        main.inference_handler([1, 2], None)
