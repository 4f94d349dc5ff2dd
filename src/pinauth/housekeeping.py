"""Housekeeping: a background task that deletes expired sessions, logins and proxy tokens,
and the pending connections of connect sessions nobody confirmed in time.

Expired rows are already refused wherever they are read; deleting them keeps the
tables (and their indexes) the size of what is live. Every replica runs the task;
the DELETEs are idempotent, so replicas overlapping cost nothing but a query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.background import BackgroundLoop
from pinauth.errors import DatabaseUnavailable
from pinauth.repository import (
    ConnectResultRepository,
    LoginStateRepository,
    ProxyTokenRepository,
    SessionRepository,
    WebhookEventRepository,
)

log = logging.getLogger(__name__)

WEBHOOK_RETENTION = timedelta(days=30)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Purged:
    sessions: int
    login_states: int
    proxy_tokens: int = 0
    webhook_events: int = 0
    pending_connections: int = 0
    connect_results: int = 0


class ExpiredRowPurger(BackgroundLoop):
    """Purges once at start-up, then every `interval` seconds, until stopped."""

    task_name = "pinauth-purge-expired"

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        interval: float,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__()
        self._sessionmaker = sessionmaker
        self._interval = interval
        self._clock = clock
        self.passes = 0
        # Set after the first pass, done or failed: what a test waits on instead of sleeping.
        self.first_pass_done = asyncio.Event()

    async def purge_once(self) -> Purged:
        """Delete every session, pending login, proxy token and connect result expired by
        the clock's now, and the pending connections none of their results can confirm."""
        now = self._clock()
        async with self._sessionmaker() as db, db.begin():
            sessions = await SessionRepository(db).delete_expired(now)
            login_states = await LoginStateRepository(db).delete_expired(now)
            proxy_tokens = await ProxyTokenRepository(db).delete_expired(now)
            # Unconfirmed connect-session logins: their connections and tokens, attached
            # to nobody, and the waiting tokens of unconfirmed reconnects.
            pending, results = await ConnectResultRepository(db).delete_expired(now)
            # The outbox is history once nothing can retry an event: kept this long for
            # `pinauth webhooks list` and /v1/webhook-events, then gone.
            events = await WebhookEventRepository(db).delete_retired(now - WEBHOOK_RETENTION)
        return Purged(
            sessions=sessions,
            login_states=login_states,
            proxy_tokens=proxy_tokens,
            webhook_events=events,
            pending_connections=pending,
            connect_results=results,
        )

    async def _run(self) -> None:
        while True:
            try:
                purged = await self.purge_once()
            except DatabaseUnavailable:
                # The outage tracker has said so once already; a traceback adds nothing.
                log.info("purge skipped: the database is unavailable")
            except Exception:
                # A database that is down or not yet migrated must not end the task:
                # the next pass tries again, and readiness reports the database.
                log.warning(
                    "purging expired rows failed; next try in %ss", self._interval, exc_info=True
                )
            else:
                if any(astuple(purged)):
                    log.info(
                        "purged %d expired sessions, %d expired pending logins, "
                        "%d expired proxy tokens, %d retired webhook events, "
                        "%d unconfirmed connections and %d expired connect results",
                        purged.sessions,
                        purged.login_states,
                        purged.proxy_tokens,
                        purged.webhook_events,
                        purged.pending_connections,
                        purged.connect_results,
                    )
            self.passes += 1
            self.first_pass_done.set()
            await self._pause(self._interval)
            if self._stopping.is_set():
                return
