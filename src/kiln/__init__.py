"""Kiln: turn trained models into production web services."""

from kiln.errors import (
    Forbidden,
    InferenceError,
    InvalidInput,
    KilnError,
    NotFound,
    Timeout,
    Unavailable,
)
from kiln.handlers.decorator import handler

__version__ = "0.1.0"

__all__ = [
    "Forbidden",
    "InferenceError",
    "InvalidInput",
    "KilnError",
    "NotFound",
    "Timeout",
    "Unavailable",
    "handler",
    "__version__",
]
