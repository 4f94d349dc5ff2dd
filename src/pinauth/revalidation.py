"""Revalidation: keeps the cache's entries in use alive with one query per batch of them.

Without it, every cached session, connection and proxy token runs out after
PINAUTH_CACHE_TTL and its next request reads it again, one query each: a process serving
a thousand active users makes two hundred such reads a second, each costing several
proxied requests' worth of CPU (`make bench`, the hot set of 1,000). Instead, every half
TTL, the entries served since the last pass are confirmed against the database in batches:
still there, at the same row version, and they are kept another TTL; gone, and they are
dropped at once; changed (a refresh elsewhere), and they run out and are read again.

What the TTL promises holds: an entry is served only while the database confirmed it
within the last TTL, plus the confirming query's own duration (a pass whose query took
longer than half a TTL renews nothing). Confirmation only ever renews an entry still in
the cache, never brings one back, so a logout or delete that lands while a query runs is
not undone (cache.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.background import BackgroundLoop
from pinauth.cache import ConnectionCache
from pinauth.errors import DatabaseUnavailable
from pinauth.repository import ConnectionRepository, ProxyTokenRepository, SessionRepository

log = logging.getLogger(__name__)

# Keys per query: far under every backend's bound-parameter limit, and one round trip
# covers the hot set of a busy process.
BATCH_SIZE = 500
# What the cache holds about an entry: a session's (public id, row version), a
# connection's row version, or a proxy token's connection's public id.
_State = TypeVar("_State", tuple[str, int], int, str)
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


class CacheRevalidator(BackgroundLoop):
    """Confirms the cache's entries in use every half TTL, until stopped."""

    task_name = "pinauth-cache-revalidation"

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
        super().__init__()
        self._sessionmaker = sessionmaker
        self._cache = cache
        self._ttl = ttl
        self.interval = max(ttl / 2, MIN_INTERVAL_SECONDS) if interval is None else interval
        self._clock = clock
        self._monotonic = monotonic
        self.passes = 0
        # Set after every pass, done or failed: what tests wait on instead of sleeping.
        self.pass_done = asyncio.Event()

    async def run_once(self) -> Revalidated:
        """Confirm every entry served since the last pass."""
        done = Revalidated()
        sessions, connections = self._cache.take_used()
        await self._confirm(
            sessions,
            self._sessions,
            lambda session_hash, state: self._cache.confirm_session(session_hash, *state),
            self._cache.drop_session,
            done,
        )
        # A connection gone from the database was deleted (on another replica): its id is
        # never reused, so it is forgotten for good, not just dropped.
        await self._confirm(
            connections,
            self._connections,
            self._cache.confirm_connection,
            self._cache.forget_connection,
            done,
        )
        # A proxy token gone from the database (or expired) was revoked, or its connection
        # deleted, elsewhere: dropped here too.
        await self._confirm(
            self._cache.take_used_proxy_tokens(),
            self._proxy_tokens,
            self._cache.confirm_proxy_token,
            self._cache.drop_proxy_token,
            done,
        )
        return done

    async def _sessions(self, hashes: list[str]) -> dict[str, tuple[str, int]]:
        async with self._sessionmaker() as db:
            return await SessionRepository(db).versions(hashes, self._clock())

    async def _connections(self, public_ids: list[str]) -> dict[str, int]:
        async with self._sessionmaker() as db:
            return await ConnectionRepository(db).versions(public_ids)

    async def _proxy_tokens(self, token_hashes: list[str]) -> dict[str, str]:
        async with self._sessionmaker() as db:
            return await ProxyTokenRepository(db).live(token_hashes, self._clock())

    async def _confirm(
        self,
        taken: dict[str, _State],
        read: Callable[[list[str]], Awaitable[dict[str, _State]]],
        renew: Callable[[str, _State], object],
        drop: Callable[[str], None],
        done: Revalidated,
    ) -> None:
        """Ask the database about `taken` (key -> state cached) in batches: renew what it
        still holds in that state, drop what it no longer holds, leave what changed."""
        keys = list(taken)
        for start in range(0, len(keys), BATCH_SIZE):
            chunk = keys[start : start + BATCH_SIZE]
            asked = self._monotonic()
            found = await read(chunk)
            if self._too_late(asked, len(chunk), done):
                continue
            for key in chunk:
                current = found.get(key)
                if current is None:
                    drop(key)
                    done.dropped += 1
                elif current == taken[key]:
                    renew(key, current)
                    done.confirmed += 1
                else:
                    done.changed += 1

    def _too_late(self, asked: float, keys: int, done: Revalidated) -> bool:
        """An answer older than half a TTL would stretch the TTL's promise: renew nothing."""
        if self._monotonic() - asked <= self._ttl / 2:
            return False
        done.stale += keys
        return True

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._pause(self.interval)
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
