"""Engine and session factory, created once per process by the app's lifespan."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import event, make_url
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

log = logging.getLogger(__name__)


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


# Tokens are encrypted and keys hashed, but the file is nobody else's business either.
SQLITE_FILE_MODE = 0o600


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite database; None for other databases and in-memory ones."""
    url = make_url(database_url)
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or url.query.get("mode") == "memory":
        return None
    if url.query.get("uri") == "true":
        database = database.removeprefix("file:")
    if database in ("", ":memory:"):
        return None
    return Path(database)


def create_private_sqlite_file(database_url: str) -> None:
    """Create a SQLite database's file readable by this user only, if it does not exist.

    SQLite would create it with the umask's mode (0644 as a rule), and then its -wal and
    -shm files with the same mode as the database file: creating the file 0600 before
    SQLite opens it makes all three private. An existing file that others may read (made
    by an earlier pinauth, or copied in) is made private too, with a warning.
    """
    path = sqlite_file(database_url)
    if path is None or not path.parent.is_dir():
        return  # nothing to make, or preflight reports the missing directory
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE)
    except FileExistsError:
        _make_private(path)
        return
    # The umask can only take bits away from 0600, never add any; the mode is exact anyway.
    os.fchmod(fd, SQLITE_FILE_MODE)
    os.close(fd)


def _make_private(database: Path) -> None:
    for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))):
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if not mode & ~SQLITE_FILE_MODE:
            continue
        try:
            path.chmod(SQLITE_FILE_MODE)
        except PermissionError:
            log.warning("%s is mode %o, and not this user's to make private", path, mode)
            continue
        log.warning("%s was mode %o, readable by others: made it 600", path, mode)


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
        create_private_sqlite_file(settings.database_url)
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
