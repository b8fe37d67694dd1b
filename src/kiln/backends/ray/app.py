"""`build_app`: a Kiln project as one Ray Serve application (import path
"kiln.backends.ray.app:build_app", what a Serve config file or KubeRay's
serveConfigV2 names; args as `options.application_config` writes them).

One `KilnReplica` deployment per API version, named by `options.deployment_name`
(so a config file's per-deployment overrides find them), bound into the
`KilnIngress` deployment, which gets their handles.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from kiln.backends.ray.cluster_ingress import REPLICA_DEPLOYMENT, KilnClusterIngress
from kiln.backends.ray.ingress import KilnIngress
from kiln.backends.ray.options import deployment_name, deployment_options, ingress_options
from kiln.backends.ray.replica import KilnReplica
from kiln.config import load_project


def build_app(args: dict[str, Any]) -> Application:
    """args: `project_dir` (where the project lies on every node), `config_file`
    (optional, relative to it), `sandbox` ("auto", "on" or "off"; default "auto"),
    `store_url` (default $KILN_STATE_URL; given: API keys, shared quotas and metering
    against that store), `owner` (optional: the user whose namespace the APIs are in,
    served at /<owner>/<api> as on `kiln server`), `ingress_replicas` (default 1)."""
    project_dir = str(args["project_dir"])
    config_file = args.get("config_file")
    sandbox = str(args.get("sandbox", "auto"))
    project = load_project(project_dir, config_file)
    handles: dict[str, Any] = {}
    for api in project.apis:
        name = deployment_name(api)
        handles[name] = KilnReplica.options(  # type: ignore[attr-defined]  # a serve.deployment
            name=name, **deployment_options(api)
        ).bind(project_dir, config_file, api.name, api.version, sandbox)
    options = {**ingress_options(), "num_replicas": int(args.get("ingress_replicas", 1))}
    ingress = KilnIngress.options(**options)  # type: ignore[attr-defined]
    store_url = args.get("store_url") or os.environ.get("KILN_STATE_URL") or None
    return ingress.bind(handles, project_dir, config_file, store_url, args.get("owner"))


def build_replica_app(args: dict[str, Any]) -> Application:
    """One API version of one revision, as a `kiln server --backend ray` deploys it
    (backends/ray/cluster.py): a lone `KilnReplica` deployment named "api", its project
    being the application's runtime_env working_dir. args: `spec` (replica.spec_args),
    `env` (the worker's declared environment), `sandbox` and `expose_errors`."""
    return KilnReplica.options(name=REPLICA_DEPLOYMENT).bind(  # type: ignore[attr-defined]
        "",
        None,
        str(args["spec"]["name"]),
        args["spec"].get("version"),
        str(args.get("sandbox", "auto")),
        spec=args["spec"],
        env=dict(args.get("env") or {}),
        expose_errors=bool(args.get("expose_errors", False)),
    )


def build_cluster_ingress(args: dict[str, Any]) -> Application:
    """The cluster's inference app (`KilnClusterIngress`); the APIs it routes come as its
    `user_config`, so a deploy reconfigures it rather than restarting it. args: `store_url`."""
    return KilnClusterIngress.bind(args.get("store_url"))  # type: ignore[attr-defined]
