"""Tests for kiln.config: schema defaults, Cortex compatibility, precise errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kiln.config import (
    RESERVED_NAMES,
    ApiSpec,
    BatchApiSpec,
    ConfigError,
    ConfigIssue,
    Project,
    find_config_file,
    load_project,
    parse_bytes,
    parse_cpu,
    parse_duration,
)

# The "Config" blocks of seeds 000 (onnx) and 001 (tensorflow) with every field
# filled in, model paths pointing at local files instead of s3://.
SEED_000 = """\
- kind: api
  name: my-api
  endpoint: /my-api
  onnx:
    model: my-model.onnx
    request_handler: handler.py
  tracker:
    key: label
    model_type: classification
  compute:
    min_replicas: 1
    max_replicas: 100
    init_replicas: 1
    target_cpu_utilization: 80
    cpu: 200m
    gpu: 1
    mem: 1Gi
  metadata:
    labels: [setosa, versicolor, virginica]
"""

SEED_001 = """\
- kind: api
  name: my-api
  endpoint: /tf/my-api
  python_path: src
  tensorflow:
    model: my-model
    request_handler: handler.py
    signature_key: serving_default
  tracker:
    model_type: regression
  compute:
    min_replicas: 2
    max_replicas: 5
    init_replicas: 3
    target_cpu_utilization: 50
    cpu: 1
    gpu: 0
    mem: 512Mi
  metadata:
    threshold: 0.5
"""

# The seeds' "Example" sections, unchanged except the model path.
SEED_000_EXAMPLE = """\
- kind: api
  name: my-api
  onnx:
    model: my-model.onnx
    request_handler: handler.py
  compute:
    gpu: 1
