"""gRPC for Kiln: the Open Inference Protocol (V2) and TorchServe's services on their own port.

Nothing here is imported unless the server opens a gRPC port, and `grpc` itself
is imported only by the modules that need it, so Kiln runs without the `grpc`
extra. `available()` says whether it is installed; `missing_message()` is what
a user who asked for the port without it is told.

Modules: `messages.py` (classes from a private descriptor pool), `rpc.py` (the
metadata, the key, the one error table, the guard every RPC runs in),
`v2_tensors.py` (ModelInfer messages <-> Kiln tensors), `v2_service.py`,
`torchserve_service.py`, `server.py` (the grpc.aio server: handlers, health,
reflection, TLS).
"""

from __future__ import annotations

import importlib.util

EXTRA = "grpc"


def available() -> bool:
    """Whether grpcio, its health and reflection services and protobuf are installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("grpc", "grpc_health", "grpc_reflection", "google.protobuf")
    )


def missing_message() -> str:
    from kiln.errors import install_hint

    return (
        "the gRPC port needs the grpc extra (grpcio, grpcio-health-checking, "
        f"grpcio-reflection): pip install 'kiln-serve[grpc]' ({install_hint(EXTRA)})"
    )
