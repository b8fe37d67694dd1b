"""`KILN_HOME/server.yaml`: the server's options, kept between starts.

`kiln server start|run` reads it, lets flags given on the command line
override it, and saves the result, so a restart keeps its ports, its
`--pass-env` patterns and its edge limits without repeating them. Keys are the
long flag names in snake_case, plus `edge:` (see `kiln.protocols.edge`). These
are the operator's settings: never part of a tenant's kiln.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

FILE_NAME = "server.yaml"
# key -> (type check, what to write)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "host": (str, "an interface, e.g. 127.0.0.1"),
    "port": (int, "a port number (0: a free one)"),
    "management_port": (int, "a port number (0: a free one)"),
    "metrics_port": (int, "a port number (0: a free one)"),
    "grpc_port": (int, "a port number (0: a free one)"),
    "grpc_tls_cert": (str, "the path of a PEM certificate (chain) for the gRPC port"),
    "grpc_tls_key": (str, "the path of the PEM private key of grpc_tls_cert"),
    "otlp_endpoint": (str, "the URL of an OTLP collector, e.g. http://127.0.0.1:4318"),
    "otlp_protocol": (str, "http/protobuf or grpc"),
    "auth": (bool, "true or false"),
    "unsafe_no_sandbox": (bool, "true or false"),
    "pass_env": (list, "a list of glob patterns, e.g. ['AWS_*']"),
    "edge": (dict, "a mapping of edge limits (docs/config.md)"),
    "webhook_allow": (
        list,
        "a list of CIDR blocks AsyncAPI webhooks may call, e.g. ['10.0.0.0/8']",
    ),
    "backend": (str, "local or ray"),
    "ray_address": (str, "auto, or the Ray head's HOST:PORT"),
    "ray_http_port": (int, "a port number for Ray Serve's HTTP proxy"),
    "store": (str, "a state store URL, e.g. postgresql+psycopg://kiln:PASSWORD@db/kiln"),
    "busy_poll_us": (int, "an int from 0 to 100000 (microseconds; 0: polling off)"),
}


class ServerFileError(ValueError):
    """server.yaml is not valid; the message names the file, the key and the fix."""


def path_of(home: Path) -> Path:
    return home / FILE_NAME


def load(home: Path) -> dict[str, Any]:
    """The saved options ({} when there is no file), checked key by key."""
    path = path_of(home)
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ServerFileError(f"{path}: cannot be read as YAML ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ServerFileError(f"{path}: must be a mapping of option: value; fix or delete it")
    for key, value in data.items():
        if key not in KEYS:
            raise ServerFileError(
                f"{path}: unknown option '{key}'; known: {', '.join(KEYS)}. Remove it."
            )
        kind, what = KEYS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ServerFileError(f"{path}: '{key}' must be {what}, not {value!r}")
    if "webhook_allow" in data:
        from kiln.control.webhooks import parse_allow

        try:
            parse_allow([str(v) for v in data["webhook_allow"]])
        except ValueError as exc:
            raise ServerFileError(f"{path}: webhook_allow: {exc}") from None
    if ("grpc_tls_cert" in data) != ("grpc_tls_key" in data):
        raise ServerFileError(
            f"{path}: grpc_tls_cert and grpc_tls_key go together: set both, or neither"
        )
    if "edge" in data:
        from kiln.protocols.edge import EdgeLimits

        try:
            EdgeLimits.from_mapping(data["edge"])
        except (TypeError, ValueError) as exc:
            raise ServerFileError(f"{path}: {exc}") from None
    return data


def save(home: Path, options: dict[str, Any]) -> None:
    """Write the options atomically (mode 0600: it may name what the server passes on)."""
    home.mkdir(parents=True, exist_ok=True)
    path = path_of(home)
    tmp = path.with_suffix(".tmp")
    header = "# Kiln server options (kiln server start|run flags override and update them)\n"
    body = yaml.safe_dump({k: options[k] for k in KEYS if k in options}, sort_keys=False)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(header + body)
    os.replace(tmp, path)


def otlp_problem(endpoint: str | None, protocol: str | None) -> str | None:
    """What is wrong with an OTLP endpoint and protocol (the --otlp-* flags or their
    server.yaml keys), naming the flag; None when tracing can use them (or none is set)."""
    if endpoint is None and protocol is None:
        return None
    from kiln.serving.tracing import TracingError, settings_from_env

    try:
        settings_from_env(endpoint or "http://127.0.0.1:4318", protocol, {})
    except TracingError as exc:
        flag = "--otlp-protocol" if "protocol" in str(exc) else "--otlp-endpoint"
        return f"{flag}: {exc}"
    return None