"""


def write(tmp: Path, text: str, name: str = "kiln.yaml", files: tuple[str, ...] = ()) -> Path:
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(textwrap.dedent(text))
    for f in files:
        p = tmp / f
        if f.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("")
    return tmp


def errors_of(tmp: Path, text: str, files: tuple[str, ...] = (), **kw) -> str:
    write(tmp, text, files=files)
    with pytest.raises(ConfigError) as info:
        load_project(tmp, **kw)
    return str(info.value)


# ---------------------------------------------------------------- seeds


def test_seed_000_onnx_config_parses_with_every_field(tmp_path: Path) -> None:
    write(tmp_path, SEED_000, files=("my-model.onnx", "handler.py"))
    project = load_project(tmp_path)
    assert isinstance(project, Project)
    (api,) = project.apis
    assert api.kind == "api" and api.name == "my-api" and api.endpoint == "/my-api"
    assert api.runtime == "onnx"
    assert api.model_path == str(tmp_path / "my-model.onnx")
    assert api.request_handler_path == str(tmp_path / "handler.py")
    assert api.tracker is not None
    assert (api.tracker.key, api.tracker.model_type) == ("label", "classification")
    c = api.compute
    assert (c.min_replicas, c.max_replicas, c.init_replicas) == (1, 100, 1)
    assert c.target_cpu_utilization == 80 and c.cpu == 0.2 and c.gpu == 1
    assert c.mem == 1073741824
    assert api.metadata == {"labels": ["setosa", "versicolor", "virginica"]}
    assert api.python_path == str(tmp_path)


def test_seed_001_tensorflow_config_parses_with_every_field(tmp_path: Path) -> None:
    write(tmp_path, SEED_001, files=("my-model/", "handler.py", "src/"))
    (api,) = load_project(tmp_path).apis
    assert api.runtime == "tensorflow"
    assert api.runtime_block.signature_key == "serving_default"
    assert api.model_path == str(tmp_path / "my-model")
    assert api.python_path == str(tmp_path / "src")
    assert api.endpoint == "/tf/my-api"
    assert api.tracker is not None and api.tracker.key is None
    assert api.tracker.model_type == "regression"
    c = api.compute
    assert (c.min_replicas, c.max_replicas, c.init_replicas) == (2, 5, 3)
    assert (c.target_cpu_utilization, c.cpu, c.gpu, c.mem) == (50, 1.0, 0, 512 * 2**20)
    assert api.metadata == {"threshold": 0.5}


def test_seed_example_gets_documented_defaults(tmp_path: Path) -> None:
    write(tmp_path, SEED_000_EXAMPLE, name="cortex.yaml", files=("my-model.onnx", "handler.py"))
    project = load_project(tmp_path)
    assert project.config_file == tmp_path / "cortex.yaml"
    api = project.api("my-api")
    assert api is not None
    assert api.endpoint == "/my-api" and api.version is None and api.default is None
    assert api.display_version == ""
    c = api.compute
    assert (c.min_replicas, c.max_replicas, c.init_replicas) == (1, 100, 1)
    assert (c.target_cpu_utilization, c.cpu, c.gpu, c.mem) == (80, 0.2, 1, None)
    a = api.autoscaling
    assert a.target_replica_concurrency is None and a.max_replica_concurrency == 1024
    assert (a.window, a.downscale_stabilization_period, a.upscale_stabilization_period) == (
        60.0,
        300.0,
        60.0,
    )
    assert (a.max_downscale_factor, a.max_upscale_factor) == (0.75, 1.5)
    assert (a.downscale_tolerance, a.upscale_tolerance) == (0.05, 0.05)
    assert a.idle_timeout is None and a.cold_start_timeout == 60.0
    s = api.serving
    assert (s.startup_timeout_s, s.response_timeout_s, s.max_retry_timeout_s) == (120, 120, 300)
    assert (s.max_queue_size, s.max_request_bytes) == (100, 32 * 2**20)
    assert api.batching is None and api.tracker is None
    assert api.auth.required is None and api.response_envelope == "none"
    assert api.config == {} and api.metadata == {}
    assert api.runtime_block.request_handler == str(tmp_path / "handler.py")


# ---------------------------------------------------------------- quantities


@pytest.mark.parametrize("cpu", ["200m", 0.2, "0.2", "200 m"])
def test_cpu_200m_equals_0_2(tmp_path: Path, cpu: object) -> None:
    write(
        tmp_path,
        f"- kind: api\n  name: a\n  python: {{handler: m.py}}\n  compute: {{cpu: {cpu}}}\n",
    )
    (tmp_path / "m.py").write_text("")
    assert load_project(tmp_path).apis[0].compute.cpu == 0.2


def test_cpu_forms() -> None:
    assert parse_cpu(1) == 1.0 and parse_cpu("1.5") == 1.5 and parse_cpu("1500m") == 1.5
    with pytest.raises(ValueError, match="cannot read"):
        parse_cpu("two")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1Gi", 1073741824),
        ("512Mi", 536870912),
        ("1G", 1_000_000_000),
        ("500M", 500_000_000),
        ("1024", 1024),
        (2048, 2048),
        ("4Ki", 4096),
        ("2K", 2000),
        ("1Ti", 2**40),
        ("3T", 3 * 10**12),
    ],
)
def test_mem_units(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_mem_bad_unit_is_an_issue(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  compute:\n    mem: 1Gb2\n",
        check_files=False,
    )
    assert "kiln.yaml:5: api 'a' field compute.mem: cannot read '1Gb2' as a memory size" in text
    assert "Fix: write bytes or a size with a unit" in text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15), ("5m", 300), ("1h", 3600), (30, 30), ("1m30s", 90), ("250ms", 0.25)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_gpu_fraction_rejected(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  compute:\n    gpu: 0.5\n",
        check_files=False,
    )
    assert "kiln.yaml:5: api 'a' field compute.gpu:" in text
    assert "fraction like 0.5 is not supported" in text and "Fix: use gpu: 1" in text


def test_replica_order_checked(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  compute:\n    min_replicas: 2\n"
        "    max_replicas: 4\n    init_replicas: 5\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:7: api 'a' field compute.init_replicas: init_replicas (5) must lie between"
        in text
    )


def test_init_replicas_defaults_to_min(tmp_path: Path) -> None:
    write(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  compute: {min_replicas: 3}\n",
    )
    c = load_project(tmp_path, check_files=False).apis[0].compute
    assert (c.min_replicas, c.init_replicas) == (3, 3)


def test_autoscaling_and_serving_parse(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: api
          name: a
          python: {handler: m.py}
          autoscaling:
            target_replica_concurrency: 1.6
            window: 20s
            downscale_stabilization_period: 2m
            upscale_stabilization_period: 0s
            idle_timeout: 10m
          batching: {max_batch_size: 8, max_batch_delay_ms: 5}
          serving: {max_request_bytes: 1Mi, response_timeout_s: 30}
          auth: {required: true}
          response_envelope: hub
        """,
    )
    api = load_project(tmp_path, check_files=False).apis[0]
    a = api.autoscaling
    assert (a.target_replica_concurrency, a.window) == (1.6, 20.0)
    assert (a.downscale_stabilization_period, a.upscale_stabilization_period) == (120.0, 0.0)
    assert a.idle_timeout == 600.0
    assert api.batching is not None
    assert (api.batching.max_batch_size, api.batching.max_batch_delay_ms) == (8, 5)
    assert (api.serving.max_request_bytes, api.serving.response_timeout_s) == (2**20, 30)
    assert api.auth.required is True and api.response_envelope == "hub"


