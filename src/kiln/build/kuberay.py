"""`kiln export kuberay`: a project as KubeRay and Kubernetes manifests (pure functions).

What comes out, for a project whose image `kiln build` made (docs/kubernetes.md):

- a `RayService` (ray.io/v1): its `serveConfigV2` is the Serve config the Ray backend
  itself would deploy (`kiln.backends.ray.options.application_config`, one mapping of
  kiln.yaml onto Serve, never a second copy here), and its `rayClusterConfig` one head
  and one worker group running the project's image, sized from the APIs' `compute`
  (the Ray pods get the store's URL too: the ingress decides keys and quotas there);
- the Kiln control plane: a `Deployment` running `kiln server run` with PostgreSQL as
  its store (`KILN_STATE_URL` from a Secret) and a `Service` for its management and
  metrics ports (inference goes through the RayService's Serve service on 8000);
- a `NetworkPolicy` fencing the Ray pods: only Serve's port 8000 is open to everyone;
  the dashboard (8265, also Ray's job submission API), GCS (6379) and Ray client
  (10001) answer only the cluster's own pods, Kiln's control plane and the KubeRay
  operator. Kiln never emits a Service for those ports (the issue's security rule);
  KubeRay's own head Service is kept ClusterIP.

Nothing here imports Ray (its version is read from the installed distribution's
metadata) nor talks to a cluster: the output is validated offline in the tests.
"""

from __future__ import annotations

import math
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from kiln.build.base import RUNTIME_UID

APP_DIR = "/app"
HOME = "/home/kiln"
KILN_HOME = f"{HOME}/.kiln"
SERVE_PORT = 8000
DASHBOARD_PORT = 8265
GCS_PORT = 6379
CLIENT_PORT = 10001
DASHBOARD_AGENT_PORT = 52365
CONTROL_PORTS = {"http": 8080, "management": 8081, "metrics": 8082, "grpc": 8083}
# The control plane's Service: management (CLI, REST, console) and metrics. Inference
# traffic goes through the RayService's Serve service instead.
SERVICE_PORTS = ("management", "metrics")
HEAD_CPU = 2
HEAD_MEMORY_MI = 4096
WORKER_MIN_CPU = 1
WORKER_MIN_MEMORY_MI = 2048
# Per replica when compute.mem is unset: what a Kiln worker process takes at rest.
DEFAULT_REPLICA_MEMORY = 512 * 2**20
# Ray gives its object store ~30% of a node's memory; actors get the rest.
OBJECT_STORE_SHARE = 0.3
RAY_OVERHEAD_MI = 1024
NAME_MAX = 40  # KubeRay appends "-raycluster-xxxxx-head-svc" within a 63-character limit
_IMAGE_RE = re.compile(
    r"^(?:(?P<domain>[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


class ExportError(Exception):
    """A problem the user fixes (a bad --image, no Ray installed): one line, with the fix."""


def image_problem(ref: str) -> str | None:
    """Why `ref` is not an OCI image reference a kubelet can pull, or None."""
    if len(ref) > 255 or not _IMAGE_RE.match(ref):
        return (
            f"--image {ref!r} is not an image reference: use [REGISTRY/]NAME[:TAG][@sha256:DIGEST] "
            f"in lower case, e.g. --image registry.example.com/team/app:1"
        )
    return None


def ray_version() -> str:
    """The installed Ray's version: `rayVersion` must match the Ray inside the image."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        raise ExportError(
            "Ray is not installed here, so rayVersion cannot match the image's Ray: "
            "pip install 'kiln-serve[ray]' (the same Ray version the image holds)"
        ) from None


def instance_name(project: Any) -> str:
    """The deployment's name as a DNS label short enough for KubeRay's derived names."""
    raw = project.deployment_name or Path(project.root).resolve().name
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:NAME_MAX].rstrip("-")
    return name or "kiln"


def labels(name: str, component: str) -> dict[str, str]:
    """The labels every object carries (and the selectors match on)."""
    return {
        "app.kubernetes.io/name": "kiln",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "kiln",
    }


def _meta(
    name: str, instance: str, component: str, namespace: str | None, **extra: Any
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = labels(instance, component)
    meta.update(extra)
    return meta


def _mi(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / 2**20))


def worker_resources(project: Any) -> dict[str, Any]:
    """One worker pod that holds every API version's initial replicas and the ingress.

    CPUs: the replicas' `compute.cpu` summed (whole cores: Ray counts whole CPUs from a
    pod's limit). Memory: the replicas' `compute.mem` (512 MiB each where unset) plus
    Ray's object store share and its own processes. GPUs: summed. Never below one core
    and 2 GiB, a worker Ray can start on."""
    from kiln.backends.ray.options import INGRESS_CPUS

    cpu, mem, gpu = INGRESS_CPUS, 0.0, 0
    for api in project.apis:
        replicas = max(api.compute.init_replicas or 0, api.compute.min_replicas, 1)
        cpu += float(api.compute.cpu) * replicas
        mem += float(api.compute.mem or DEFAULT_REPLICA_MEMORY) * replicas
        gpu += int(api.compute.gpu) * replicas
    cores = max(WORKER_MIN_CPU, math.ceil(round(cpu, 6)))
    memory = max(WORKER_MIN_MEMORY_MI, _mi(mem / (1 - OBJECT_STORE_SHARE)) + RAY_OVERHEAD_MI)
    amounts: dict[str, str] = {"cpu": str(cores), "memory": f"{memory}Mi"}
    if gpu:
        amounts["nvidia.com/gpu"] = str(gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def serve_config(project: Any) -> dict[str, Any]:
    """The Serve config (a `ServeDeploySchema` document) KubeRay deploys on the cluster."""
    from kiln.backends.ray.options import application_config

    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [application_config(project, APP_DIR)],
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _scratch(shm: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writable folders on a read-only root: /tmp (Ray's session folder), the home
    (KILN_HOME, caches) and, for Ray, /dev/shm in memory (the object store)."""
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": HOME},
    ]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


