"""kiln.yaml -> Ray Serve options (no cluster): names, the mapping, and a config file
that Serve's own schema accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.backends.ray.options import (
    INGRESS,
    application_config,
    deployment_name,
    deployment_options,
)
from kiln.config import load_project

KILN_YAML = """
- kind: api
  name: iris
  python: {handler: model.py:Model}
  compute: {min_replicas: 2, max_replicas: 2, cpu: 250m, mem: 512Mi}
- kind: api
  name: digits
  version: "1"
  python: {handler: model.py:Model}
  compute: {min_replicas: 0, max_replicas: 4, init_replicas: 1, gpu: 1}
  autoscaling:
    target_replica_concurrency: 3
    max_replica_concurrency: 16
    window: 20s
    upscale_stabilization_period: 5s
    downscale_stabilization_period: 30s
    idle_timeout: 90s
- kind: api
  name: digits
  version: "2"
  python: {handler: model.py:Model}
- kind: api
  name: iris-v2
  python: {handler: model.py:Model}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("proj")
    (root / "kiln.yaml").write_text(KILN_YAML)
    (root / "model.py").write_text("class Model:\n    def predict(self, p, c):\n        return p\n")
    return load_project(root)


def test_deployment_names_are_unique_and_valid(project) -> None:
    names = [deployment_name(api) for api in project.apis]
    assert names == ["iris", "digits@1", "digits@2", "iris-v2"]
    assert len(set(names)) == len(names)
    assert not any("#" in n for n in names)  # the one character Serve reserves


def test_fixed_replicas_and_compute(project) -> None:
    iris = deployment_options(project.api("iris"))
    assert iris["num_replicas"] == 2 and "autoscaling_config" not in iris
    assert iris["ray_actor_options"] == {"num_cpus": 0.25, "memory": 512 * 2**20}
    assert iris["max_ongoing_requests"] == 1024
    assert iris["health_check_period_s"] <= 2


def test_autoscaling_maps_onto_serve(project) -> None:
    digits = deployment_options(project.api("digits", "1"))
    assert "num_replicas" not in digits
    assert digits["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 1.0}
    assert digits["max_ongoing_requests"] == 16
    assert digits["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 3.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 30.0,
        "look_back_period_s": 20.0,
        "downscale_to_zero_delay_s": 90.0,
    }


def test_application_config_is_a_valid_serve_config(project) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    app = application_config(project, "/app/project", name="shop")
    assert app["import_path"] == "kiln.backends.ray.app:build_app"
    assert app["route_prefix"] == "/"
    assert app["args"] == {"project_dir": "/app/project", "config_file": "kiln.yaml"}
    assert [d["name"] for d in app["deployments"]] == [
        INGRESS,
        "iris",
        "digits@1",
        "digits@2",
        "iris-v2",
    ]
    parsed = ServeApplicationSchema.model_validate(app)
    assert parsed.name == "shop"
    config = ServeDeploySchema.model_validate({"applications": [app]})
    deployments = {d.name: d for d in config.applications[0].deployments}
    assert deployments["iris"].num_replicas == 2
    scaling = AutoscalingConfig(**deployments["digits@1"].autoscaling_config)
    assert scaling.min_replicas == 0 and scaling.target_ongoing_requests == 3.0
    assert deployments["digits@1"].ray_actor_options.num_gpus == 1.0


def test_importing_options_does_not_import_ray() -> None:
    import subprocess
    import sys

    code = "import sys, kiln.backends.ray.options; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
