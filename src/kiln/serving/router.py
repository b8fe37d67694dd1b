"""Which API version answers a request: APIs by endpoint and name, and their versions.

A `Registry` maps endpoints and names to the versions behind them and picks
the default version (the one marked `default: true`, else the highest). What
one caller may see of it is a `RegistryView`, asked for explicitly with
`Registry.view(caller)`: no ambient state says who is asking.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from kiln.errors import NotFound
from kiln.serving.served import ServedApi

__all__ = ["ApiGroup", "Caller", "Registry", "RegistryView", "ServedApi"]


def _version_key(version: str | None) -> tuple[Any, ...]:
    if version is None:
        return ()
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-]", version))


_UNSET: Any = object()


class Caller(Protocol):
    """Who is asking (an authenticated API key): which APIs it may see."""

    sees_all: bool
    scope_key: Any  # equal for callers that see the same APIs (the view cache key)

    def sees(self, name: str) -> bool: ...

    def owns(self, name: str) -> bool: ...


class ApiGroup:
    """All versions of one API name, served at one endpoint.

    The default version (what unversioned routes of every protocol get) is the
    one chosen at runtime with `set_default` (the management API's
    `set-default`), else the entry marked `default: true`, else the highest.
    Switching it is one attribute assignment on the event loop, so a request
    sees either the old default or the new one, never a gap.
    """

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.versions: dict[str | None, ServedApi] = {}
        self._chosen: Any = _UNSET

    @property
    def default(self) -> ServedApi:
        if self._chosen is not _UNSET and self._chosen in self.versions:
            return self.versions[self._chosen]
        return self.versions[self.configured_default()]

    @property
    def default_version(self) -> str | None:
        """The version unversioned requests get."""
        return self.default.version

    def configured_default(self) -> str | None:
        """The default from kiln.yaml: `default: true`, else the highest version."""
        marked = [v.version for v in self.versions.values() if v.api.default]
        if marked:
            return marked[0]
        return max(self.versions, key=_version_key)

    def set_default(self, version: str | None) -> ServedApi:
        """Make `version` the one unversioned requests get; NotFound if it is not served."""
        served = self.get(version) if version is not None else self.versions.get(None)
        if served is None:
            raise NotFound(f"API '{self.name}' has no unversioned entry to make the default")
        self._chosen = served.version
        return served

    def get(self, version: str | None) -> ServedApi:
        if version is None:
            return self.default
        served = self.versions.get(version)
        if served is None:
            known = ", ".join(sorted(str(v) for v in self.versions if v is not None)) or "none"
            raise NotFound(f"API '{self.name}' has no version '{version}' (versions: {known})")
        return served


class Registry:
    """Every API this server answers for, whoever asks (the server's own bookkeeping).

    Requests see it through `view(caller)`: with API keys on, a caller's view
    leaves out another user's API and one its key is not scoped to, so every
    protocol answers for it exactly as for an API that does not exist. Without
    a caller (auth off, health routes) the view is the registry itself. Views
    are cached per principal scope and dropped whenever the registry changes.
    """

    def __init__(self) -> None:
        self._groups: dict[str, ApiGroup] = {}
        self._by_endpoint: dict[str, ApiGroup] = {}
        self._views: dict[Any, RegistryView] = {}
        # Called after every change: route tables derived from the registry (the AsyncAPI
        # endpoints, kiln.control.asyncs) rebuild then, never per request.
        self.listeners: list[Callable[[], None]] = []

    @property
    def groups(self) -> dict[str, ApiGroup]:
        """Name -> versions, every API (read-only use)."""
        return self._groups

    def view(self, caller: Caller | None) -> Registry | RegistryView:
        """What `caller` may see: the registry itself for no caller or one that sees all."""
        if caller is None or caller.sees_all:
            return self
        view = self._views.get(caller.scope_key)
        if view is None:
            view = self._views[caller.scope_key] = RegistryView(self, caller)
        return view

    def _changed(self) -> None:
        self._views.clear()
        for listener in self.listeners:
            listener()

    def add(self, served: ServedApi) -> None:
        group = self._groups.get(served.name)
        if group is None:
            group = self._groups[served.name] = ApiGroup(served.name, served.api.endpoint)
            self._by_endpoint[served.api.endpoint.rstrip("/") or "/"] = group
        group.versions[served.version] = served
        self._changed()

    def swap(self, new: ServedApi) -> ServedApi | None:
        """Put `new` in place of the entry with its name and version, in one step.

        Used by rolling updates: there is no moment at which the API is missing.
        Returns the entry it replaced (the caller drains and stops it), if any.
        """
        group = self._groups.get(new.name)
        old = group.versions.get(new.version) if group is not None else None
        if group is not None and group.endpoint != new.api.endpoint:
            if len(group.versions) == 1 and old is not None:
                # The endpoint moved: re-key the group.
                self._by_endpoint.pop(group.endpoint.rstrip("/") or "/", None)
                group.endpoint = new.api.endpoint
                self._by_endpoint[new.api.endpoint.rstrip("/") or "/"] = group
        if group is None:
            self.add(new)
        else:
            group.versions[new.version] = new
        if old is not None:
            old.successor = new
        self._changed()
        return old

    def remove(self, name: str, version: str | None) -> ServedApi:
        """Take one version out of routing (the caller stops it); the API goes with its last."""
        group = self.by_name(name)
        served = group.get(version) if version is not None else group.versions.get(None)
        if served is None:
            raise NotFound(f"API '{name}' has no unversioned entry; name the version to remove")
        del group.versions[served.version]
        if group._chosen is not _UNSET and group._chosen == served.version:
            group._chosen = _UNSET
        if not group.versions:
            del self._groups[name]
            self._by_endpoint.pop(group.endpoint.rstrip("/") or "/", None)
        self._changed()
        return served

    def by_endpoint(self, path: str) -> ApiGroup | None:
        return self._by_endpoint.get(path.rstrip("/") or "/")

    def by_name(self, name: str) -> ApiGroup:
        group = self.groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; GET /apis lists the APIs this server has")
        return group

    def all(self) -> list[ServedApi]:
        return [served for group in self.groups.values() for served in group.versions.values()]

    def all_unfiltered(self) -> list[ServedApi]:
        """Every API whoever asks (kept for callers that say so explicitly)."""
        return self.all()


class RegistryView:
    """The registry as one caller sees it: the same lookups, limited to `caller.sees`.

    Built once per principal scope (cached by the registry until it changes), so a
    request pays one dictionary lookup for it.
    """

    __slots__ = ("_registry", "_caller", "groups")

    def __init__(self, registry: Registry, caller: Caller) -> None:
        self._registry = registry
        self._caller = caller
        self.groups: dict[str, ApiGroup] = {
            n: g for n, g in registry.groups.items() if caller.sees(n)
        }

    def by_endpoint(self, path: str) -> ApiGroup | None:
        group = self._registry.by_endpoint(path)
        if group is None or not self._caller.sees(group.name):
            return None
        return group

    def by_name(self, name: str) -> ApiGroup:
        group = self.groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; GET /apis lists the APIs this server has")
        return group

    def all(self) -> list[ServedApi]:
        return [served for group in self.groups.values() for served in group.versions.values()]
