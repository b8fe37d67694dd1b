"""One exception tree for every failure a client can see.

Each error carries its HTTP status and a stable type name, so every protocol
adapter renders the same failure its own way (native, TorchServe, V1/V2)
without knowing where it came from. User code raises these to choose the
status a client gets; anything else a handler raises becomes a 500.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every client-visible error."""

    status: int = 500
    type: str = "InternalError"

    def __init__(self, message: str = "", *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__doc__ or self.type
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidInput(KilnError):
    """The request body is malformed or does not fit the model."""

    status = 400
    type = "InvalidInput"


class Unauthorized(KilnError):
    """No valid credentials were given."""

    status = 401
    type = "Unauthorized"


class Forbidden(KilnError):
    """The credentials do not allow this."""

    status = 403
    type = "Forbidden"


class NotFound(KilnError):
    """No such API, version or route."""

    status = 404
    type = "NotFound"


class MethodNotAllowed(KilnError):
    """The route exists but not for this HTTP method."""

    status = 405
    type = "MethodNotAllowed"


class Conflict(KilnError):
    """The name is taken, or the thing is in a state that forbids the change."""

    status = 409
    type = "Conflict"


class PayloadTooLarge(KilnError):
    """The request body is larger than the API accepts."""

    status = 413
    type = "PayloadTooLarge"


class UnsupportedMediaType(KilnError):
    """The Content-Type is not one this route can read."""

    status = 415
    type = "UnsupportedMediaType"


class TooManyRequests(KilnError):
    """A quota or rate limit was reached."""

    status = 429
    type = "TooManyRequests"

    def __init__(
        self, message: str = "", *, status: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class InferenceError(KilnError):
    """The model or the user's handler failed while answering."""

    status = 500
    type = "InferenceError"


class NotImplementedByApi(KilnError):
    """The API does not offer this operation (for example explanations)."""

    status = 501
    type = "NotImplemented"


class Unavailable(KilnError):
    """The API cannot answer now (loading, restarting or overloaded); retry later."""

    status = 503
    type = "Unavailable"

    def __init__(
        self,
        message: str = "",
        *,
        status: int | None = None,
        retry_after: int | None = None,
        load_error_of: str | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
        # The API whose load error this message carries: the data plane hides it from
        # callers who may not read it (multi-user servers), by this mark, not by its text.
        self.load_error_of = load_error_of


class Timeout(KilnError):
    """The API did not answer within its response timeout."""

    status = 504
    type = "Timeout"


_BY_TYPE: dict[str, type[KilnError]] = {
    cls.type: cls
    for cls in (
        KilnError,
        InvalidInput,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        UnsupportedMediaType,
        TooManyRequests,
        InferenceError,
        NotImplementedByApi,
        Unavailable,
        Timeout,
    )
}


def error_from_wire(type_name: str, message: str, status: int) -> KilnError:
    """Rebuild an error that crossed the worker boundary as (type, message, status)."""
    cls = _BY_TYPE.get(type_name, KilnError)
    err = cls(message, status=status)
    if cls is KilnError:
        err.type = type_name
    return err


class FieldProblem(ValueError):
    """A value that does not read as what its field needs: a message, its fix and,
    optionally, the (relative, dotted) field it belongs to.

    Raised inside kiln.yaml's schema validators and by the quantity parsers
    (kiln.quantities), which storage and the control plane use too; so it lives
    here, at the bottom, rather than in kiln.config. Pydantic keeps the original
    exception in the error context, so the config loader recovers ``fix`` and
    ``field`` and can point at the right YAML line even for checks made by
    model-level validators.
    """

    def __init__(self, message: str, fix: str = "", field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.field = field


def install_hint(extra: str) -> str:
    """The command that installs Kiln's `extra`, as the README's Install section does it.

    Kiln is not on PyPI (`pip install kiln-serve[...]` finds nothing): it is installed
    from its repository, so the hint names that folder when Kiln runs from a checkout.
    One place, because runtimes, storage and config checks all give this hint."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return f"pip install -e '{root}[{extra}]'"
    return f"pip install -e '.[{extra}]' in Kiln's folder (see the README's Install section)"
