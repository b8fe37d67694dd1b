"""`kiln export kuberay`, validated offline: kubernetes-validate for the standard kinds
(and the Ray pods' templates, as Pods), Ray's own ServeDeploySchema for serveConfigV2,
and the hand-written JSON Schema in tests/schemas/ for the RayService envelope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kiln.backends.ray.options import application_config
from kiln.build.image import image_name
from kiln.build.kuberay import dump, manifests
from kiln.config import load_project

K8S = "1.30.0"
SCHEMA = Path(__file__).parent / "schemas" / "rayservice.schema.json"
RAY_PORTS = {6379, 8265, 10001, 52365}
KILN = [sys.executable, "-m", "kiln.cli.main"]

KILN_YAML = """
- kind: deployment
  name: shop-models
- kind: api
  name: iris
  python: {handler: model.py:Model}
  compute: {min_replicas: 2, max_replicas: 2, cpu: 500m, mem: 1Gi}
- kind: api
  name: digits
  version: "1"
  python: {handler: model.py:Model}
  compute: {min_replicas: 0, max_replicas: 4, init_replicas: 1, cpu: 1, gpu: 1}
"""
MODEL = "class Model:\n    def predict(self, payload):\n        return payload\n"


@pytest.fixture()
def project_dir(tmp_path: Path) -> Path:
    root = tmp_path / "shop"
    root.mkdir()
    (root / "kiln.yaml").write_text(KILN_YAML)
    (root / "model.py").write_text(MODEL)
    return root


def kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILN_HOME": str(cwd / ".kiln-home"), "COLUMNS": "200"}
    return subprocess.run(
        [*KILN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]]
        templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    elif doc["kind"] == "Deployment":
        templates = [doc["spec"]["template"]]
    else:
        return []
    return [c for t in templates for c in t["spec"]["containers"]]


def test_every_document_validates_offline(project_dir: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    project = load_project(project_dir)
    docs = manifests(project, "reg.example/team/shop:1", "models", "pg-url")
    assert [d["kind"] for d in docs] == [
        "RayService",
        "Deployment",
        "Service",
        "NetworkPolicy",
    ]
    # The YAML stream round-trips to the same objects (no anchors, literal blocks).
    text = dump(docs)
    assert "&id" not in text and "*id" not in text
    assert list(yaml.safe_load_all(text)) == docs
    kinds = by_kind(docs)
    for kind in ("Deployment", "Service", "NetworkPolicy"):
        kubernetes_validate.validate(kinds[kind], K8S, strict=True)

    service = kinds["RayService"]
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(service)
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        template = group["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]}}
        kubernetes_validate.validate({**pod, "spec": template["spec"]}, K8S, strict=True)

    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    assert serve["applications"] == [application_config(project, "/app")]
    assert serve["http_options"]["port"] == 8000

    # Names, namespace and labels.
    assert service["metadata"]["name"] == "shop-models"
    assert cluster["rayVersion"] == metadata.version("ray")
    for doc in docs:
        assert doc["metadata"]["namespace"] == "models"
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "kiln"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "shop-models"
        for container in containers(doc):
            assert container["image"] == "reg.example/team/shop:1"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            store = next(e for e in container["env"] if e["name"] == "KILN_STATE_URL")
            assert store["valueFrom"]["secretKeyRef"] == {"name": "pg-url", "key": "url"}

    # The worker holds every initial replica: iris 2 x 0.5 CPU + digits 1 x 1 CPU + the
    # ingress's 0.1 -> 3 cores; memory 2 x 1 GiB + 512 MiB over 0.7, plus 1 GiB for Ray.
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {
        "cpu": "3",
        "memory": f"{-(-int(2.5 * 1024) * 10 // 7) + 1024}Mi",
        "nvidia.com/gpu": "1",
    }
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_control_plane_runs_kiln_server_against_postgres(project_dir: Path) -> None:
    docs = by_kind(manifests(load_project(project_dir), "reg.example/shop:1"))
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kiln", "server", "run"]
    assert {p["containerPort"] for p in container["ports"]} == {8080, 8081, 8082, 8083}
    store = next(e for e in container["env"] if e["name"] == "KILN_STATE_URL")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "kiln-store", "key": "url"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    # Management and metrics only: inference goes through the RayService's serve service.
    assert {p["port"] for p in service["spec"]["ports"]} == {8081, 8082}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


def test_no_service_exposes_ray_ports(project_dir: Path) -> None:
    docs = manifests(load_project(project_dir), "reg.example/shop:1")
    for doc in docs:
        if doc["kind"] == "Service":
            assert not {p["port"] for p in doc["spec"]["ports"]} & RAY_PORTS
            assert doc["spec"]["type"] == "ClusterIP"
    kinds = by_kind(docs)
    spec = kinds["RayService"]["spec"]
    assert "serveService" not in spec
    head = spec["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    # The NetworkPolicy: the only rule open to every source is Serve's port.
    policy = kinds["NetworkPolicy"]["spec"]
    ray_labels = head["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= ray_labels.items()
    for worker in spec["rayClusterConfig"]["workerGroupSpecs"]:
        assert (
            policy["podSelector"]["matchLabels"].items()
            <= worker["template"]["metadata"]["labels"].items()
        )
    open_rules = [rule for rule in policy["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_rules for p in rule["ports"]] == [8000]
    for rule in policy["ingress"]:
        if "from" in rule and "ports" in rule:
            assert {p["port"] for p in rule["ports"]} <= {8265, 52365}


def test_cli_writes_the_file(project_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shop.yaml"
    done = kiln(
        "export",
        "kuberay",
        str(project_dir),
        "-o",
        str(out),
        "--image",
        "reg.example/x:1",
        "--namespace",
        "models",
        "--store-secret",
        "pg",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["RayService", "Deployment", "Service", "NetworkPolicy"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "models"
        for container in containers(doc):
            assert container["image"] == "reg.example/x:1"
    secret = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"][0]
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "pg"


def test_cli_defaults_to_kiln_builds_image_name_on_stdout(project_dir: Path) -> None:
    done = kiln("export", "kuberay", ".", cwd=project_dir)
    assert done.returncode == 0, done.stderr
    expected = image_name(load_project(project_dir), None)
    docs = list(yaml.safe_load_all(done.stdout))
    assert {c["image"] for d in docs for c in containers(d)} == {expected}
    assert "no --image" in done.stderr and "--push" in done.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing"], "project folder not found"),
        (["broken"], "kiln.yaml"),
        (["shop", "--image", "Reg.Example/UPPER:1"], "--image"),
        (["shop", "--image", "reg.example/x:1", "-f", "nope.yaml"], "config file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    project_dir: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "broken").mkdir()
    broken = "- kind: api\n  name: x\n  compute: {cpu: lots}\n"
    (tmp_path / "broken" / "kiln.yaml").write_text(broken)
    done = kiln("export", "kuberay", *args, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and expected in lines[0]
