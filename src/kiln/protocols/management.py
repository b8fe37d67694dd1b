"""The management port (8081): TorchServe's management API over Kiln's registry.

Placeholder being completed under issue 3: for now it lists models.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def build_management_app(registry: Any, log: Any, options: Any = None) -> Starlette:
    async def list_models(request: Request) -> JSONResponse:
        models = [
            {"modelName": name, "modelUrl": group.endpoint}
            for name, group in registry.groups.items()
        ]
        return JSONResponse({"models": models})

    return Starlette(routes=[Route("/models", list_models, methods=["GET"])])
