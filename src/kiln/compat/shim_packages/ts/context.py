"""`ts.context`: the context a TorchServe handler receives (Kiln builds it per batch)."""

from kiln.handlers.torchserve_context import Context, Metrics, RequestProcessor

__all__ = ["Context", "Metrics", "RequestProcessor"]
