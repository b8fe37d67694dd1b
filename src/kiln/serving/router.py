"""Which API version answers a request: APIs by endpoint and name, and their versions.

A `Registry` maps endpoints and names to the versions behind them and picks
the default version (the one marked `default: true`, else the highest). What
one caller may see of it is a `RegistryView`, asked for explicitly with
`Registry.view(caller)`: no ambient state says who is asking.

Which version an unversioned inference request gets is decided in one place,
`ApiGroup.route`: the default, or a draw over the API's traffic split
(serving/traffic.py) when it has one. Every protocol reaches it through
`DataPlane.resolve` / `DataPlane.pick`.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kiln.errors import NotFound
from kiln.serving.served import ServedApi
from kiln.serving.traffic import Routing

log = logging.getLogger("kiln.traffic")

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


class TrafficStore(Protocol):
    """Where runtime splits are kept (control plane: the state store's traffic table)."""

    def get_traffic(self, api: str) -> dict[str, int] | None: ...

    def set_traffic(self, api: str, weights: dict[str, int] | None) -> None: ...


class ApiGroup:
    """All versions of one API name, served at one endpoint.

    The default version (what metadata routes and `kiln get` call the API's version)
    is the one chosen at runtime with `set_default` (the management API's
    `set-default`), else the version leading the traffic split, else the entry
    marked `default: true`, else the highest. Unversioned inference requests go
    through `route`: the default, or a draw over the split when one is in force.
    Switching either is one attribute assignment on the event loop, so a request
    sees the old choice or the new one, never a gap.

    The split in force is the runtime one (`override`: `kiln traffic`, PUT
    /apis/{name}/traffic, set-default; persisted by the control plane) when every
    version it gives weight to is served, else the kiln.yaml one (`traffic:` on
    one entry, or a `kind: TrafficSplitter`); `traffic_note` says why a runtime
    split is not in force.
    """

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.versions: dict[str | None, ServedApi] = {}
        self._chosen: Any = _UNSET
        self.override: dict[str, int] | None = None
        self.routing: Routing | None = None  # None: no split and no shadow (the hot path)
        self.traffic_note: str | None = None
        self.rng: random.Random | None = None  # tests seed it; None: a fresh Random
        self._lead: str | None = None  # the split's leading version, while one is in force
        self._split_info: Routing | None = None  # the split in force, shown by `traffic()`

    @property
    def default(self) -> ServedApi:
        if self._chosen is not _UNSET and self._chosen in self.versions:
            return self.versions[self._chosen]
        lead = self._lead
        if lead is not None:
            served = self.versions.get(lead)
            if served is not None:
                return served
        versions = self.versions
        if len(versions) == 1:  # the usual case, asked per request: the one there is
            return next(iter(versions.values()))
        return versions[self.configured_default()]

    def route(self, version: str | None, headers: Mapping[str, str] | None = None) -> ServedApi:
        """The version an inference request goes to: `version` when it names one, else
        a draw over the traffic split (sticky on its header's value), else the default.

        `headers` are the request's headers with lower-case names (only read when the
        API has a split with `traffic_sticky_header`)."""
        if version is not None:
            return self.get(version)
        routing = self.routing
        if routing is None:
            return self.default
        chosen = routing.choose(headers)
        served = self.versions.get(chosen) if chosen is not None else None
        return served if served is not None else self.default

    def shadow_target(self, chosen: ServedApi) -> ServedApi | None:
        """The version an unversioned request routed to `chosen` is mirrored to (None:
        not this time). Never `chosen` itself: a version answering for real is not also
        its own shadow."""
        routing = self.routing
        if routing is None or not routing.mirrors():
            return None
        shadow = self.versions.get(routing.shadow_version)
        return None if shadow is None or shadow is chosen else shadow

    # ----- the split -----------------------------------------------------------------
    def configured_traffic(self) -> tuple[dict[str, int] | None, str | None, Any]:
        """(weights, sticky header, shadow block) from the served versions' kiln.yaml."""
        weights: dict[str, int] | None = None
        sticky: str | None = None
        shadow: Any = None
        for served in self.versions.values():
            api = served.api
            weights = getattr(api, "traffic", None) or weights
            sticky = getattr(api, "traffic_sticky_header", None) or sticky
            shadow = getattr(api, "shadow", None) or shadow
        return (dict(weights) if weights else None), sticky, shadow

    def refresh_traffic(self) -> None:
        """Rebuild `routing` from the versions served now and the runtime split (called
        whenever either changes; never per request)."""
        configured, sticky, shadow_block = self.configured_traffic()
        weights, source, note = configured, "kiln.yaml", None
        override = self.override
        if override is not None:
            missing = sorted(v for v, w in override.items() if w > 0 and v not in self.versions)
            if missing:
                note = (
                    f"the runtime split {override} gives weight to version(s) "
                    f"{', '.join(missing)}, which this API does not serve now; using the "
                    f"kiln.yaml split ({configured or 'none: the default version'})"
                )
            else:
                weights, source = override, "runtime"
        if weights is not None:
            weights = {v: w for v, w in weights.items() if v in self.versions}
            if sum(weights.values()) <= 0:
                weights = None
        shadow = None
        if shadow_block is not None and shadow_block.version in self.versions:
            shadow = (shadow_block.version, float(shadow_block.percent))
        routing = None
        if weights is not None or shadow is not None:
            routing = Routing(
                weights, source=source, sticky_header=sticky, shadow=shadow, rng=self.rng
            )
        was_runtime = self.routing is not None and self.routing.source == "runtime"
        if note is not None and was_runtime:
            log.warning("API '%s': %s", self.name, note)
        self.traffic_note = note
        self._lead = routing.lead if routing is not None else None
        # Only shadow or a one-version split left: `route` needs no draw then.
        self.routing = routing if routing is not None and (routing.splits or shadow) else None
        self._split_info = routing

    def traffic(self) -> dict[str, Any] | None:
        """The split in force as GET /apis/{name} shows it (None: no split, no shadow)."""
        routing = self._split_info
        if routing is None:
            return None
        info = routing.describe()
        if self.traffic_note:
            info["note"] = self.traffic_note
        return info

    def set_traffic(self, weights: dict[str, int] | None) -> None:
        """Put a runtime split in force (None: back to kiln.yaml's). The caller checked
        the weights and persists them."""
        self.override = dict(weights) if weights is not None else None
        self._chosen = _UNSET
        self.refresh_traffic()

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

    def set_default(self, version: str | None, reset_split: bool = True) -> ServedApi:
        """Make `version` the one unversioned requests get; NotFound if it is not served.

        With a traffic split in force (and `reset_split`) it becomes a runtime split of
        100% on `version` (`override`, which the caller persists), as TorchServe's
        set-default means; registering a version pins the default without touching it."""
        served = self.get(version) if version is not None else self.versions.get(None)
        if served is None:
            raise NotFound(f"API '{self.name}' has no unversioned entry to make the default")
        if reset_split and self._lead is not None and served.version is not None:
            self.override = {served.version: 100}
            self.refresh_traffic()
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
        # Runtime traffic splits survive restarts there (control/traffic.py); None: none kept.
        self.traffic_store: TrafficStore | None = None

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
            if self.traffic_store is not None:
                group.override = self.traffic_store.get_traffic(served.name)
        group.versions[served.version] = served
        group.refresh_traffic()
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
            group.refresh_traffic()
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
        else:
            group.refresh_traffic()
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
