"""The limits Kiln is compared with: a bare Starlette app on the server stack Kiln uses.

uvicorn + uvloop + httptools, one process, access log off. Routes:

  POST /fixed  a fixed JSON answer as long as tiny's answer (the body is read, not parsed):
               the ceiling of the HTTP stack
  POST /tiny   JSON body -> numpy -> onnxruntime (tiny.onnx, 1 thread) inline -> JSON
  POST /mlp    the same with mlp.onnx

A bare JSON list is one instance (the answer is the output row), a list of lists a batch.

Run: .venv/bin/python bench/bare_app.py PORT [MODEL_DIR]
     (MODEL_DIR holds tiny.onnx and mlp.onnx; built into a temp dir when left out)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).parent))
from models import build_all, sample_body, session  # noqa: E402


def _infer(sess, body: bytes) -> bytes:
    x = np.asarray(orjson.loads(body), dtype=np.float32)
    single = x.ndim == 1
    y = sess.run(None, {"x": x[None] if single else x})[0]
    return orjson.dumps(y[0] if single else y, option=orjson.OPT_SERIALIZE_NUMPY)


def make_app(model_dir: Path) -> Starlette:
    sessions = {name: session(model_dir / f"{name}.onnx") for name in ("tiny", "mlp")}
    fixed = _infer(sessions["tiny"], sample_body("tiny"))

    async def fixed_route(request: Request) -> Response:
        await request.body()
        return Response(fixed, media_type="application/json")

    def model_route(name: str):
        sess = sessions[name]

        async def route(request: Request) -> Response:
            try:
                out = _infer(sess, await request.body())
            except Exception as exc:  # a bad body: answer 400, as a server would
                return Response(orjson.dumps({"error": str(exc)}), 400)
            return Response(out, media_type="application/json")

        return route

    return Starlette(
        routes=[
            Route("/fixed", fixed_route, methods=["POST"]),
            Route("/tiny", model_route("tiny"), methods=["POST"]),
            Route("/mlp", model_route("mlp"), methods=["POST"]),
        ]
    )


def main() -> None:
    port = int(sys.argv[1])
    if len(sys.argv) > 2:
        app = make_app(Path(sys.argv[2]))
    else:
        tmp = tempfile.mkdtemp(prefix="kiln-bare-")
        build_all(Path(tmp))
        app = make_app(Path(tmp))
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