# KubeRay runs its generated `ray start` through `bash -lc`, and a login shell on Debian
# resets PATH, which hides the image's venv (where `ray` lives). With the annotation
# `ray.io/overwrite-container-cmd` KubeRay leaves the command to us and hands the
# generated one over in $KUBERAY_GEN_RAY_START_CMD; a plain shell keeps the image's PATH.
RAY_COMMAND = ["/bin/bash", "-c", "--"]
RAY_ARGS = ['ulimit -n 65536 2>/dev/null || true; eval "exec $KUBERAY_GEN_RAY_START_CMD"']


def _env(store_secret: str) -> list[dict[str, Any]]:
    """The store's URL (from the Secret, never inline) and the image's home."""
    return [
        {
            "name": "KILN_STATE_URL",
            "valueFrom": {"secretKeyRef": {"name": store_secret, "key": "url"}},
        },
        {"name": "HOME", "value": HOME},
        {"name": "KILN_HOME", "value": KILN_HOME},
    ]


def _ray_pod(
    name: str,
    image: str,
    container: str,
    resources: dict[str, Any],
    ports: list[Any],
    store_secret: str,
) -> dict[str, Any]:
    volumes, mounts = _scratch(shm=True)
    spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [
            {
                "name": container,
                "image": image,
                "command": list(RAY_COMMAND),
                "args": list(RAY_ARGS),
                "env": _env(store_secret),
                "resources": resources,
                "ports": ports,
                "securityContext": _container_security(),
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    return {"metadata": {"labels": labels(name, "ray")}, "spec": spec}


def rayservice(
    project: Any, name: str, image: str, namespace: str | None, version: str, store_secret: str
) -> dict[str, Any]:
    """The RayService: Kiln's Serve application on a head and one worker group."""
    head_amounts = {"cpu": str(HEAD_CPU), "memory": f"{HEAD_MEMORY_MI}Mi"}
    head_ports = [
        {"name": "gcs-server", "containerPort": GCS_PORT},
        {"name": "dashboard", "containerPort": DASHBOARD_PORT},
        {"name": "client", "containerPort": CLIENT_PORT},
        {"name": "serve", "containerPort": SERVE_PORT},
    ]
    head = {
        # The head runs GCS, the dashboard, Serve's controller and a proxy; replicas go
        # to the workers (num-cpus 0 keeps Ray from placing them here).
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "serviceType": "ClusterIP",
        "enableIngress": False,
        "template": _ray_pod(
            name,
            image,
            "ray-head",
            {"requests": dict(head_amounts), "limits": dict(head_amounts)},
            head_ports,
            store_secret,
        ),
    }
    worker = {
        "groupName": "workers",
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 1,
        "rayStartParams": {},
        "template": _ray_pod(
            name,
            image,
            "ray-worker",
            worker_resources(project),
            [{"name": "serve", "containerPort": SERVE_PORT}],
            store_secret,
        ),
    }
    serve_yaml = yaml.safe_dump(serve_config(project), sort_keys=False)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(
            name, name, "serve", namespace, annotations={"ray.io/overwrite-container-cmd": "true"}
        ),
        "spec": {
            "serveConfigV2": serve_yaml,
            "rayClusterConfig": {
                "rayVersion": version,
                "enableInTreeAutoscaling": False,
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def control_plane(
    project: Any, name: str, image: str, namespace: str | None, store_secret: str
) -> list[dict[str, Any]]:
    """The Kiln control plane's Deployment and Service (PostgreSQL as the store)."""
    cp_name = f"{name}-kiln"
    selector = labels(name, "control-plane")
    volumes, mounts = _scratch(shm=False)
    command = [
        "kiln",
        "server",
        "run",
        "--home",
        KILN_HOME,
        "--host",
        "0.0.0.0",
        "--port",
        str(CONTROL_PORTS["http"]),
        "--management-port",
        str(CONTROL_PORTS["management"]),
        "--metrics-port",
        str(CONTROL_PORTS["metrics"]),
    ]
    container = {
        "name": "kiln",
        "image": image,
        "command": command,
        "ports": [{"name": p, "containerPort": n} for p, n in CONTROL_PORTS.items()],
        "env": _env(store_secret),
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": CONTROL_PORTS["http"]},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": CONTROL_PORTS["http"]},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cp_name, name, "control-plane", namespace),
        "spec": {
            "replicas": 1,
            # One control plane per store at a time: the old one stops before the new starts.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": dict(selector)},
                "spec": {
                    "securityContext": _pod_security(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cp_name, name, "control-plane", namespace),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": p, "port": CONTROL_PORTS[p], "targetPort": p, "protocol": "TCP"}
                for p in SERVICE_PORTS
            ],
        },
    }
    return [deployment, service]


def network_policy(name: str, namespace: str | None) -> dict[str, Any]:
    """Ray's pods take Serve traffic from anyone, everything else only from inside."""
    ray_pods = {"matchLabels": labels(name, "ray")}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"{name}-ray", name, "ray", namespace),
        "spec": {
            "podSelector": ray_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                # Serve's HTTP proxy on every node: what the serve Service forwards to.
                {"ports": [{"protocol": "TCP", "port": SERVE_PORT}]},
                # The cluster's own pods and Kiln's control plane: every port.
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchLabels": {
                                    "app.kubernetes.io/name": "kiln",
                                    "app.kubernetes.io/instance": name,
                                }
                            }
                        }
                    ]
                },
                # The KubeRay operator reads Serve's status from the dashboard.
                {
                    "from": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {
                                "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
                            },
                        }
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": DASHBOARD_PORT},
                        {"protocol": "TCP", "port": DASHBOARD_AGENT_PORT},
                    ],
                },
            ],
        },
    }


def manifests(
    project: Any,
    image: str,
    namespace: str | None = None,
    store_secret: str = "kiln-store",
    version: str | None = None,
) -> list[dict[str, Any]]:
    """Every object `kiln export kuberay` writes, in the order `kubectl apply` wants."""
    problem = image_problem(image)
    if problem:
        raise ExportError(problem)
    name = instance_name(project)
    return [
        rayservice(project, name, image, namespace, version or ray_version(), store_secret),
        *control_plane(project, name, image, namespace, store_secret),
        network_policy(name, namespace),
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, as a person would write them,
    and no anchors: a reader (or kubectl diff) sees every value where it applies."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, keys in the order written above."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
