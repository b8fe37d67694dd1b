"""Batch API routes on the inference port (Cortex's contract).

| route | what |
| --- | --- |
| `POST {endpoint}` (`?dryRun=true`) | submit a job: its spec at once; or the files it would read |
| `GET {endpoint}?jobID=ID`, `GET {endpoint}/ID` | the job's status, progress and ETA |
| `GET {endpoint}` | the API's jobs, newest first |
| `DELETE {endpoint}?jobID=ID`, `DELETE {endpoint}/ID` | stop the job |

The adapter knows HTTP only: the job manager it is given (the server's
`kiln.batch.manager.JobManager`) validates, stores and runs jobs. A submission
is an inference call like any other: the data plane admits it (quota, rate
limit) before its body is read and meters it once. Errors use the native shape.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import InvalidInput, KilnError, MethodNotAllowed, PayloadTooLarge
from kiln.protocols.errors import native_error
from kiln.protocols.http import Request, Send, send_json
from kiln.serving.data_plane import Call, DataPlane


def _not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> MethodNotAllowed:
    err = MethodNotAllowed(f"{method} is not allowed on {path}; use {' or '.join(allowed)}")
    err.allow = allowed  # type: ignore[attr-defined]
    return err


class BatchRoutes:
    """Routes every batch API's endpoint to the job manager."""

    protocol = "batch"

    def __init__(self, plane: DataPlane, jobs: Any) -> None:
        self.plane = plane
        self.jobs = jobs

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        if not self.jobs.endpoints:
            return None
        matched = self.jobs.match(request.path)
        if matched is None:
            return None
        name, job_id = matched

        async def handler(req: Request, send: Send, call: Call) -> int:
            return await self.handle(req, send, call, name, job_id)

        return handler, name

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return native_error(err, request_id)

    async def handle(
        self, request: Request, send: Send, call: Call, name: str, job_id: str | None
    ) -> int:
        job_id = job_id or request.query.get("jobID") or request.query.get("job_id")
        method = request.method
        if method == "POST" and job_id is None:
            self.plane.admit(call, name)
            limit = self.jobs.limits(name).max_request_bytes
            try:
                body = await request.body(limit)
            except PayloadTooLarge:
                raise InvalidInput(
                    f"the job submission is over the request limit of {limit} bytes "
                    f"(jobs.max_request_bytes); put the items in files and submit "
                    f"delimited_files or file_path_lister instead of item_list"
                ) from None
            caller = call.caller
            result = await self.jobs.submit(
                name,
                body,
                dry=request.flag("dryRun"),
                allow_local=caller is None or caller.sees_all,
            )
        elif method == "GET":
            if job_id is None:
                result = await self.jobs.list(name)
            else:
                result = await self.jobs.get(name, job_id)
        elif method == "DELETE" and job_id is not None:
            result = await self.jobs.stop(name, job_id)
        else:
            allowed = ("GET", "DELETE") if job_id else ("POST", "GET")
            raise _not_allowed(method, request.path, allowed)
        await send_json(send, 200, result, request.request_id)
        return 200
