"""Traffic splitting between versions: ``traffic:``, ``shadow:``, ``traffic_sticky_header:``
on one entry of a versioned API, and Cortex's ``kind: TrafficSplitter`` as another way
to write the same.

A TrafficSplitter ``name: iris`` with ``apis: [{name: "1", weight: 90}, {name: "2",
weight: 10}]`` is the split of the API ``iris`` (declared as ``kind: api`` entries
with ``version: "1"`` and ``version: "2"``): each ``apis[].name`` is a version of
the API the splitter is named after (``iris:2`` is accepted too). Cortex split
between separately named APIs; Kiln splits between versions of one, which keeps
every protocol's versioned routes (``/predictions/iris/2``) pointing at one of them.
An entry with ``shadow: true`` becomes ``shadow: {version, percent: 100}``.

The server reads these settings from the loaded entries (serving/router.py
``ApiGroup.configured_traffic``); this module only checks them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kiln.config.blocks import Networking, _Block, check_endpoint, check_name
from kiln.config.errors import FieldProblem

__all__ = [
    "ShadowBlock",
    "SplitterApi",
    "TrafficSplitterSpec",
    "apply_splitters",
    "check_traffic",
    "parse_traffic",
]

_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_SETTINGS = ("traffic", "shadow", "traffic_sticky_header")


def parse_traffic(value: Any) -> dict[str, int] | None:
    """A ``traffic:`` mapping as version -> weight; FieldProblem when it is not one."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldProblem(
            f"traffic must map versions to weights, got {value!r}",
            'write it as traffic: {"1": 90, "2": 10}',
        )
    weights: dict[str, int] = {}
    for version, weight in value.items():
        key = str(version)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise FieldProblem(
                f"the weight of version {key!r} is {weight!r}: weights are whole numbers >= 0",
                'e.g. traffic: {"1": 90, "2": 10} (any positive total; shares are weight/total)',
            )
        weights[key] = weight
    if not weights or sum(weights.values()) <= 0:
        raise FieldProblem(
            "the traffic weights add up to 0: no version would get a request",
            "give at least one version a positive weight",
        )
    return weights


