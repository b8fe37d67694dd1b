"""kiln.yaml -> Ray Serve options: one place that decides how an API version runs on Ray.

Plain dicts in the shape of a Serve config file (``ServeDeploySchema``), so the
same mapping feeds ``build_app`` on a live cluster (``.options(**...)``) and the
KubeRay exporter's ``serveConfigV2`` offline. Importing this module does not
import Ray: the exporter runs where Ray is not installed.

What maps to what (docs/architecture.md, "Backends"):

- ``compute.cpu/gpu/mem`` -> ``ray_actor_options`` ``num_cpus``/``num_gpus``/``memory``
  (the replica actor reserves what its Kiln worker subprocess will use);
- ``compute.min/max/init_replicas`` -> ``autoscaling_config`` ``min/max/initial_replicas``,
  or a fixed ``num_replicas`` when min == max;
- ``autoscaling.target_replica_concurrency`` -> ``target_ongoing_requests``,
  ``max_replica_concurrency`` -> ``max_ongoing_requests``, the stabilization periods
  -> ``upscale_delay_s``/``downscale_delay_s``, ``window`` -> ``look_back_period_s``,
  ``idle_timeout`` -> ``downscale_to_zero_delay_s``; ``min_replicas: 0`` is Serve's
  scale to zero (Serve's handle holds requests while a replica starts).

On Ray one call to a replica is one batch made by Kiln's batcher in the ingress, so
Serve's "ongoing requests" count batches, not rows.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kiln.config.project import Project
from kiln.config.schema import ApiSpec

INGRESS = "KilnIngress"
"""The ingress deployment's name (the class name, as Serve names it by default)."""

IMPORT_PATH = "kiln.backends.ray.app:build_app"

# A dead worker must be noticed in seconds, not Serve's default 10 s period.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0
# Kiln's default when kiln.yaml sets no concurrency target (Serve's own default is 2).
DEFAULT_TARGET_ONGOING = 2.0
# The ingress is async and queues in Kiln's batcher; Serve's limit must not be the bottleneck.
INGRESS_MAX_ONGOING = 10_000
INGRESS_CPUS = 0.1
SERVE_METRICS_INTERVAL_S = 10.0  # Serve's default (its setting is deprecated)


def deployment_name(api: ApiSpec) -> str:
    """The Serve deployment of one API version: ``iris``, or ``iris@2`` for version "2".

    ``@`` cannot occur in an API name (a DNS label) nor in a version, so no two API
    versions of a project share a name (``iris-v2`` could be the API ``iris-v2``), and
    Serve reserves only ``#``."""
    return api.name if api.version is None else f"{api.name}@{api.version}"


def actor_options(api: ApiSpec) -> dict[str, Any]:
    """``ray_actor_options`` from ``compute``: what Ray reserves on a node for one replica."""
    compute = api.compute
    options: dict[str, Any] = {"num_cpus": float(compute.cpu)}
    if compute.gpu:
        options["num_gpus"] = float(compute.gpu)
    if compute.mem:
        options["memory"] = int(compute.mem)
    return options


def autoscaling_config(api: ApiSpec) -> dict[str, Any] | None:
    """Serve's ``autoscaling_config``, or None when ``compute`` fixes the replica count."""
    compute, scaling = api.compute, api.autoscaling
    if compute.min_replicas == compute.max_replicas:
        return None
    config: dict[str, Any] = {
        "min_replicas": compute.min_replicas,
        "max_replicas": compute.max_replicas,
        "initial_replicas": compute.init_replicas,
        "target_ongoing_requests": float(
            scaling.target_replica_concurrency or DEFAULT_TARGET_ONGOING
        ),
        "upscale_delay_s": float(scaling.upscale_stabilization_period),
        "downscale_delay_s": float(scaling.downscale_stabilization_period),
        # Serve needs more than its metrics interval (10 s; a window of 10 s warns now and
        # will be an error): the smallest window it takes is just over it.
        "look_back_period_s": max(float(scaling.window), SERVE_METRICS_INTERVAL_S + 1.0),
    }
    if compute.min_replicas == 0 and scaling.idle_timeout is not None:
        config["downscale_to_zero_delay_s"] = float(scaling.idle_timeout)
    return config


def deployment_options(api: ApiSpec) -> dict[str, Any]:
    """Everything Serve needs to run one API version's ``KilnReplica`` deployment.

    Usable both as ``KilnReplica.options(**deployment_options(api))`` and as a
    deployment entry of a Serve config file (with ``name`` added)."""
    options: dict[str, Any] = {
        "ray_actor_options": actor_options(api),
        "max_ongoing_requests": int(api.autoscaling.max_replica_concurrency),
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        # A replica stops its worker after the batches in flight (Replica.stop).
        "graceful_shutdown_timeout_s": float(api.serving.response_timeout_s),
    }
    scaling = autoscaling_config(api)
    if scaling is None:
        options["num_replicas"] = api.compute.min_replicas
    else:
        options["autoscaling_config"] = scaling
    return options


def ingress_options() -> dict[str, Any]:
    """The ``KilnIngress`` deployment: Kiln's inference app, light on CPU, one replica."""
    return {
        "num_replicas": 1,
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
        "ray_actor_options": {"num_cpus": INGRESS_CPUS},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }


def application_config(project: Project, project_dir_in_image: str, name: str = "kiln") -> dict:
    """One Serve application, as an entry of a Serve config file's ``applications``.

    ``project_dir_in_image`` is where the project lies on every node (the image that
    ``kiln build`` makes); the config file keeps its name relative to the project."""
    try:
        config_file = str(PurePosixPath(project.config_file.relative_to(project.root)))
    except ValueError:
        config_file = project.config_file.name
    deployments: list[dict[str, Any]] = [{"name": INGRESS, **ingress_options()}]
    for api in project.apis:
        deployments.append({"name": deployment_name(api), **deployment_options(api)})
    return {
        "name": name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": {"project_dir": project_dir_in_image, "config_file": config_file},
        "deployments": deployments,
    }
