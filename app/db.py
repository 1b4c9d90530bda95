"""Database engine and sessions.

SQLite runs in WAL mode with a busy timeout, `synchronous=FULL` and foreign keys on. Reads use plain
(deferred) transactions; every write goes through `Database.write()`, which starts with
`BEGIN IMMEDIATE` so two writers queue on the busy timeout instead of failing mid-transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlmodel import Session

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# A health check must answer quickly, whatever the busy timeout: its write probe waits this long.
PROBE_BUSY_TIMEOUT_SECONDS = 1.0


def make_engine(url: str, busy_timeout_seconds: float = SQLITE_BUSY_TIMEOUT_SECONDS) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_seconds},
            # Pooled: a session reuses an open connection instead of opening the file and running
            # the PRAGMAs again (measured with bench/web.py: page p99 under 50 open streams).
            pool_size=8,
            max_overflow=32,
            pool_pre_ping=False,
        )
        _configure_sqlite(engine, round(busy_timeout_seconds * 1000))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN is ours to write (see "begin" below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """One engine and the two kinds of session the code uses."""

    def __init__(self, url: str, busy_timeout_seconds: float = SQLITE_BUSY_TIMEOUT_SECONDS) -> None:
        self.url = url
        self.busy_timeout_seconds = busy_timeout_seconds

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.url, self.busy_timeout_seconds)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that holds the write lock from its first statement; commits on success."""
        with Session(self.engine, expire_on_commit=False) as session:
            session.connection(execution_options={"sqlite_immediate": True})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def probe_write(self) -> None:
        """Raise what a real write would raise now (locked, read-only, disk full), else return.

        SQLite: one committed write that changes nothing (the header's `user_version`, unused,
        set to itself: one page appended to the WAL, so a disk with no room for it is found),
        waiting at most PROBE_BUSY_TIMEOUT_SECONDS for the write lock. PostgreSQL: the same, an
        update of alembic's version row to itself (a read-only server refuses it), rolled back.
        """
        if not self.is_sqlite:
            with self.read() as session:
                connection = session.connection()
                wait_ms = round(PROBE_BUSY_TIMEOUT_SECONDS * 1000)
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
                connection.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
                session.rollback()
            return
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            wait_ms = round(min(PROBE_BUSY_TIMEOUT_SECONDS, self.busy_timeout_seconds) * 1000)
            cursor.execute(f"PRAGMA busy_timeout={wait_ms}")
            try:
                cursor.execute("BEGIN IMMEDIATE")
                version = int(cursor.execute("PRAGMA user_version").fetchone()[0])
                cursor.execute(f"PRAGMA user_version={version}")
                cursor.execute("COMMIT")
            finally:
                if raw.driver_connection is not None and raw.driver_connection.in_transaction:
                    cursor.execute("ROLLBACK")
                cursor.execute(f"PRAGMA busy_timeout={round(self.busy_timeout_seconds * 1000)}")
                cursor.close()
        finally:
            raw.close()

    def dispose(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
