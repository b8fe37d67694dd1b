"""A small ASGI echo app served by Kiln's HTTP layer or by uvicorn, in its own process.

`python tests/edge_server.py kiln|uvicorn|uvicorn-edge [EdgeLimits fields as JSON]` binds
127.0.0.1:0, prints the port on its first line, and serves until SIGTERM.
The edge tests (tests/test_edge.py) drive it with raw sockets; the same app
on uvicorn is the oracle for the fuzz test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys


async def app(scope, receive, send) -> None:
    """Reads the whole body, answers its size; `/slow` answers after 0.3 s, `/stream` in pieces."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    body = json.dumps({"method": scope["method"], "size": size, "pid": os.getpid()}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    kind = sys.argv[1]
    limits = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    print(sock.getsockname()[1], flush=True)
    import uvloop

    if kind == "kiln":
        from kiln.protocols.edge import EdgeLimits
        from kiln.protocols.fast_http_server import FastHttpServer

        server = FastHttpServer(app, grace_s=2.0, limits=EdgeLimits(**limits))
    else:
        import uvicorn

        config = uvicorn.Config(
            app, http="httptools", lifespan="off", log_level="critical", access_log=False
        )
        if kind == "uvicorn-edge":  # uvicorn with the edge limits, as the management port runs
            from kiln.protocols.edge import EdgeLimits
            from kiln.protocols.edge_uvicorn import guard_uvicorn

            config = guard_uvicorn(config, EdgeLimits(**limits))
        server = uvicorn.Server(config)
        server.capture_signals = lambda: _nothing()  # type: ignore[method-assign]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: setattr(server, "should_exit", True))
        await server.serve(sockets=[sock])

    uvloop.run(run())


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
