"""Loading a worker's API: what it needs before the model, and what a failed load means.

Apart from `worker.py` because it runs once, before the first request, and is
shared with the batch worker (batch/runner.py: the same environment on sys.path,
the same model fetch): the project's environment goes on sys.path, a remote
model is fetched through the cache inside the replica's startup timeout, and a
failure is turned into the message `kiln get` and a 503 show, with the one rule
for whether a retry could help.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from kiln.errors import KilnError
from kiln.sandbox.identity import BASE_UID as TENANT_BASE_UID
from kiln.serving.types import WorkerSpec


def load_error(exc: BaseException) -> str:
    """What `kiln get` and a 503 say about a failed load; a SyntaxError names its line."""
    if isinstance(exc, KilnError):
        return exc.message
    if isinstance(exc, MemoryError):
        return "ran out of memory while loading; raise compute.mem in kiln.yaml"
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{exc.filename}, line {exc.lineno}" if exc.lineno else exc.filename
        return f"{type(exc).__name__} in {where}: {exc.msg}"
    if isinstance(exc, PermissionError) and os.getuid() >= TENANT_BASE_UID:
        # A sandboxed worker runs as its tenant's uid (docs/architecture.md), which cannot
        # read a project folder or file only its owner may (mode 0700/0600).
        return (
            f"{type(exc).__name__}: {exc}; the worker runs as uid {os.getuid()} (the "
            f"sandbox's uid for this tenant), which cannot read it: make the project "
            f"readable to others (chmod -R o+rX on its folder) or serve without --sandbox"
        )
    return f"{type(exc).__name__}: {exc}"


# KilnErrors a runtime raises at load for a configuration that no retry can fix.
_PERMANENT_KILN_ERRORS = {"InvalidSignature", "MissingFramework", "ModelLoadError", "InvalidInput"}


def permanent_load_failure(exc: BaseException, spec: WorkerSpec) -> bool:
    """Whether a load failure would happen again on every retry: the one place this rule lives.

    Permanent (the API is marked failed with the reason, and not retried): the user's
    code does not compile (SyntaxError) or imports what is not installed (ImportError,
    ModuleNotFoundError), and errors the runtime raises for a configuration it refuses
    (two TensorFlow signatures and no signature_key, a tracker key naming no output,
    a framework that is not installed, a model file it cannot read). Everything else
    may pass, and keeps the backoff: the worker was killed or ran out of memory, the
    load overran its timeout, a download failed (the model is fetched before this is
    asked), the user's own load() raised, or the model's files are not there yet
    (they may be copied in later, and the API then comes up by itself).
    """
    if isinstance(exc, SyntaxError | ImportError):
        return True
    if isinstance(exc, KilnError) and exc.type in _PERMANENT_KILN_ERRORS:
        path = spec.model_path
        return not (exc.type == "ModelLoadError" and path and not os.path.exists(path))
    return False


def local_model(spec: WorkerSpec) -> WorkerSpec:
    """The spec with `model_path` made local: a remote model is fetched through the cache here,
    inside the replica's startup_timeout, so a failed download is this API's load error."""
    if not spec.model_path:
        return spec
    from kiln.storage import materialize

    local = str(materialize(spec.model_path))
    if local == spec.model_path:
        return spec
    os.environ["MODEL_DIR"] = local if os.path.isdir(local) else os.path.dirname(local)
    return dataclasses.replace(spec, model_path=local)


def add_site_dirs(site_dirs: list[str]) -> None:
    """Put the project's environment on sys.path, after the server's own packages.

    Appended, not prepended: the environment only holds what the server lacked, so
    nothing in it may shadow a server package. `site.addsitedir` also runs the folder's
    .pth files, as an installed site-packages would.
    """
    import site

    for folder in site_dirs:
        if folder not in sys.path:
            site.addsitedir(folder)