def test_window_must_be_multiple_of_10s(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  autoscaling:\n    window: 15s\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:5: api 'a' field autoscaling.window: window must be a positive multiple of 10s"
        in text
    )
    assert "Fix: use e.g. window: 10s" in text


# ---------------------------------------------------------------- runtimes and aliases


def test_predictor_python_alias(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: RealtimeAPI
          name: pred
          predictor:
            type: python
            path: predictor.py
            model: weights.pkl
            config: {threshold: 0.3, labels: 3}
          config: {labels: 5}
        """,
        files=("predictor.py", "weights.pkl"),
    )
    api = load_project(tmp_path).apis[0]
    assert api.kind == "api" and api.predictor is None
    assert api.runtime == "python"
    assert api.python is not None
    assert api.python.handler == str(tmp_path / "predictor.py")
    assert api.python.handler_file == str(tmp_path / "predictor.py")
    assert api.model_path == str(tmp_path / "weights.pkl")
    assert api.config == {"threshold": 0.3, "labels": 5}


@pytest.mark.parametrize("rt", ["onnx", "tensorflow"])
def test_predictor_tensor_alias(tmp_path: Path, rt: str) -> None:
    write(
        tmp_path,
        f"- kind: api\n  name: p\n  predictor:\n    type: {rt}\n    path: h.py\n    model: m.bin\n",
        files=("h.py", "m.bin"),
    )
    api = load_project(tmp_path).apis[0]
    assert api.runtime == rt and api.predictor is None
    assert api.model_path == str(tmp_path / "m.bin")
    assert api.request_handler_path == str(tmp_path / "h.py")


def test_predictor_missing_file_reports_predictor_path(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path, "- kind: api\n  name: p\n  predictor:\n    type: python\n    path: gone.py\n"
    )
    assert "kiln.yaml:5: api 'p' field predictor.path: file not found:" in text
    assert str(tmp_path / "gone.py") in text


def test_predictor_onnx_needs_model(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: p\n  predictor:\n    type: onnx\n    path: h.py\n",
        check_files=False,
    )
    assert "kiln.yaml:3: api 'p' field predictor.model: a onnx predictor needs a model" in text


def test_python_handler_forms(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: api
          name: a
          python: {handler: "code/model.py:Model"}
        - kind: api
          name: b
          python: {handler: "mypkg.model:Model"}
        """,
        files=("code/model.py",),
    )
    a, b = load_project(tmp_path).apis
    assert a.python is not None and b.python is not None
    assert a.python.handler == f"{tmp_path / 'code' / 'model.py'}:Model"
    assert (a.python.handler_file, a.python.handler_object) == (
        str(tmp_path / "code/model.py"),
        "Model",
    )
    assert b.python.handler == "mypkg.model:Model" and b.python.handler_module == "mypkg.model"


