"""A dedicated unprivileged uid per tenant, when the server runs as root.

The admin's deployments run as BASE_UID, each user's as the next free uid in
order of first use; the map lives in `KILN_HOME/sandbox/uids.json` so a
tenant keeps its uid across restarts (files a worker leaves in its scratch are
never another tenant's). No /etc/passwd entry is needed: workers get HOME and
never look themselves up.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

BASE_UID = 200000


def tenant_of(name: str | None) -> str:
    """The user a deployment or API belongs to (`alice.shop` -> alice); "" for the admin's.

    A user's names are namespaced `<user>.<name>` inside the server (control/ownership.py).
    """
    if name and "." in name:
        return name.split(".", 1)[0]
    return ""


def uid_for(home: Path, tenant: str) -> int:
    """The uid of `tenant` ("" for the admin), allocated on first use."""
    if not tenant:
        return BASE_UID
    folder = home / "sandbox"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "uids.json"
    with open(folder / "uids.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            table = {}
        if tenant not in table:
            table[tenant] = max([BASE_UID, *table.values()]) + 1
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
        return table[tenant]
