"""What can go wrong while fetching a model, as KilnErrors a person can act on.

Each error names the model path and says what to do. The worker sends only
the message to the server, which shows it as the API's load error, so every
message stands on its own (no traceback follows it). Each class also keeps the
HTTP status its base class carries (a bad URI is a 400, a missing object a
404), for the management API that registers models.
"""

from __future__ import annotations

from kiln.errors import Forbidden, InvalidInput, KilnError, NotFound, Unavailable


class StorageError(KilnError):
    """A model could not be fetched or unpacked."""

    def __init__(self, message: str, *, fix: str = "") -> None:
        super().__init__(f"{message}. {fix[:1].upper()}{fix[1:]}" if fix else message)
        self.problem = message
        self.fix = fix


class ModelUriError(StorageError, InvalidInput):
    """A model path has a form Kiln cannot read, or credentials written into it."""


class ModelNotFound(StorageError, NotFound):
    """The store answered, and there is no object at that path."""


class StorageAccessDenied(StorageError, Forbidden):
    """The store refused the credentials Kiln found (or found none)."""


class StorageUnreachable(StorageError, Unavailable):
    """The store (or the network to it) did not answer."""


class ModelIntegrityError(StorageError):
    """The downloaded bytes do not match what the store said they would be."""


class UnsafeArchive(StorageError, InvalidInput):
    """An archive or model file would write or read outside its own folder."""


class MissingStorageExtra(StorageError):
    """The package that speaks this store's protocol is not installed."""
