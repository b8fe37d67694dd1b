"""Who may deploy what: users' namespaces, their plan's bounds, and paths they own.

A user's deployment `shop` is `<user>.shop` in the store and its APIs are
`<user>.<api>`, served at `/<user>/<api>`; the admin's keep their names. Mixed
into `DeploymentManager` (it reads `server` and `owner`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from kiln.errors import Conflict, Forbidden, InvalidInput
from kiln.sandbox.identity import tenant_of
from kiln.serving.caps import Cap, check_replicas, replica_caps


class OwnershipMixin:
    server: Any
    store: Any
    owner: dict[str, str]

    def _check_plan(self, user: str, project: Any) -> None:
        """A user's plan bounds how many APIs they may have (seed 003: 5 on `free`)."""
        quotas = self.server.quotas
        if quotas is None:
            return
        plan = quotas.plan_of(user)
        if plan.apis is None:
            return
        mine = {name for name, owner in self.owner.items() if user_of(owner) == user}
        wanted = mine | {api.name for api in project.apis} | {b.name for b in project.batch_apis}
        if len(wanted) > plan.apis:
            raise Forbidden(
                f"the '{plan.name}' plan allows {plan.apis} APIs and this deploy would make "
                f"{len(wanted)}; delete one (kiln delete API) or move to a bigger plan"
            )

    def _plan(self, user: str | None) -> Any:
        """The user's plan; None for the admin (never limited) or with accounts off."""
        quotas = self.server.quotas
        return None if quotas is None or user is None else quotas.plan_of(user)

    def _check_limits(self, principal: Any, project: Any) -> None:
        """Replica counts, memory and network a deploy asks for, against the caps (400/403).

        Run on the project as uploaded (before any plan default is applied): for
        everyone, kiln.yaml's min/init replicas and an explicit max_replicas above
        the machine's cap; for a user, also their plan's max_replicas,
        max_replica_mem and network_egress. A request over a cap is refused, never
        clamped.
        """
        user = None if principal is None or principal.is_admin else principal.user
        plan = self._plan(user)
        plan_caps = (
            [Cap(plan.max_replicas, f"the '{plan.name}' plan's max_replicas")]
            if plan is not None and plan.max_replicas is not None
            else []
        )
        for api in project.apis:
            compute = api.compute
            asked = {
                "compute.min_replicas": compute.min_replicas,
                "compute.init_replicas": compute.init_replicas or 0,
            }
            if "max_replicas" in compute.model_fields_set:
                asked["compute.max_replicas"] = compute.max_replicas
            check_replicas(api.name, asked, replica_caps(compute, plan_caps, own_max=False))
        if plan is None:
            return
        for batch in project.batch_apis:
            workers = batch.jobs.max_workers
            if plan.max_replicas is not None and "max_workers" in batch.jobs.model_fields_set:
                if workers > plan.max_replicas:
                    raise InvalidInput(
                        f"jobs.max_workers={workers} for BatchAPI '{batch.name}' is over the "
                        f"'{plan.name}' plan's max_replicas of {plan.max_replicas}; ask for at "
                        f"most {plan.max_replicas}"
                    )
        for resource in [*project.apis, *project.batch_apis]:
            mem = resource.compute.mem
            if plan.max_replica_mem is not None and mem is not None and mem > plan.max_replica_mem:
                raise InvalidInput(
                    f"compute.mem={mem / 2**20:g}Mi for '{resource.name}' is over the "
                    f"'{plan.name}' plan's max_replica_mem of {plan.max_replica_mem / 2**20:g}Mi; "
                    f"ask for at most {plan.max_replica_mem / 2**20:g}Mi or move to a bigger plan"
                )
        check_network(plan, project)

    def _drop_refused(self, deployment: str, digest: str, folder: Path) -> None:
        """A refused deploy leaves nothing on disk: its unpacked revision goes, unless a
        recorded revision (an earlier deploy of the same content) uses the folder."""
        if self.store.get_revision(deployment, digest) is not None:
            return
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the deployment's folder, if this was all it held

    def _check_user_paths(self, project: Any) -> None:
        """The admin's endpoints must not take a path that belongs to a user (/<user>/...)."""
        accounts = self.server.accounts
        if accounts is None:
            return
        for api in project.apis:
            first = api.endpoint.strip("/").split("/")[0]
            if first in accounts.users:
                raise Conflict(
                    f"API '{api.name}' would be served at {api.endpoint}, under the paths of "
                    f"user '{first}'; choose another endpoint or deployment name"
                )


def user_of(deployment: str | None) -> str | None:
    """The user a deployment belongs to (`alice.shop` -> alice); None for the admin's."""
    return tenant_of(deployment) or None


def check_network(plan: Any, project: Any) -> None:
    """Refuse (403) an API declaring `network: egress` when the plan does not allow it.

    `plan` None is the admin, who is never limited.
    """
    if plan is None or plan.network_egress:
        return
    for resource in [*project.apis, *project.batch_apis]:
        if getattr(resource, "network", "none") == "egress":
            raise Forbidden(
                f"'{resource.name}' declares `network: egress`, which the '{plan.name}' plan "
                f"does not allow (its network_egress is false); remove `network: egress` from "
                f"kiln.yaml, or ask the admin for a plan with network_egress: true"
            )


def _in_namespace(api: Any, user: str, plan: Any = None) -> Any:
    update = {"name": f"{user}.{api.name}", "endpoint": f"/{user}/{api.name}"}
    if plan is not None:
        update.update(_within_plan(api, plan))
    return api.model_copy(update=update)


def _within_plan(resource: Any, plan: Any) -> dict[str, Any]:
    """The plan's bounds applied to a user's API or BatchAPI (defaults, and restores).

    An explicit request over the plan was refused at deploy (`_check_limits`); what
    is clamped here is what the user left to the defaults (max_replicas 100, no
    compute.mem, jobs.max_workers 32), and a revision restored after the plan
    was tightened.
    """
    compute = resource.compute
    changes: dict[str, Any] = {}
    if plan.max_replica_mem is not None and (
        compute.mem is None or compute.mem > plan.max_replica_mem
    ):
        changes["mem"] = plan.max_replica_mem
    top = plan.max_replicas
    if top is not None and compute.max_replicas > top:
        changes["max_replicas"] = top
        changes["min_replicas"] = min(compute.min_replicas, top)
        changes["init_replicas"] = min(compute.init_replicas or 0, top)
    update: dict[str, Any] = {}
    if changes:
        update["compute"] = compute.model_copy(update=changes)
    jobs = getattr(resource, "jobs", None)
    if jobs is not None and top is not None and jobs.max_workers > top:
        update["jobs"] = jobs.model_copy(update={"max_workers": top})
    return update
