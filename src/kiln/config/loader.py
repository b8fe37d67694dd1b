"""Finding and loading kiln.yaml (or cortex.yaml) into a validated Project.

Loading is all-or-nothing and happens before anything listens: every
problem in the file is collected with its file, line, field and fix, and
raised together as one ConfigError.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from kiln.config.checks import Entry, cross_check, resolve_endpoints, resolve_paths
from kiln.config.errors import ConfigError, ConfigIssue, FieldProblem
from kiln.config.hub_project import hub_config_file, hub_document, is_hub_config
from kiln.config.policy import LOCAL, ConfigPolicy, env_name_problem
from kiln.config.project import Project
from kiln.config.schema import ApiSpec, AsyncApiSpec, BatchApiSpec, Deployment
from kiln.config.source import Document, read_file, read_yaml
from kiln.config.torchserve import apply_torchserve
from kiln.config.traffic import TrafficSplitterSpec, apply_splitters, check_traffic
from kiln.quantities import type_name

CONFIG_NAMES: tuple[str, ...] = ("kiln.yaml", "cortex.yaml", "kiln.yml", "cortex.yml")
KINDS: dict[str, type[BaseModel]] = {
    "api": ApiSpec,
    "RealtimeAPI": ApiSpec,
    "AsyncAPI": AsyncApiSpec,
    "BatchAPI": BatchApiSpec,
    "TrafficSplitter": TrafficSplitterSpec,
    "deployment": Deployment,
}
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "dict": "a mapping (key: value lines)",
    "model": "a mapping (key: value lines)",
    "list": "a list",
}


def find_config_file(project_dir: str | Path, config_file: str | None = None) -> Path:
    """The config to load: ``config_file`` (relative to project_dir) if given,
    else kiln.yaml, else cortex.yaml (so Cortex projects deploy unchanged)."""
    project_dir = Path(project_dir)
    if config_file:
        p = Path(config_file)
        p = p if p.is_absolute() else project_dir / p
        if not p.is_file():
            raise ConfigError(
                [
                    ConfigIssue(
                        str(config_file),
                        None,
                        "",
                        f"config file not found: {p.absolute()}",
                        "check the -f path; a relative path is read from the project folder",
                    )
                ]
            )
        return p.absolute()
    if not project_dir.is_dir():
        raise ConfigError(
            [
                ConfigIssue(
                    str(project_dir),
                    None,
                    "",
                    f"project folder not found: {project_dir.absolute()}",
                    "pass the folder that holds kiln.yaml",
                )
            ]
        )
    for name in CONFIG_NAMES:
        if (project_dir / name).is_file():
            return (project_dir / name).absolute()
    hub = hub_config_file(project_dir)  # a CellStrat Hub project folder, deployed as it is
    if hub is not None:
        return hub
    raise ConfigError(
        [
            ConfigIssue(
                str(project_dir),
                None,
                "",
                f"no kiln.yaml or cortex.yaml in {project_dir.absolute()}",
                "create one (`kiln init` writes a starter; a CellStrat Hub project has "
                "hub_config.json) or name the file with -f FILE",
            )
        ]
    )


def _suggest(word: str, choices: list[str]) -> str | None:
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return match[0] if match else None


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for did-you-mean)."""
    current: type[BaseModel] = cls
    for part in loc:
        info = current.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        candidates = [info.annotation, *get_args(info.annotation)]
        nxt = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nxt:
            return None
        current = nxt[0]
    return current


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _translate(cls: type[BaseModel], err: Any) -> tuple[tuple[Any, ...], str, str]:
    """One pydantic error -> (loc, message, fix), in words a YAML author uses."""
    loc: tuple[Any, ...] = tuple(err["loc"])
    kind: str = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if isinstance(ctx.get("error"), FieldProblem):
        problem: FieldProblem = ctx["error"]
        if problem.field:
            loc += tuple(problem.field.split("."))
        return loc, problem.message, problem.fix
    given = f"{value!r}"[:80] + f" ({type_name(value)})"
    if kind == "extra_forbidden":
        owner = _model_at(cls, loc[:-1])
        allowed = [f for f in owner.model_fields if f != "kind"] if owner else []
        guess = _suggest(str(loc[-1]), allowed) if allowed else None
        fix = (
            f"did you mean '{guess}'?"
            if guess
            else (
                f"remove it; allowed fields here: {', '.join(allowed)}" if allowed else "remove it"
            )
        )
        return loc, "unknown field", fix
    if kind == "missing":
        return loc, "missing required field", f"add `{loc[-1]}: ...`"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        guess = _suggest(
            str(value), [e.strip("' ") for e in expected.replace(" or ", ",").split(",")]
        )
        fix = f"did you mean '{guess}'?" if guess else f"use one of {expected}"
        return loc, f"expected one of {expected}, got {given}", fix
    base = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing", "_from_float")) and base in _EXPECTED:
        want = _EXPECTED[base]
        if base == "model":
            owner = _model_at(cls, loc)
            fields = ", ".join(owner.model_fields) if owner else ""
            return (
                loc,
                f"expected {want}, got {given}",
                f"write it as a block with fields: {fields}",
            )
        return loc, f"expected {want}, got {given}", f"set {loc[-1] if loc else 'it'} to {want}"
    message = err["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else kind
    return loc, f"{message}, got {given}", "change the value as described"


class _Collector:
    """Turns problems into ConfigIssues with file, line and resource names."""

    def __init__(self, display: str, doc: Document) -> None:
        self.display, self.doc = display, doc
        self.subjects: dict[int, str] = {}
        self.found: list[tuple[tuple[Any, ...], ConfigIssue]] = []
        self.variables: set[int] = set()  # ids of unset-${VAR} issues

    def line(self, path: tuple[Any, ...]) -> int | None:
        for n in range(len(path), 0, -1):
            if path[:n] in self.doc.lines:
                return self.doc.lines[path[:n]]
        return None

    def add(
        self,
        path: tuple[Any, ...],
        message: str,
        fix: str,
        line: int | None = None,
        *,
        variable: bool = False,
    ) -> None:
        subject = self.subjects.get(path[0], f"resource #{path[0] + 1}") if path else ""
        field = _dotted(path[1:])
        if line is None:
            line = self.line(path)
        issue = ConfigIssue(self.display, line, field, message, fix, subject)
        if variable:
            self.variables.add(id(issue))
        self.found.append((path, issue))

    def issues(self) -> list[ConfigIssue]:
        """Every issue, minus the ones caused by an unset variable already reported."""
        env = self.doc.env_paths
        out = []
        for path, issue in self.found:
            caused = any(path[: len(e)] == e for e in env)
            if caused and id(issue) not in self.variables:
                continue
            out.append(issue)
        return sorted(out, key=lambda i: (i.line is None, i.line or 0))


def _subject(kind: str, item: dict[str, Any], index: int) -> str:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return f"resource #{index + 1}"
    label = {"api": "api", "RealtimeAPI": "api"}.get(kind, kind if kind in KINDS else "resource")
    version = item.get("version")
    return f"{label} '{name}'" + (f" version {version}" if version is not None else "")


def load_project(
    project_dir: str | Path = ".",
    config_file: str | None = None,
    *,
    check_files: bool = True,
    env: Mapping[str, str] | None = None,
    policy: ConfigPolicy | None = None,
    dotenv: Mapping[str, str] | None = None,
) -> Project:
    """Load, validate and resolve a project's config; raise one ConfigError listing
    every problem. ``check_files=False`` skips existence checks (for scaffolds and tests).

    ``policy`` (default ``LOCAL``) says what the file may reach (see
    :mod:`kiln.config.policy`); ``env`` feeds ``${VAR}`` substitution (default: the
    process environment and ``dotenv`` under ``LOCAL``, else ``dotenv`` alone), with
    each resource's ``env:`` layered over it. ``dotenv`` is the project's ``.env`` as
    its workers get it (``api.worker_env``); under ``USER`` its names are checked too.
    """
    policy = policy or LOCAL
    if env is None:
        env = {**os.environ, **(dotenv or {})} if policy is LOCAL else dict(dotenv or {})
    path = find_config_file(project_dir, config_file)
    base = Path(project_dir).absolute()
    rel = os.path.relpath(path, base)
    display = str(path) if rel.startswith("..") else rel
    try:
        text = read_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    display, None, "", f"cannot read the file: {exc}", "save it as UTF-8 text"
                )
            ]
        ) from None
    doc = hub_document(path, text) if is_hub_config(path) else read_yaml(text, env, policy.unset)
    col = _Collector(display, doc)
    if doc.data is None:
        for raw in doc.issues:
            col.add(raw.path, raw.message, raw.fix, raw.line, variable=raw.variable)
        raise ConfigError(col.issues())
    items = doc.data
    if not isinstance(items, list):
        fix = (
            "start each resource with '- ', e.g. '- kind: api'"
            if isinstance(items, dict)
            else "write a list of resources, each starting with '- kind:'"
        )
        col.add((), f"the top level must be a list of resources, got {type_name(items)}", fix, 1)
        raise ConfigError(col.issues())
    for i, item in enumerate(items):
        if isinstance(item, dict):
            col.subjects[i] = _subject(str(item.get("kind")), item, i)
    for raw in doc.issues:
        col.add(raw.path, raw.message, raw.fix, raw.line, variable=raw.variable)

    deployments: list[tuple[int, Deployment]] = []
    splitters: list[tuple[int, TrafficSplitterSpec]] = []
    entries: list[Entry] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            col.add(
                (i,),
                f"each resource must be a mapping, got {type_name(item)}",
                "write `- kind: api` followed by indented `key: value` lines",
            )
            continue
        kind = item.get("kind")
        if kind is None:
            col.add(
                (i,),
                "missing required field kind",
                "add `kind: api` (or AsyncAPI, BatchAPI, deployment)",
            )
            continue
        cls = KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            guess = _suggest(str(kind), list(KINDS))
            col.add(
                (i, "kind"),
                f"unknown kind {kind!r}",
                f"did you mean '{guess}'?" if guess else f"use one of {', '.join(KINDS)}",
            )
            continue
        try:
            spec = cls.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                loc, message, fix = _translate(cls, err)
                col.add((i, *loc), message, fix)
            continue
        if isinstance(spec, Deployment):
            deployments.append((i, spec))
        elif isinstance(spec, TrafficSplitterSpec):
            splitters.append((i, spec))
        else:
            entries.append((i, spec))  # type: ignore[arg-type]

    for i, _ in deployments[1:]:
        col.add(
            (i, "kind"),
            "more than one kind: deployment resource",
            "keep a single deployment resource (it names the whole project)",
        )
    deployment_name = deployments[0][1].name if deployments else None
    defaults = deployments[0][1].env if deployments else {}
    for _, spec in entries:
        spec.env = {**defaults, **spec.env}  # the deployment's env: are defaults
        spec._dotenv = dict(dotenv or {})
    if policy.check_dotenv_names:
        for name in dotenv or {}:
            problem = env_name_problem(name)
            if problem is not None:
                col.found.append(((), ConfigIssue(".env", None, "", *problem)))

    def report(index: int, field: str, message: str, fix: str) -> None:
        spec = dict(entries)[index]
        field = spec.aliases.get(field, field)
        col.add((index, *field.split(".")), message, fix)

    def report_splitter(index: int, field: str, message: str, fix: str) -> None:
        col.add((index, *field.split(".")), message, fix)

    root = path.parent
    line_of = lambda i: doc.lines.get((i,))  # noqa: E731
    for i, spec in entries:
        resolve_paths(i, spec, root, check_files, report, confine=policy.confine_paths)
        apply_torchserve(i, spec, report)
    apply_splitters(splitters, entries, report, report_splitter, line_of)
    resolve_endpoints(entries, deployment_name)
    cross_check(entries, report, line_of)
    check_traffic(entries, report, line_of)
    issues = col.issues()
    if issues:
        raise ConfigError(issues)
    return Project(
        root=root,
        config_file=path,
        deployment_name=deployment_name,
        apis=[s for _, s in entries if isinstance(s, ApiSpec)],
        batch_apis=[s for _, s in entries if isinstance(s, BatchApiSpec)],
        dotenv=dict(dotenv or {}),
    )
