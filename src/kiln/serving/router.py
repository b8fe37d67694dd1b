"""Which API version answers a request: APIs by endpoint and name, and their versions.

A `Registry` maps endpoints and names to the versions behind them and picks
the default version (the one marked `default: true`, else the highest).
"""

from __future__ import annotations

import re
from typing import Any

from kiln.errors import NotFound
from kiln.serving.served import ServedApi

__all__ = ["ApiGroup", "Registry", "ServedApi"]


def _version_key(version: str | None) -> tuple[Any, ...]:
    if version is None:
        return ()
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-]", version))


class ApiGroup:
    """All versions of one API name, served at one endpoint."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.versions: dict[str | None, ServedApi] = {}

    @property
    def default(self) -> ServedApi:
        marked = [v for v in self.versions.values() if v.api.default]
        if marked:
            return marked[0]
        return max(self.versions.values(), key=lambda v: _version_key(v.version))

    def get(self, version: str | None) -> ServedApi:
        if version is None:
            return self.default
        served = self.versions.get(version)
        if served is None:
            known = ", ".join(sorted(str(v) for v in self.versions if v is not None)) or "none"
            raise NotFound(f"API '{self.name}' has no version '{version}' (versions: {known})")
        return served


class Registry:
    """The APIs this server answers for."""

    def __init__(self) -> None:
        self.groups: dict[str, ApiGroup] = {}
        self._by_endpoint: dict[str, ApiGroup] = {}

    def add(self, served: ServedApi) -> None:
        group = self.groups.get(served.name)
        if group is None:
            group = self.groups[served.name] = ApiGroup(served.name, served.api.endpoint)
            self._by_endpoint[served.api.endpoint.rstrip("/") or "/"] = group
        group.versions[served.version] = served

    def by_endpoint(self, path: str) -> ApiGroup | None:
        return self._by_endpoint.get(path.rstrip("/") or "/")

    def by_name(self, name: str) -> ApiGroup:
        group = self.groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; GET /apis lists the APIs this server has")
        return group

    def all(self) -> list[ServedApi]:
        return [served for group in self.groups.values() for served in group.versions.values()]
