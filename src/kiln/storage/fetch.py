"""`python -m kiln.storage.fetch URI`: fetch a model into the shared cache, print its path.

The server runs this for a sandboxed worker, whose network namespace cannot
reach the store. It runs as its own process with the deployment's environment
(its `.env`/`env:` credentials), never the server's, so a user's deployment
can only read what its own credentials allow. Output: one JSON line,
`{"path": ...}` or `{"error": ...}`.
"""

from __future__ import annotations

import sys

import orjson


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from kiln.errors import KilnError
    from kiln.storage import materialize

    try:
        path = materialize(argv[0])
    except KilnError as exc:
        sys.stdout.write(orjson.dumps({"error": exc.message}).decode() + "\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - report, never a traceback to the client
        sys.stdout.write(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}).decode() + "\n")
        return 1
    sys.stdout.write(orjson.dumps({"path": str(path)}).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
