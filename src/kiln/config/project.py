"""The loaded project: what ``load_project`` returns to the rest of Kiln."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kiln.config.schema import ApiSpec, BatchApiSpec


def _version_key(version: str | None) -> tuple[tuple[int, int | str], ...]:
    """Order versions naturally: "2" < "10", "1.9" < "1.10"; numbers before words."""
    if version is None:
        return ()
    parts = re.split(r"[._-]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


@dataclass
class Project:
    """Every resource of one config file, validated, with absolute paths."""

    root: Path
    config_file: Path
    deployment_name: str | None = None
    apis: list[ApiSpec] = field(default_factory=list)
    batch_apis: list[BatchApiSpec] = field(default_factory=list)
    dotenv: dict[str, str] = field(default_factory=dict)
    """The project's ``.env`` as its workers get it (empty under ``kiln serve``)."""

    def worker_env(self, api: ApiSpec | BatchApiSpec) -> dict[str, str]:
        """What an API's workers get from their deployment: the API's ``env:`` over the
        deployment's ``env:`` (merged into ``api.env`` at load) over the ``.env``."""
        return api.worker_env

    def versions(self, name: str) -> list[ApiSpec]:
        """All entries of API ``name``, lowest version first."""
        found = [a for a in self.apis if a.name == name]
        return sorted(found, key=lambda a: _version_key(a.version))

    def api(self, name: str, version: str | None = None) -> ApiSpec | None:
        """The API ``name`` at ``version``; without a version, the one unversioned
        routes use: the entry marked ``default: true``, else the highest version."""
        found = self.versions(name)
        if not found:
            return None
        if version is not None:
            return next((a for a in found if a.version == str(version)), None)
        return next((a for a in found if a.default), found[-1])

    def batch_api(self, name: str) -> BatchApiSpec | None:
        """The batch API called ``name``, if any."""
        return next((b for b in self.batch_apis if b.name == name), None)
