"""Building the SQLAlchemy engine: which database, and how SQLite must be configured.

Kiln's state lives in one database reached only through `kiln.control.store`. SQLite
is the embedded default (`<KILN_HOME>/state.db`); PostgreSQL (`postgresql+psycopg://`)
is for a control plane shared by several machines. Everything dialect-specific is
confined to this module (connection setup) and to `_insert()` below (the upsert
construct, which SQLAlchemy renders for each dialect); the rest of the store is
portable Core SQL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

# Option set on a Connection before `begin()` when the transaction will write.
WRITE_OPTION = "kiln_write"


def kiln_home() -> Path:
    """KILN_HOME, else ~/.kiln: the folder that holds everything Kiln keeps."""
    return Path(os.environ.get("KILN_HOME", Path.home() / ".kiln")).expanduser()


def default_url(home: Path | None = None) -> str:
    """The embedded default: a SQLite file in KILN_HOME (KILN_STATE_URL overrides)."""
    if home is None and os.environ.get("KILN_STATE_URL"):
        return os.environ["KILN_STATE_URL"]
    return f"sqlite:///{(home or kiln_home()) / 'state.db'}"


def create_engine(url: str, *, busy_timeout_s: float = 30.0, echo: bool = False) -> Engine:
    """An engine for `url`, configured so concurrent writers never lose updates.

    SQLite: WAL journal (readers never block the writer), `foreign_keys=ON`, a busy
    timeout so a writer waits for the lock instead of failing, and explicit BEGIN
    (IMMEDIATE for write transactions). pysqlite's own implicit transactions start
    late and would let two read-then-write transactions deadlock or fail with
    SQLITE_BUSY without waiting, so we turn them off and issue BEGIN ourselves.
    """
    sa_url = sa.make_url(url)
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(sa_url, busy_timeout_s, echo)
    if backend == "postgresql":
        return sa.create_engine(sa_url, echo=echo, pool_pre_ping=True)
    raise ValueError(
        f"unsupported state store URL {url!r}: use sqlite:/// or postgresql+psycopg://"
    )


def _sqlite_engine(url: sa.URL, busy_timeout_s: float, echo: bool) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if in_memory:
        raise ValueError("the state store needs a SQLite file, not an in-memory database")
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Keys and usage will live here: keep the file (and its -wal/-shm, which
        # SQLite creates with the same mode) private to the owner.
        path.touch(mode=0o600)
    engine = sa.create_engine(
        url, echo=echo, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, see _on_begin
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: crash-safe
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def insert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT, which offers `on_conflict_do_update` on both backends."""
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    raise ValueError(f"no upsert support for dialect {name!r}")


def lock_for_migration(conn: Connection) -> None:
    """Serialize schema upgrades between processes that open the store at once.

    SQLite's BEGIN IMMEDIATE already holds the only write lock; PostgreSQL takes a
    transaction-scoped advisory lock (released at commit or rollback).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7305105001)"))