def test_torch_and_sklearn_blocks(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: api
          name: t
          torch: {model: m.pt, handler: h.py, trusted: true}
        - kind: api
          name: s
          sklearn: {model: m.joblib}
        """,
        files=("m.pt", "h.py", "m.joblib"),
    )
    t, s = load_project(tmp_path).apis
    assert t.runtime == "torch" and t.runtime_block.trusted is True
    assert t.runtime_block.handler == str(tmp_path / "h.py")
    assert s.runtime == "sklearn" and s.runtime_block.method == "predict"
    assert s.runtime_block.trusted is False and s.model_path == str(tmp_path / "m.joblib")


def test_no_runtime_block(tmp_path: Path) -> None:
    text = errors_of(tmp_path, "- kind: api\n  name: a\n")
    assert "kiln.yaml:1: api 'a': no runtime block" in text
    assert "Fix: add exactly one of: onnx, tensorflow, torch, sklearn, python" in text


def test_two_runtime_blocks(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  onnx: {model: m.onnx}\n  python: {handler: m.py}\n",
        check_files=False,
    )
    assert "kiln.yaml:4: api 'a' field python: more than one runtime block (onnx, python)" in text


def test_batch_api_parses(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: BatchAPI
          name: scorer
          predictor:
            type: python
            path: predictor.py
            config: {bucket: local}
          compute: {cpu: 1}
        """,
        files=("predictor.py",),
    )
    project = load_project(tmp_path)
    assert project.apis == []
    (batch,) = project.batch_apis
    assert isinstance(batch, BatchApiSpec)
    assert batch.endpoint == "/scorer" and batch.compute.cpu == 1.0
    assert batch.predictor.path == str(tmp_path / "predictor.py")
    assert batch.config == {"bucket": "local"} and project.batch_api("scorer") is batch


def test_batch_api_runs_a_runtime_block_or_one_predictor(tmp_path: Path) -> None:
    # Issue 7: a Cortex onnx predictor (or an onnx block) serves batch jobs through the model.
    write(
        tmp_path,
        "- kind: BatchAPI\n  name: b\n  predictor:\n    type: onnx\n    path: p.py\n    "
        "model: m.onnx\n  jobs: {visibility_timeout: 2s, max_batch_bytes: 1Mi}\n",
    )
    (batch,) = load_project(tmp_path, check_files=False).batch_apis
    assert batch.runtime == "onnx" and batch.predictor is None
    assert batch.onnx is not None and batch.onnx.model == str(tmp_path / "m.onnx")
    assert batch.jobs.visibility_timeout == 2.0 and batch.jobs.max_batch_bytes == 1 << 20
    text = errors_of(
        tmp_path,
        "- kind: BatchAPI\n  name: b\n  predictor: {type: python, path: p.py}\n"
        "  onnx: {model: m.onnx}\n",
        check_files=False,
    )
    assert "more than one predictor or runtime block" in text


# ---------------------------------------------------------------- endpoints, versions


def test_endpoint_defaults_without_deployment(tmp_path: Path) -> None:
    write(tmp_path, "- kind: api\n  name: iris\n  python: {handler: m.py}\n")
    project = load_project(tmp_path, check_files=False)
    assert project.deployment_name is None and project.apis[0].endpoint == "/iris"


def test_endpoint_defaults_with_deployment(tmp_path: Path) -> None:
    write(
        tmp_path,
        "- kind: deployment\n  name: shop\n- kind: api\n  name: iris\n  python: {handler: m.py}\n"
        "- kind: api\n  name: custom\n  endpoint: /x/y\n  python: {handler: m.py}\n",
    )
    project = load_project(tmp_path, check_files=False)
    assert project.deployment_name == "shop"
    assert [a.endpoint for a in project.apis] == ["/shop/iris", "/x/y"]