def check_header(value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    if not _HEADER.match(value):
        raise FieldProblem(
            f"{value!r} is not an HTTP header name",
            "use letters, digits and '-', e.g. traffic_sticky_header: X-User-Id",
        )
    return value.lower()


class ShadowBlock(_Block):
    """``shadow:``: mirror ``percent`` of the unversioned requests to ``version``."""

    version: str
    percent: float = Field(default=100.0, gt=0, le=100)

    _version = field_validator("version", mode="before")(
        lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    )


class SplitterApi(_Block):
    """One ``apis:`` entry of a TrafficSplitter: a version of the API and its weight."""

    name: str
    weight: int = Field(default=0, ge=0)
    shadow: bool = False

    _name = field_validator("name", mode="before")(
        lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    )


class TrafficSplitterSpec(_Block):
    """Cortex's ``kind: TrafficSplitter``, mapped onto the versions of the API ``name``."""

    kind: Literal["TrafficSplitter"] = "TrafficSplitter"
    name: str
    endpoint: str | None = None
    networking: Networking | None = None
    apis: list[SplitterApi]

    _check_name = field_validator("name")(lambda v: check_name(v))
    _endpoint = field_validator("endpoint")(lambda v: None if v is None else check_endpoint(v))

    @model_validator(mode="after")
    def _shape(self) -> TrafficSplitterSpec:
        if self.networking is not None and self.networking.endpoint is not None:
            if self.endpoint is not None:
                raise FieldProblem(
                    "endpoint is set twice (endpoint and networking.endpoint)",
                    "keep only one of them",
                    field="networking.endpoint",
                )
            self.endpoint = check_endpoint(self.networking.endpoint)
        self.networking = None
        shadows = [a for a in self.apis if a.shadow]
        if len(shadows) > 1:
            raise FieldProblem(
                f"more than one shadow api ({', '.join(a.name for a in shadows)})",
                "mark at most one entry of apis with shadow: true",
                field="apis",
            )
        if sum(a.weight for a in self.apis if not a.shadow) <= 0:
            raise FieldProblem(
                "the weights of apis add up to 0: no version would get a request",
                "give at least one entry a positive weight",
                field="apis",
            )
        return self

    def version_of(self, entry: SplitterApi) -> str:
        """The version an ``apis[].name`` means: ``2`` or ``<name>:2``."""
        prefix = f"{self.name}:"
        return entry.name[len(prefix) :] if entry.name.startswith(prefix) else entry.name


Report = Callable[[int, str, str, str], None]


def apply_splitters(
    splitters: list[tuple[int, TrafficSplitterSpec]],
    entries: list[tuple[int, Any]],
    report: Report,
    report_splitter: Report,
    line_of: Callable[[int], int | None],
) -> None:
    """Write each TrafficSplitter onto its API's lowest-versioned entry as ``traffic:``
    (and ``shadow:``), so the rest of Kiln sees one shape. Runs before endpoints get
    their defaults: a splitter's endpoint becomes the API's."""
    seen: dict[str, int] = {}
    for i, splitter in splitters:
        name = splitter.name
        if name in seen:
            report_splitter(
                i,
                "name",
                f"a second TrafficSplitter for '{name}' (also {_at(line_of, seen[name])})",
                "keep one TrafficSplitter per API",
            )
            continue
        seen[name] = i
        versions = [(j, s) for j, s in entries if _splittable(s) and s.name == name]
        if not versions or not all(s.version for _, s in versions):
            report_splitter(
                i,
                "name",
                f"TrafficSplitter '{name}' needs an API '{name}' with versions to split "
                f"between (Kiln splits between versions of one API)",
                f'declare `- kind: api` entries with name: {name} and version: "1", '
                f'version: "2", ...; apis[].name then names those versions',
            )
            continue
        known = {str(s.version) for _, s in versions}
        for j, s in versions:
            for setting in ("traffic", "shadow"):  # a sticky header may go with a splitter
                if getattr(s, setting) is not None:
                    report(
                        j,
                        setting,
                        f"'{name}' has a TrafficSplitter ({_at(line_of, i)}) and {setting}: on "
                        f"this entry: the split would be written twice",
                        f"keep one of them: remove {setting}: here, or the TrafficSplitter",
                    )
        weights: dict[str, int] = {}
        shadow: ShadowBlock | None = None
        for k, entry in enumerate(splitter.apis):
            version = splitter.version_of(entry)
            if version not in known:
                report_splitter(
                    i,
                    f"apis.{k}.name",
                    f"'{entry.name}' is not a version of API '{name}' (versions: "
                    f"{', '.join(sorted(v for v in known if v))})",
                    f'name one of its versions, e.g. name: "{sorted(known)[0]}"',
                )
                continue
            if entry.shadow:
                shadow = ShadowBlock(version=version, percent=100)
            else:
                weights[version] = weights.get(version, 0) + entry.weight
        first = min(versions, key=lambda pair: pair[0])[1]
        first.traffic = weights or None
        first.shadow = shadow
        if splitter.endpoint is not None:
            for j, s in versions:
                if s.endpoint is None:
                    s.endpoint = splitter.endpoint
                elif s.endpoint != splitter.endpoint:
                    report(
                        j,
                        "endpoint",
                        f"endpoint '{s.endpoint}' differs from its TrafficSplitter's "
                        f"'{splitter.endpoint}' ({_at(line_of, i)})",
                        "set the endpoint in one place: on the TrafficSplitter or the API",
                    )


def _splittable(spec: Any) -> bool:
    """A realtime (or async) API entry: the kinds with versions and `traffic:`."""
    return hasattr(spec, "traffic")


def _at(line_of: Callable[[int], int | None], i: int) -> str:
    line = line_of(i)
    return f"line {line}" if line is not None else f"resource #{i + 1}"


def check_traffic(
    entries: list[tuple[int, Any]], report: Report, line_of: Callable[[int], int | None]
) -> None:
    """Each API sets traffic/shadow/sticky header on at most one entry, naming versions it
    has; a split needs versions."""
    by_name: dict[str, list[tuple[int, Any]]] = {}
    for i, spec in entries:
        if _splittable(spec):
            by_name.setdefault(spec.name, []).append((i, spec))
    for name, group in by_name.items():
        known = sorted(s.version for _, s in group if s.version)
        listed = ", ".join(known) or "none"
        for setting in _SETTINGS:
            setters = [(i, s) for i, s in group if getattr(s, setting) is not None]
            for i, s in setters[1:]:
                first_i, first = setters[0]
                report(
                    i,
                    setting,
                    f"{setting}: is set on two entries of '{name}' (version {first.version} at "
                    f"{_at(line_of, first_i)} and version {s.version} here); an API has one "
                    f"split",
                    f"keep {setting}: on one entry of '{name}' only (any one: it applies to "
                    f"all its versions) and remove it here",
                )
        for i, s in group:
            if s.traffic is None and s.shadow is None and s.traffic_sticky_header is None:
                continue
            if not known:
                report(
                    i,
                    "traffic" if s.traffic is not None else "shadow",
                    f"'{name}' has no versions to split between",
                    f"declare versions: entries named '{name}' with version: \"1\", "
                    f'version: "2", ...',
                )
                continue
            for version in s.traffic or {}:
                if version not in known:
                    report(
                        i,
                        "traffic",
                        f"traffic names version {version!r}, which '{name}' does not have "
                        f"(versions: {listed})",
                        "name only versions declared in this file",
                    )
            if s.shadow is not None and s.shadow.version not in known:
                report(
                    i,
                    "shadow.version",
                    f"shadow version {s.shadow.version!r} is not a version of '{name}' "
                    f"(versions: {listed})",
                    "name a version declared in this file",
                )
        sticky = [(i, s) for i, s in group if s.traffic_sticky_header is not None]
        if sticky and not any(s.traffic is not None for _, s in group):
            report(
                sticky[0][0],
                "traffic_sticky_header",
                f"traffic_sticky_header without a traffic: split on '{name}'",
                'add traffic: {"1": 90, "2": 10} (weights per version) or remove it',
            )
