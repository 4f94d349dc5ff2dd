"""Engine and session factory, created once per process by the app's lifespan."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from pinauth.settings import Settings

# Execution option: begin this SQLite transaction with BEGIN IMMEDIATE. A deferred
# transaction that reads and then writes fails outright (SQLITE_BUSY, no busy wait) when
# another process wrote in between, and two processes may both read the same row first;
# taking the write lock before the first read makes read-then-write a critical section
# across processes. PostgreSQL ignores it.
WRITE_LOCK_FIRST = "pinauth_write_lock_first"


def create_engine(settings: Settings) -> AsyncEngine:
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.database_url,
            # sqlite3's own busy wait, so concurrent writers queue instead of failing.
            connect_args={"timeout": 15},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while a writer commits; foreign keys make
    # ON DELETE CASCADE real (SQLite leaves them off by default).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # SQLAlchemy's "serializable isolation" recipe, applied only where asked for: every
    # other transaction keeps pysqlite's own deferred BEGIN (issued at the first write),
    # so reads stay lock-free. pysqlite sees the open transaction and adds no BEGIN of
    # its own; its commit() ends this one.
    if connection.get_execution_options().get(WRITE_LOCK_FIRST):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
