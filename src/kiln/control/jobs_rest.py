"""Batch jobs on the management port (what `kiln jobs` and `kiln logs API JOB` call).

| route | what |
| --- | --- |
| `POST /apis/{name}/jobs?dryRun=` | submit a job (same body as `POST {endpoint}`) |
| `GET /apis/{name}/jobs` | the API's jobs, newest first |
| `GET /apis/{name}/jobs/{job_id}` | status, metrics, worker counts, progress, ETA |
| `DELETE /apis/{name}/jobs/{job_id}` | stop the job |
| `GET /apis/{name}/jobs/{job_id}/failed` | dead-lettered batches with their errors |
| `GET /apis/{name}/jobs/{job_id}/logs?follow=&tail=` | the job's log, JSON lines |

The work is in `kiln.batch.manager.JobManager` (the server's `jobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.control.log_tail import tail_lines
from kiln.errors import InvalidInput, NotFound, Unavailable

JOB_ROUTES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("post", "/apis/{name}/jobs", "Submit a batch job (Cortex's job spec)", ("dryRun",)),
    ("get", "/apis/{name}/jobs", "A batch API's jobs, newest first", ("limit",)),
    ("get", "/apis/{name}/jobs/{job_id}", "A job's status, progress and ETA", ()),
    ("delete", "/apis/{name}/jobs/{job_id}", "Stop a job", ()),
    ("get", "/apis/{name}/jobs/{job_id}/failed", "A job's dead-lettered batches", ()),
    ("get", "/apis/{name}/jobs/{job_id}/logs", "A job's log as JSON lines", ("follow", "tail")),
)


def job_handlers(server: Any) -> dict[tuple[str, str], Callable[[Request], Any]]:
    routes = JobRoutes(server)
    return {
        ("post", "/apis/{name}/jobs"): routes.submit,
        ("get", "/apis/{name}/jobs"): routes.list,
        ("get", "/apis/{name}/jobs/{job_id}"): routes.get,
        ("delete", "/apis/{name}/jobs/{job_id}"): routes.stop,
        ("get", "/apis/{name}/jobs/{job_id}/failed"): routes.failed,
        ("get", "/apis/{name}/jobs/{job_id}/logs"): routes.logs,
    }


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


class JobRoutes:
    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def jobs(self) -> Any:
        if self.server.jobs is None:
            raise Unavailable("the server is still starting; retry in a moment", retry_after=1)
        return self.server.jobs

    async def submit(self, request: Request) -> Response:
        name = request.path_params["name"]
        limit = self.jobs.limits(name).max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise InvalidInput(
                f"the job submission is {declared} bytes, over the request limit of {limit} "
                f"bytes (jobs.max_request_bytes)"
            )
        body = await request.body()
        return JSONResponse(await self.jobs.submit(name, body, dry=_flag(request, "dryRun")))

    async def list(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise InvalidInput("limit must be a whole number, e.g. limit=20") from None
        return JSONResponse(await self.jobs.list(request.path_params["name"], limit))

    async def get(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(await self.jobs.get(p["name"], p["job_id"]))

    async def stop(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(await self.jobs.stop(p["name"], p["job_id"]))

    async def failed(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(await self.jobs.failed(p["name"], p["job_id"]))

    def _flush_job_log(self, job_id: str) -> None:
        # A running job buffers its log (flushed each watch tick): read what it has so far.
        run = self.jobs.runs.get(job_id)
        if run is not None:
            run.log.flush()

    async def logs(self, request: Request) -> Response:
        name, job_id = request.path_params["name"], request.path_params["job_id"]
        if not await self.jobs.job_exists(name, job_id):
            raise NotFound(f"batch API '{name}' has no job '{job_id}'; `kiln jobs list {name}`")
        try:
            tail = int(request.query_params.get("tail", "1000"))
        except ValueError:
            raise InvalidInput("tail must be a whole number of lines, e.g. tail=100") from None
        path = self.jobs.log_path(name, job_id)
        return StreamingResponse(
            tail_lines(
                path,
                tail,
                _flag(request, "follow"),
                request,
                flush=lambda: self._flush_job_log(job_id),
                ended=lambda: job_id not in self.jobs.runs,
            ),
            media_type="application/x-ndjson",
        )


def job_routes(server: Any) -> list[Any]:
    """The job routes as Starlette routes (added to the management port by rest.py)."""
    from starlette.routing import Route

    handlers = job_handlers(server)
    return [
        Route(path, handlers[(method, path)], methods=[method.upper()])
        for method, path, _, _ in JOB_ROUTES
    ]
