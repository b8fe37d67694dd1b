"""Checks that need more than one resource, or the file system.

The schema validates one resource in isolation; here each API's paths are
made absolute (relative to the folder holding the config, like Cortex did),
files are checked to exist, endpoints get their defaults, and the APIs are
checked against each other (names, versions, endpoints, defaults). Problems
are handed to a ``report`` callback so the loader can attach lines to them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path

from kiln.config.blocks import OnnxBlock, PythonBlock, TensorflowBlock, TorchBlock
from kiln.config.schema import ApiSpec, BatchApiSpec, parse_handler_ref
from kiln.config.torchserve import TorchServeBlock
from kiln.errors import install_hint
from kiln.storage.errors import ModelUriError
from kiln.storage.uri import is_remote, parse_uri

Report = Callable[[int, str, str, str], None]
"""report(resource index, dotted field, message, fix)."""

Entry = tuple[int, ApiSpec | BatchApiSpec]

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CLIENTS = {
    "s3": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "http": ("aiohttp", "http"),
    "https": ("aiohttp", "http"),
    "hf": ("huggingface_hub", "hf"),
}


def _absolute(root: Path, value: str) -> str:
    if value.startswith("file://"):
        value = value[len("file://") :]
    p = Path(os.path.expanduser(value))
    return os.path.abspath(p if p.is_absolute() else root / p)


class _PathChecker:
    def __init__(
        self, index: int, root: Path, check_files: bool, report: Report, confine: bool = False
    ) -> None:
        self.index, self.root, self.check_files, self.report = index, root, check_files, report
        self.confine = confine

    def escapes(self, field: str, value: str) -> bool:
        """Under a user's policy: report a local path that is absolute or resolves (after
        following links) outside the project folder."""
        raw = value.removeprefix("file://")
        if field.endswith("python_path"):
            fix = "name a folder inside the project, relative to the folder holding kiln.yaml "
            fix += "(python_path: . is that folder), and deploy its files with the project"
        else:
            fix = "name a file inside the project, relative to the folder holding kiln.yaml "
            fix += f"(e.g. {field.rsplit('.', 1)[-1]}: {Path(raw).name or 'model.onnx'}), "
            fix += "and deploy the file with the project"
        if raw.startswith("~") or os.path.isabs(raw):
            self.report(
                self.index,
                field,
                f"absolute path {value!r}: a user's deployment may only use files inside "
                f"the deployed project",
                fix,
            )
            return True
        base = os.path.realpath(self.root)
        lexical = os.path.normpath(os.path.join(base, raw))
        real = os.path.realpath(lexical)
        for candidate, how in ((lexical, "leads"), (real, "is a link that leads")):
            if candidate != base and not candidate.startswith(base + os.sep):
                self.report(
                    self.index, field, f"path {value!r} {how} outside the deployed project", fix
                )
                return True
        return False

    def path(self, field: str, value: str, *, kind: str) -> str | None:
        """Resolve one path; kind is 'model' (file or dir), 'file' or 'dir'."""
        if kind == "model" and is_remote(value):
            return self.remote_model(field, value)
        if _REMOTE.match(value) and not value.startswith("file://"):
            fix = (
                "download the model and point `model` at the local file"
                if kind == "model"
                else f"copy it next to the config file and point `{field}` at the local file"
            )
            what = "model storage" if kind == "model" else "files"
            self.report(self.index, field, f"remote {what} is not supported yet ({value!r})", fix)
            return None
        if self.confine and self.escapes(field, value):
            return None
        resolved = _absolute(self.root, value)
        if self.check_files:
            p = Path(resolved)
            ok = {"model": p.exists(), "file": p.is_file(), "dir": p.is_dir()}[kind]
            if not ok:
                noun = {"model": "model path", "file": "file", "dir": "folder"}[kind]
                self.report(
                    self.index,
                    field,
                    f"{noun} not found: {resolved}",
                    f"check the path; relative paths are read from the folder holding "
                    f"the config file ({self.root})",
                )
        return resolved

    def remote_model(self, field: str, value: str) -> str | None:
        """A model URI is checked for form (and credentials written into it), not fetched:
        the worker downloads it at start. With check_files, its store's client must be
        installed, so a missing extra fails before anything listens."""
        try:
            uri = parse_uri(value)
        except ModelUriError as exc:
            self.report(self.index, field, exc.problem, exc.fix)
            return None
        if self.check_files and uri.scheme in _CLIENTS:
            module, extra = _CLIENTS[uri.scheme]
            if importlib.util.find_spec(module) is None:
                self.report(
                    self.index,
                    field,
                    f"{uri.scheme}:// model paths need the '{module}' package, "
                    f"which is not installed",
                    install_hint(extra),
                )
        return value

    def handler(self, field: str, value: str) -> str:
        file, _module, obj = parse_handler_ref(value)
        if file is None:  # module:Name is imported via python_path, nothing to resolve
            return value
        resolved = self.path(field, file, kind="file")
        if resolved is None:
            return value
        return f"{resolved}:{obj}" if obj else resolved


def resolve_paths(
    index: int,
    spec: ApiSpec | BatchApiSpec,
    root: Path,
    check_files: bool,
    report: Report,
    *,
    confine: bool = False,
) -> None:
    """Make every path of ``spec`` absolute and, if asked, check that it exists;
    with ``confine`` (a user's deployment) a local path must stay inside ``root``."""
    pc = _PathChecker(index, root, check_files, report, confine)
    spec.python_path = pc.path("python_path", spec.python_path or ".", kind="dir") or str(root)
    if isinstance(spec, BatchApiSpec) and spec.predictor is not None:
        pr = spec.predictor
        pr.path = pc.path("predictor.path", pr.path, kind="file") or pr.path
        if pr.model:
            pr.model = pc.path("predictor.model", pr.model, kind="model") or pr.model
        return
    rt = spec.runtime
    block = spec.runtime_block
    model = getattr(block, "model", None)
    if model:
        block.model = pc.path(f"{rt}.model", model, kind="model") or model
    elif rt not in ("python", "torchserve"):
        report(index, f"{rt}.model", "model path is empty", "set model: <path to the model>")
    if isinstance(block, OnnxBlock | TensorflowBlock) and block.request_handler:
        rh = block.request_handler
        block.request_handler = pc.path(f"{rt}.request_handler", rh, kind="file") or rh
    if isinstance(block, PythonBlock | TorchBlock | TorchServeBlock) and block.handler:
        block.handler = pc.handler(f"{rt}.handler", block.handler)


def resolve_endpoints(entries: list[Entry], deployment_name: str | None) -> None:
    """Default endpoint: ``/<deployment>/<name>`` with a deployment, else ``/<name>``."""
    for _, spec in entries:
        if spec.endpoint is None:
            prefix = f"/{deployment_name}" if deployment_name else ""
            spec.endpoint = f"{prefix}/{spec.name}"


def _subject(spec: ApiSpec | BatchApiSpec) -> str:
    if isinstance(spec, BatchApiSpec):
        return f"BatchAPI '{spec.name}'"
    return f"api '{spec.name}'" + (f" version {spec.version}" if spec.version else "")


def cross_check(entries: list[Entry], report: Report, line_of: Callable[[int], int | None]) -> None:
    """Names, versions, defaults and endpoints must not collide across resources."""

    def at(i: int) -> str:
        line = line_of(i)
        return f"line {line}" if line is not None else f"resource #{i + 1}"

    seen: dict[tuple[str, str | None], int] = {}
    kinds: dict[str, tuple[str, int]] = {}
    unversioned: dict[str, int] = {}
    versioned: dict[str, int] = {}
    defaults: dict[str, int] = {}
    endpoints: dict[str, tuple[ApiSpec | BatchApiSpec, int]] = {}
    for i, spec in entries:
        version = getattr(spec, "version", None)
        if spec.kind != kinds.setdefault(spec.name, (spec.kind, i))[0]:
            other = kinds[spec.name][1]
            report(
                i,
                "name",
                f"the name '{spec.name}' is already used by a {kinds[spec.name][0]} "
                f"resource ({at(other)})",
                "give each API a different name",
            )
            continue
        key = (spec.name, version)
        if key in seen:
            what = f"'{spec.name}' version {version}" if version else f"'{spec.name}'"
            report(
                i,
                "version" if version else "name",
                f"duplicate API {what}: already defined at {at(seen[key])}",
                f"give each entry named '{spec.name}' its own version, or remove one",
            )
            continue
        seen[key] = i
        if isinstance(spec, ApiSpec):
            (versioned if version else unversioned).setdefault(spec.name, i)
            if spec.name in versioned and spec.name in unversioned:
                report(
                    i,
                    "version",
                    f"'{spec.name}' has both versioned and unversioned entries "
                    f"({at(unversioned[spec.name])} has no version)",
                    f"give every entry named '{spec.name}' a version",
                )
            if spec.default:
                if spec.name in defaults:
                    report(
                        i,
                        "default",
                        f"more than one version of '{spec.name}' says default: true "
                        f"(also {at(defaults[spec.name])})",
                        "set default: true on one version only",
                    )
                else:
                    defaults[spec.name] = i
        assert spec.endpoint is not None
        owner = endpoints.get(spec.endpoint)
        if owner is None:
            endpoints[spec.endpoint] = (spec, i)
        elif owner[0].name != spec.name:
            report(
                i,
                "endpoint",
                f"endpoint '{spec.endpoint}' is already used by {_subject(owner[0])} "
                f"({at(owner[1])})",
                "set a different endpoint: for one of them (versions of one API share one)",
            )
    by_name: dict[str, tuple[str, int]] = {}
    for i, spec in entries:
        assert spec.endpoint is not None
        first = by_name.setdefault(spec.name, (spec.endpoint, i))
        if first[0] != spec.endpoint and isinstance(spec, ApiSpec):
            report(
                i,
                "endpoint",
                f"versions of '{spec.name}' use different endpoints "
                f"('{first[0]}' at {at(first[1])}, '{spec.endpoint}' here)",
                "give every version the same endpoint, or leave endpoint out",
            )