def test_versions_and_default(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: api
          name: iris
          version: 1
          default: true
          python: {handler: m.py}
        - kind: api
          name: iris
          version: "10"
          python: {handler: m.py}
        - kind: api
          name: cats
          version: 2
          python: {handler: m.py}
        - kind: api
          name: cats
          version: 9
          python: {handler: m.py}
        """,
    )
    project = load_project(tmp_path, check_files=False)
    iris = project.api("iris")
    assert iris is not None and iris.version == "1" and iris.display_version == "1"
    assert project.api("cats") is not None and project.api("cats").version == "9"
    assert project.api("iris", "10") is not None and project.api("iris", "3") is None
    assert project.api("dogs") is None
    assert {a.endpoint for a in project.apis if a.name == "iris"} == {"/iris"}


def test_duplicate_name_and_version(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  version: 1\n  python: {handler: m.py}\n"
        "- kind: api\n  name: a\n  version: 1\n  python: {handler: m.py}\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:7: api 'a' version 1 field version: duplicate API 'a' version 1: "
        "already defined at line 1" in text
    )


def test_duplicate_unversioned_name(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n- kind: api\n  name: a\n  "
        "python: {handler: m.py}\n",
        check_files=False,
    )
    assert "kiln.yaml:5: api 'a' field name: duplicate API 'a'" in text


def test_duplicate_endpoint(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n"
        "- kind: api\n  name: b\n  endpoint: /a\n  python: {handler: m.py}\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:6: api 'b' field endpoint: endpoint '/a' is already used by api 'a' (line 1)"
        in text
    )
    assert "Fix: set a different endpoint" in text


def test_two_defaults(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  version: 1\n  default: true\n  python: {handler: m.py}\n"
        "- kind: api\n  name: a\n  version: 2\n  default: true\n  python: {handler: m.py}\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:9: api 'a' version 2 field default: more than one version of 'a' says "
        "default: true" in text
    )
    assert "Fix: set default: true on one version only" in text


def test_endpoint_must_start_with_slash(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  endpoint: a/b\n  python: {handler: m.py}\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:3: api 'a' field endpoint: endpoint 'a/b' must start with '/'. Fix: "
        "write endpoint: /a/b" in text
    )


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["Iris", "iris_v2", "-iris", "iris-", "a" * 64, "iris.x"])
def test_invalid_api_name(tmp_path: Path, name: str) -> None:
    text = errors_of(
        tmp_path, f"- kind: api\n  name: '{name}'\n  python: {{handler: m.py}}\n", check_files=False
    )
    assert "kiln.yaml:2:" in text and "field name: invalid API name" in text
    assert "Fix: use lowercase letters, digits and '-'" in text


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES - {"openapi.json"}))
def test_reserved_api_name(tmp_path: Path, name: str) -> None:
    text = errors_of(
        tmp_path, f"- kind: api\n  name: {name}\n  python: {{handler: m.py}}\n", check_files=False
    )
    assert f"kiln.yaml:2: api '{name}' field name: '{name}' is reserved" in text
    assert f"Fix: rename it, e.g. '{name}-api'" in text


def test_reserved_names_list() -> None:
    assert {"ping", "healthz", "predictions", "v1", "v2", "openapi.json", "batch"} <= RESERVED_NAMES
    assert len(RESERVED_NAMES) == 13


# ---------------------------------------------------------------- generic errors


def test_unknown_field_did_you_mean(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: deployment\n  name: shop\n- kind: api\n  name: iris\n  onnx:\n    "
        "model: m.onnx\n    modle: x\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:7: api 'iris' field onnx.modle: unknown field. Fix: did you mean 'model'?"
        in text
    )


def test_unknown_top_level_field(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  endpiont: /x\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:4: api 'a' field endpiont: unknown field. Fix: did you mean 'endpoint'?" in text
    )


def test_wrong_type(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  compute:\n    "
        "max_replicas: lots\n  metadata: [1]\n",
        check_files=False,
    )
    assert (
        "kiln.yaml:5: api 'a' field compute.max_replicas: expected an integer, got 'lots' (string)"
        in text
    )
    assert "kiln.yaml:6: api 'a' field metadata: expected a mapping" in text


def test_block_given_as_string(tmp_path: Path) -> None:
    text = errors_of(tmp_path, "- kind: api\n  name: a\n  onnx: model.onnx\n", check_files=False)
    assert (
        "kiln.yaml:3: api 'a' field onnx: expected a mapping (key: value lines), got "
        "'model.onnx' (string)" in text
    )
    assert "Fix: write it as a block with fields: model, request_handler" in text


def test_missing_required_field(tmp_path: Path) -> None:
    text = errors_of(tmp_path, "- kind: api\n  python: {handler: m.py}\n", check_files=False)
    assert (
        "kiln.yaml:1: resource #1 field name: missing required field. Fix: add `name: ...`" in text
    )


def test_tracker_model_type_required(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  python: {handler: m.py}\n  tracker:\n    key: label\n",
        check_files=False,
    )
    assert "kiln.yaml:4: api 'a' field tracker.model_type: missing required field" in text


def test_unknown_kind(tmp_path: Path) -> None:
    text = errors_of(tmp_path, "- kind: realtimeapi\n  name: a\n")
    assert (
        "kiln.yaml:1: resource 'a' field kind: unknown kind 'realtimeapi'. Fix: did you "
        "mean 'RealtimeAPI'?" in text
    )


def test_yaml_syntax_error_with_line(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path, "- kind: api\n  name: a\n  onnx:\n    model: [unclosed\n  compute: {}\n"
    )
    assert text.startswith("kiln.yaml:")
    assert "YAML syntax error" in text and "Fix: check the indentation" in text
    line = int(text.split(":")[1])
    assert 4 <= line <= 6


def test_top_level_not_a_list(tmp_path: Path) -> None:
    text = errors_of(tmp_path, "kind: api\nname: a\n")
    assert "kiln.yaml:1: the top level must be a list of resources, got mapping" in text
    assert "Fix: start each resource with '- '" in text


def test_empty_file(tmp_path: Path) -> None:
    text = errors_of(tmp_path, "# nothing here\n")
    assert text.startswith("kiln.yaml: the config file is empty. Fix: add at least one resource")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  name: b\n  python: {handler: m.py}\n",
        check_files=False,
    )
    assert "kiln.yaml:3: api 'a' field name: duplicate key 'name' (first at line 2)" in text


def test_all_errors_reported_together(tmp_path: Path) -> None:
    write(
        tmp_path,
        "- kind: api\n  name: A\n  python: {handler: m.py}\n- kind: api\n  name: b\n"
        "  python: {handler: m.py}\n  compute: {gpu: 0.5}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path, check_files=False)
    issues = info.value.issues
    assert [i.field for i in issues] == ["name", "compute.gpu"]
    assert all(isinstance(i, ConfigIssue) and i.file == "kiln.yaml" for i in issues)
    assert [i.line for i in issues] == [2, 7]
    assert len(str(info.value).splitlines()) == 2


# ---------------------------------------------------------------- files


def test_missing_model_file_names_resolved_path(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path,
        "- kind: api\n  name: a\n  onnx:\n    model: models/m.onnx\n    request_handler: h.py\n",
    )
    assert (
        "kiln.yaml:4: api 'a' field onnx.model: model path not found: "
        f"{tmp_path / 'models' / 'm.onnx'}" in text
    )
    assert (
        f"kiln.yaml:5: api 'a' field onnx.request_handler: file not found: {tmp_path / 'h.py'}"
        in text
    )
    assert (
        "Fix: check the path; relative paths are read from the folder holding the config file"
        in text
    )


def test_missing_handler_file(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path, "- kind: api\n  name: a\n  python:\n    handler: src/model.py:Model\n"
    )
    assert (
        "kiln.yaml:4: api 'a' field python.handler: file not found: "
        f"{tmp_path / 'src' / 'model.py'}" in text
    )


def test_check_files_false_skips_existence(tmp_path: Path) -> None:
    write(tmp_path, "- kind: api\n  name: a\n  onnx: {model: nowhere.onnx}\n")
    api = load_project(tmp_path, check_files=False).apis[0]
    assert api.model_path == str(tmp_path / "nowhere.onnx")


@pytest.mark.parametrize(
    "url",
    ["s3://bucket/m.onnx", "gs://bkt/m.onnx", "http://h/m.onnx", "https://h/m.onnx", "hf://o/r@v1"],
)
def test_remote_model_accepted_as_written(tmp_path: Path, url: str) -> None:
    write(tmp_path, f"- kind: api\n  name: a\n  onnx:\n    model: {url}\n")
    api = load_project(tmp_path, check_files=False).apis[0]
    assert api.model_path == url  # fetched by the worker, through the model cache


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h/m.onnx", "uses the scheme 'ftp://', which Kiln cannot fetch"),
        ("s3://AKIA:secret@bucket/m.onnx", "has credentials written into it"),
        ("s3://bucket", "names a whole bucket"),
    ],
)
def test_bad_remote_model_rejected(tmp_path: Path, url: str, message: str) -> None:
    text = errors_of(
        tmp_path, f"- kind: api\n  name: a\n  onnx:\n    model: {url}\n", check_files=False
    )
    assert "kiln.yaml:4: api 'a' field onnx.model: the model path" in text
    assert message in text
    assert "secret" not in text


def test_paths_resolve_relative_to_config_folder(tmp_path: Path) -> None:
    write(
        tmp_path,
        "- kind: api\n  name: a\n  onnx: {model: m.onnx}\n",
        name="conf/app.yaml",
        files=("conf/m.onnx",),
    )
    project = load_project(tmp_path, "conf/app.yaml")
    assert project.root == tmp_path / "conf"
    assert project.apis[0].model_path == str(tmp_path / "conf" / "m.onnx")
    assert project.apis[0].python_path == str(tmp_path / "conf")


# ---------------------------------------------------------------- env vars


def test_env_substitution(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        - kind: api
          name: a
          onnx: {model: "${MODEL_DIR}/m.onnx"}
          compute:
            min_replicas: ${REPLICAS}
            max_replicas: ${MAXR:-7}
          metadata: {literal: "$${NOT_A_VAR}"}
        """,
    )
    env = {"MODEL_DIR": str(tmp_path / "models"), "REPLICAS": "2"}
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_text("")
    api = load_project(tmp_path, env=env).apis[0]
    assert api.model_path == str(tmp_path / "models" / "m.onnx")
    assert (api.compute.min_replicas, api.compute.max_replicas) == (2, 7)
    assert api.metadata == {"literal": "${NOT_A_VAR}"}


