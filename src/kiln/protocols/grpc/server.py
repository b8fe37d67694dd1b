"""The gRPC port: a grpc.aio server in the Kiln server's event loop.

It shares the registry and the data plane with the HTTP ports (one admission,
one metering, one error mapping), binds when the other ports bind (so
`--grpc-port 0` resolves and a busy port fails before anything loads), and
stops with them: `stop(grace)` lets RPCs in flight finish, then cancels the
rest. Besides Kiln's three services it registers gRPC health checking
(`grpc.health.v1.Health`: SERVING for "" and each service) and server
reflection (over Kiln's private descriptor pool, plus health and reflection
themselves). Handlers are generic (`grpc.method_handlers_generic_handler`) over
the classes of `messages.py`, so no `_pb2_grpc` module is generated or imported.

SO_REUSEPORT is turned off: grpc turns it on by default, which would let a
second server bind the same port silently instead of failing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]  # no stubs: types-grpcio is not a dependency
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]  # no stubs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection, reflection_pb2  # type: ignore[import-untyped]

from kiln.protocols.grpc.messages import (
    POOL,
    SERVICES,
    TS_INFERENCE_SERVICE,
    TS_MANAGEMENT_SERVICE,
    V2_SERVICE,
    method_types,
    methods,
)
from kiln.protocols.grpc.torchserve_service import (
    TorchServeInferenceGrpc,
    TorchServeManagementGrpc,
)
from kiln.protocols.grpc.v2_service import OpenInferenceGrpc
from kiln.serving.data_plane import DataPlane

# The largest message the port reads; each API's serving.max_request_bytes applies below it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class GrpcBindError(OSError):
    """The gRPC port could not be bound (busy, or no permission)."""


def generic_handler(service: str, servicer: Any) -> grpc.GenericRpcHandler:
    """One handler per RPC of `service`, calling the servicer's method of the same name."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name in methods(service):
        request, response, client_streams, server_streams = method_types(service, name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(client_streams, server_streams)]
        handlers[name] = kind(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service, handlers)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """Kiln's gRPC port: bind early (`bind`), then `serve` until `request_stop`.

    The data plane and the management app are set once the HTTP apps exist
    (`attach`), between binding and serving: the port is bound with the others,
    before the state store opens, and serves with them.
    """

    def __init__(self, log: Any, metrics: Any = None) -> None:
        self.plane: DataPlane | None = None
        self.log = log
        self.metrics = metrics
        self.management_app: Any = None
        self.server: Any = None
        self.port: int | None = None
        self.tls = False
        self._health: Any = None
        self._stop = asyncio.Event()

    def attach(self, plane: DataPlane, management_app: Any) -> None:
        """The inference port's data plane (shared: one admission and metering) and the
        (gated) management app that ManagementAPIsService calls; None: no management port."""
        self.plane = plane
        self.management_app = management_app

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self, grace: float) -> None:
        """Answer until `request_stop`, then drain: RPCs in flight get `grace` seconds."""
        await self.start()
        await self._stop.wait()
        await self.stop(grace)

    def bind(self, host: str, port: int, cert: Path | None = None, key: Path | None = None) -> int:
        """Create the server and bind its port (TLS with `cert` and `key`); the bound port."""
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        address = _address(host, port)
        try:
            if cert is not None and key is not None:
                credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
                bound = self.server.add_secure_port(address, credentials)
                self.tls = True
            else:
                bound = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises this when the port is taken
            raise GrpcBindError(f"cannot listen on {address} for gRPC: {exc}") from None
        if not bound:
            raise GrpcBindError(f"cannot listen on {address} for gRPC (is the port in use?)")
        self.port = bound
        return bound

    async def start(self) -> None:
        """Register every service and start answering."""
        server, plane = self.server, self.plane
        assert plane is not None, "attach() the data plane before start()"
        server.add_generic_rpc_handlers(
            (
                generic_handler(V2_SERVICE, OpenInferenceGrpc(plane, self.log, self.metrics)),
                generic_handler(
                    TS_INFERENCE_SERVICE,
                    TorchServeInferenceGrpc(plane, self.log, self.metrics),
                ),
                generic_handler(
                    TS_MANAGEMENT_SERVICE,
                    TorchServeManagementGrpc(plane, self.log, self.management_app),
                ),
            )
        )
        servicer = health.aio.HealthServicer()
        for name in ("", *SERVICES):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self._health = servicer
        _add_to_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=POOL
        )
        await server.start()

    async def stop(self, grace: float) -> None:
        """Stop accepting, let RPCs in flight finish within `grace` seconds, then cancel."""
        if self.server is None:
            return
        self._stop.set()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()  # NOT_SERVING while draining
        await self.server.stop(grace)


def _add_to_pool(*files: Any) -> None:
    """Health's and reflection's own schemas in the private pool, so reflection serves
    them too (their `_pb2` modules live in the default pool, which Kiln does not read)."""
    for file in files:
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))
