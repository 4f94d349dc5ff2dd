"""Engine and session factory, created once per process by the app's lifespan."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from pinauth.errors import DatabaseUnavailable
from pinauth.settings import Settings


class _Pool(AsyncAdaptedQueuePool):
    """SQLAlchemy's default async pool, where waiting in vain for a connection is a 503.

    Every connection busy for the whole pool timeout is what a slow, hung or unreachable
    database looks like under load; the client gets 503 database_unavailable and
    Retry-After rather than a 500 (outage.py decides what counts as an outage).
    """

    # Log under SQLAlchemy's name, as the pool this replaces does (its INFO chatter stays off).
    _sqla_logger_namespace = "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            return super()._do_get()
        except PoolTimeout as e:
            raise DatabaseUnavailable() from e


def create_engine(settings: Settings) -> AsyncEngine:
    common: dict[str, Any] = {
        # Error messages and logs show the SQL but never its parameters (tokens, hashes).
        "hide_parameters": True,
        "poolclass": _Pool,
        # SQLAlchemy's default is 30 s. A waiting request is not woken when a connection
        # attempt fails, so during an outage this is how long the queued ones wait.
        "pool_timeout": settings.database_timeout_seconds,
    }
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.database_url,
            # sqlite3's own busy wait, so concurrent writers queue instead of failing.
            connect_args={"timeout": 15},
            **common,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        connect_args={"timeout": settings.database_timeout_seconds},
        **common,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while a writer commits; foreign keys make
    # ON DELETE CASCADE real (SQLite leaves them off by default).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
