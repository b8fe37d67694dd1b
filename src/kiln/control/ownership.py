"""Who may deploy what: users' namespaces, their plan's API bound, and paths they own.

A user's deployment `shop` is `<user>.shop` in the store and its APIs are
`<user>.<api>`, served at `/<user>/<api>`; the admin's keep their names. Mixed
into `DeploymentManager` (it reads `server` and `owner`).
"""

from __future__ import annotations

from typing import Any

from kiln.errors import Conflict, Forbidden


class OwnershipMixin:
    server: Any
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
    if deployment and "." in deployment:
        return deployment.split(".", 1)[0]
    return None


def _in_namespace(api: Any, user: str) -> Any:
    return api.model_copy(update={"name": f"{user}.{api.name}", "endpoint": f"/{user}/{api.name}"})
