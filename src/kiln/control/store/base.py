"""The store's plumbing: opening (and upgrading) the database, and its transactions.

Threading and asyncio: every public method is synchronous, runs ONE short transaction
(milliseconds) and is safe to call from any thread; the engine keeps a connection pool.
An asyncio server must not call them on its event loop (a writer may wait up to the
busy timeout for the lock): it calls `await asyncio.to_thread(store.method, ...)`.
Each process opens its own Store; never share one across `fork()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy.engine import Connection, Engine

from . import migrations as _migrations
from .engine import WRITE_OPTION, create_engine, default_url


class StoreBase:
    """Owns the engine; subclasses add the domain methods."""

    def __init__(
        self,
        url: str | None = None,
        *,
        home: Path | None = None,
        migrations: Sequence[_migrations.Migration] = _migrations.MIGRATIONS,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        echo: bool = False,
    ) -> None:
        """Open the store at `url` (default: `<KILN_HOME>/state.db`) and upgrade its schema.

        Raises SchemaTooNewError, without changing anything, when the database was
        written by a newer Kiln. `migrations` and `clock` exist for tests.
        """
        self.url = url or default_url(home)
        self._clock = clock
        self._engine: Engine = create_engine(self.url, busy_timeout_s=busy_timeout_s, echo=echo)
        try:
            self.schema_version = _migrations.upgrade(self._engine, migrations)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Release every pooled connection (the database itself needs no shutdown)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _now(self, at: float | None) -> float:
        return self._clock() if at is None else at

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction: a consistent snapshot, takes no write lock."""
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """An atomic write transaction: all of it commits, or (on any error) none of it.

        On SQLite it starts with BEGIN IMMEDIATE, taking the write lock up front so
        read-modify-write sequences inside cannot interleave with another writer.
        """
        with self._engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn
