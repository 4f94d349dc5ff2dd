"""Database outages: a clean 503 for every request, and two log lines for the whole outage.

When the database stops answering, every request that needs it fails at once, and each
used to become a 500 with a traceback: thousands a second, with the driver's error text
(SQL parameters, encrypted tokens among them) in every one. Here the engine itself turns
"cannot reach the database" into `DatabaseUnavailable` (503 `database_unavailable`,
`Retry-After`), and `OutageTracker` logs once when an outage starts and once when it ends,
with the number of requests refused meanwhile. Errors that mean the code is wrong (bad
SQL, a constraint, a type) are left alone: they stay 500s with a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from pinauth.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

# SQLSTATEs meaning the server is gone or cannot take work: connection exceptions (08),
# insufficient resources (53: too many connections, disk full), operator intervention
# (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now) and I/O error.
_POSTGRES_UNAVAILABLE = ("08", "53", "57P", "58030")
# SQLite primary result codes with the same meaning: BUSY and LOCKED (past the busy
# timeout), READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB. SQLITE_ERROR, which
# sqlite3 also raises as OperationalError, is a bad statement and stays a bug.
_SQLITE_UNAVAILABLE = frozenset({5, 6, 8, 10, 11, 13, 14, 15, 26})

_FAILURES_SEEN = "pinauth_failures_seen"


def is_unavailable(error: BaseException) -> bool:
    """Whether a driver error means the database cannot be used right now (not a bug)."""
    if isinstance(error, OSError):  # refused, reset, unreachable; TimeoutError is one too
        return True
    sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_POSTGRES_UNAVAILABLE)
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _SQLITE_UNAVAILABLE


def describe(error: BaseException) -> str:
    """What failed, by class and code only: drivers quote SQL parameters in their messages."""
    parts: list[str] = []
    current: BaseException | None = error
    while current is not None and len(parts) < 3:
        kind = type(current)
        # SQLAlchemy's wrappers repeat what the driver said; name the driver's errors.
        if not kind.__module__.startswith("sqlalchemy") and not isinstance(
            current, DatabaseUnavailable
        ):
            package = kind.__module__.split(".")[0]
            name = kind.__qualname__ if package == "builtins" else f"{package}.{kind.__qualname__}"
            code = (
                getattr(current, "sqlstate", None)
                or getattr(current, "sqlite_errorname", None)
                or (f"errno {current.errno}" if isinstance(current, OSError) else None)
            )
            parts.append(f"{name} ({code})" if code else name)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts) or f"{type(error).__module__}.{type(error).__qualname__}"


class OutageTracker:
    """Knows whether the database is down, and logs when that changes.

    Down at the first failure that means "unavailable"; up again at the first statement
    that succeeds after it. Only statements begun after the latest failure count: one
    that was already running when the database went away says nothing about now, and
    letting it end the outage would log a start and an end for every such straggler.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None
        self._refused = 0
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, cause: BaseException) -> DatabaseUnavailable:
        """The database could not be used; returns the error to raise in its place."""
        self._failures += 1
        if self._since is None:
            self._since = self._clock()
            self._refused = 0
            log.error(
                "database outage started: %s; requests that need the database get 503 "
                "database_unavailable until it answers again",
                describe(cause),
                extra={"cause": describe(cause)},
            )
        return DatabaseUnavailable()

    def refused(self) -> None:
        """A request was answered 503 database_unavailable; counted if an outage is on.

        Not counted otherwise: its failure belonged to an outage that ended while the
        request was on its way out, or it waited in vain for a free pooled connection,
        which a database that works but is too slow for the load does too (that is a
        503, and in the access log, but no outage: statements still succeed).
        """
        if self._since is not None:
            self._refused += 1

    def recovered(self) -> None:
        if self._since is None:
            return
        seconds = round(self._clock() - self._since, 3)
        log.warning(
            "database outage ended after %.1f s; %d requests were refused meanwhile",
            seconds,
            self._refused,
            extra={"outage_seconds": seconds, "refused_requests": self._refused},
        )
        self._since = None
        self._refused = 0

    # --- the engine's side ---------------------------------------------------------------

    def watch(self, engine: AsyncEngine) -> None:
        """Translate the engine's connection failures, and notice when statements succeed."""
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "do_connect", self._connect)
        event.listen(sync_engine, "handle_error", self._handle_error)
        event.listen(sync_engine, "before_cursor_execute", self._before_execute)
        event.listen(sync_engine, "after_cursor_execute", self._after_execute)

    def _connect(
        self, dialect: Dialect, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
    ) -> Any:
        # Connecting fails with the driver's own exceptions (asyncpg raises a bare
        # ConnectionRefusedError or TimeoutError), which SQLAlchemy passes through unwrapped,
        # so handle_error never sees them. Any failure to connect means "unavailable".
        try:
            return dialect.connect(*cargs, **cparams)
        except (OSError, dialect.loaded_dbapi.Error) as e:
            raise self.failed(e) from e

    def _handle_error(self, context: ExceptionContext) -> BaseException | None:
        # A failed pre-ping is SQLAlchemy's cue to reconnect; it must see its own error.
        # A cancellation counts as a "disconnect" too, and must stay a cancellation.
        if context.is_pre_ping or not isinstance(context.original_exception, Exception):
            return None
        if context.is_disconnect or is_unavailable(context.original_exception):
            return self.failed(context.original_exception)
        return None

    def _before_execute(self, conn: Connection, *_: Any) -> None:
        conn.info[_FAILURES_SEEN] = self._failures

    def _after_execute(self, conn: Connection, *_: Any) -> None:
        if self._since is not None and conn.info.get(_FAILURES_SEEN) == self._failures:
            self.recovered()
