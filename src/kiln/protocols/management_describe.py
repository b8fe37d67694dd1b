"""TorchServe's describe shape for one model version (`GET /models/{m}[/{v}|/all]`).

Kept apart from the management routes: it is the one place that knows the
answer's field names, including `customizedMetadata`, which asks the model's
own handler (`describe_handle`) through its worker.
"""

from __future__ import annotations

from typing import Any

import orjson

from kiln.protocols.http import new_request_id
from kiln.protocols.management_http import _worker
from kiln.serving.router import ApiGroup, ServedApi
from kiln.serving.types import InferenceRequest


def describe(served: ServedApi, group: ApiGroup, record: Any) -> dict[str, Any]:
    """`record`: the version's ModelRecord (url, worker bounds set through the API)."""
    api = served.api
    configured = max(1, api.compute.init_replicas or api.compute.min_replicas or 1)
    minimum = record.min_workers if record.min_workers is not None else configured
    maximum = record.max_workers
    if maximum is None:
        maximum = max(minimum, getattr(served, "max_replicas", api.compute.max_replicas))
    queue = served.queue
    return {
        "modelName": served.name,
        "modelVersion": served.version,
        "modelUrl": record.url,
        "runtime": api.runtime,
        "minWorkers": minimum,
        "maxWorkers": maximum,
        "batchSize": served.max_batch_size,
        "maxBatchDelay": round(served.batch_delay_s * 1000),
        "loadedAtStartup": record.loaded_at_startup,
        "endpoint": api.endpoint,
        "status": served.state,
        "isDefault": group.default is served,
        "workers": [_worker(slot) for slot in served.slots],
        "jobQueueStatus": {
            "remainingCapacity": max(0, queue.max_size - len(queue)),
            "pendingRequests": len(queue),
        },
    }


async def customized_metadata(served: ServedApi) -> Any:
    """What a TorchServe handler's `describe_handle()` returns (TorchServe calls the
    handler with the request header `describe: True`); None for other runtimes, whose
    handlers have no such hook."""
    if served.api.runtime != "torchserve":
        return None
    asked = InferenceRequest(
        api=served.name,
        version=served.version,
        request_id=new_request_id(),
        body=b"",
        content_type="application/octet-stream",
        protocol="torchserve",
        headers={"describe": "True"},
        kind="raw",
    )
    answer = await served.predict(asked)
    text = answer.body.decode("utf-8", "replace")
    if answer.content_type.startswith("application/json"):
        try:
            return orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            return text
    return text
