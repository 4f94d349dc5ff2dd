"""Revalidation: keeps the cache's entries in use alive with one query per batch of them.

Without it, every cached session and connection runs out after PINAUTH_CACHE_TTL and its
next request reads it again, one query each: a process serving a thousand active users
makes two hundred such reads a second, each costing several proxied requests' worth of
CPU (`make bench`, the hot set of 1,000). Instead, every half TTL, the entries served since
the last pass are confirmed against the database in batches: still there, at the same row
version, and they are kept another TTL; gone, and they are dropped at once; changed (a
refresh elsewhere), and they run out and are read again.

What the TTL promises holds: an entry is served only while the database confirmed it
within the last TTL, plus the confirming query's own duration (a pass whose query took
longer than half a TTL renews nothing). Confirmation only ever renews an entry still in
the cache, never brings one back, so a logout or delete that lands while a query runs is
not undone (cache.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.cache import ConnectionCache
from pinauth.errors import DatabaseUnavailable
from pinauth.repository import ConnectionRepository, SessionRepository

log = logging.getLogger(__name__)

# Keys per query: far under every backend's bound-parameter limit, and one round trip
# covers the hot set of a busy process.
BATCH_SIZE = 500
# Passes never come closer than this, whatever the TTL: a tiny TTL (tests) gets no
# revalidation, only its entries running out, as before.
MIN_INTERVAL_SECONDS = 0.5


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Revalidated:
    """What one pass did, for logs and tests."""

    confirmed: int = 0
    dropped: int = 0
    changed: int = 0
    stale: int = 0  # answers that came too late to renew anything


class CacheRevalidator:
    """Confirms the cache's entries in use every half TTL, until stopped."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cache: ConnectionCache,
        ttl: float,
        *,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._cache = cache
        self._ttl = ttl
        self.interval = max(ttl / 2, MIN_INTERVAL_SECONDS) if interval is None else interval
        self._clock = clock
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.passes = 0
        # Set after every pass, done or failed: what tests wait on instead of sleeping.
        self.pass_done = asyncio.Event()

    async def run_once(self) -> Revalidated:
        """Confirm every entry served since the last pass."""
        done = Revalidated()
        sessions, connections = self._cache.take_used()
        hashes = list(sessions)
        for start in range(0, len(hashes), BATCH_SIZE):
            chunk = hashes[start : start + BATCH_SIZE]
            asked = self._monotonic()
            async with self._sessionmaker() as db:
                found = await SessionRepository(db).versions(chunk, self._clock())
            if self._too_late(asked, len(chunk), done):
                continue
            for session_hash in chunk:
                current = found.get(session_hash)
                if current is None:
                    self._cache.drop_session(session_hash)
                    done.dropped += 1
                elif current == sessions[session_hash]:
                    self._cache.confirm_session(session_hash, *current)
                    done.confirmed += 1
                else:
                    done.changed += 1
        ids = list(connections)
        for start in range(0, len(ids), BATCH_SIZE):
            chunk = ids[start : start + BATCH_SIZE]
            asked = self._monotonic()
            async with self._sessionmaker() as db:
                versions = await ConnectionRepository(db).versions(chunk)
            if self._too_late(asked, len(chunk), done):
                continue
            for public_id in chunk:
                version = versions.get(public_id)
                if version is None:
                    # Deleted on another replica: its id is never reused, so nothing may
                    # cache it again.
                    self._cache.forget_connection(public_id)
                    done.dropped += 1
                elif version == connections[public_id]:
                    self._cache.confirm_connection(public_id, version)
                    done.confirmed += 1
                else:
                    done.changed += 1
        return done

    def _too_late(self, asked: float, keys: int, done: Revalidated) -> bool:
        """An answer older than half a TTL would stretch the TTL's promise: renew nothing."""
        if self._monotonic() - asked <= self._ttl / 2:
            return False
        done.stale += keys
        return True

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="pinauth-cache-revalidation")

    async def stop(self) -> None:
        """Stop between passes: a query cut off midway leaves its driver thread calling
        back into a loop that is closing."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self.run_once()
            except DatabaseUnavailable:
                # Entries simply run out meanwhile, and requests re-read them (and report
                # the outage) exactly as without revalidation.
                log.info("cache revalidation skipped: the database is unavailable")
            except Exception:
                log.warning("cache revalidation failed; entries run out as usual", exc_info=True)
            self.passes += 1
            self.pass_done.set()