def test_env_from_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_TEST_NAME", "from-env")
    write(tmp_path, "- kind: api\n  name: ${KILN_TEST_NAME}\n  python: {handler: m.py}\n")
    assert load_project(tmp_path, check_files=False).apis[0].name == "from-env"


def test_env_unset_is_named(tmp_path: Path) -> None:
    text = errors_of(
        tmp_path, "- kind: api\n  name: a\n  onnx:\n    model: ${NO_SUCH_VAR}/m.onnx\n", env={}
    )
    assert (
        "kiln.yaml:4: api 'a' field onnx.model: environment variable NO_SUCH_VAR is not set" in text
    )
    assert "Fix: export NO_SUCH_VAR=" in text
    assert "not found" not in text  # no cascade error for the unresolved path


# ---------------------------------------------------------------- config file discovery


def test_kiln_yaml_preferred_over_cortex_yaml(tmp_path: Path) -> None:
    (tmp_path / "kiln.yaml").write_text("[]")
    (tmp_path / "cortex.yaml").write_text("[]")
    assert find_config_file(tmp_path) == tmp_path / "kiln.yaml"
    (tmp_path / "kiln.yaml").unlink()
    assert find_config_file(tmp_path) == tmp_path / "cortex.yaml"


def test_f_option_names_another_file(tmp_path: Path) -> None:
    write(tmp_path, "- kind: api\n  name: other\n  python: {handler: m.py}\n", name="other.yaml")
    (tmp_path / "kiln.yaml").write_text("- kind: api\n  name: main\n  python: {handler: m.py}\n")
    assert find_config_file(tmp_path, "other.yaml") == tmp_path / "other.yaml"
    project = load_project(tmp_path, "other.yaml", check_files=False)
    assert [a.name for a in project.apis] == ["other"]


def test_no_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no kiln.yaml or cortex.yaml in") as info:
        find_config_file(tmp_path)
    assert "Fix: create one" in str(info.value)
    with pytest.raises(ConfigError, match="config file not found"):
        find_config_file(tmp_path, "missing.yaml")


def test_apispec_validates_standalone() -> None:
    spec = ApiSpec.model_validate(
        {"kind": "api", "name": "x", "version": 3, "sklearn": {"model": "m"}}
    )
    assert spec.version == "3" and spec.runtime == "sklearn" and spec.endpoint is None
