"""API keys: how the app's backend authenticates to pinauth.

A key is 256 random bits behind a fixed prefix that secret scanners can recognise. Only
its SHA-256 is stored: the key has full entropy, so a fast hash is as good as a slow one
here and keeps verification off the hot path's budget.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cachetools import TTLCache
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.crypto import digest
from pinauth.errors import InvalidApiKey, InvalidRequest
from pinauth.models import ApiKey
from pinauth.repository import ApiKeyRepository

log = logging.getLogger(__name__)

API_KEY_PREFIX = "pinauth_sk_"
# 32 random bytes as url-safe base64: 43 characters.
API_KEY_LENGTH = len(API_KEY_PREFIX) + 43
# Characters kept in listings, enough to tell keys apart and nothing to guess with.
SHOWN_PREFIX_LENGTH = len(API_KEY_PREFIX) + 6
# last_used_at is written at most this often per key, not on every request.
TOUCH_INTERVAL_SECONDS = 60
MAX_CACHED_KEYS = 1_000


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_api_key(value: str) -> bool:
    return value.startswith(API_KEY_PREFIX)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    name: str
    key: str  # shown once, never stored


class ApiKeyService:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cache_ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessionmaker = sessionmaker
        # Verified key hashes; a revocation on another replica is seen within the TTL.
        self._verified: TTLCache[str, bool] = TTLCache(
            MAX_CACHED_KEYS, max(cache_ttl, 0.001), clock
        )
        self._touched: TTLCache[str, float] = TTLCache(MAX_CACHED_KEYS, TOUCH_INTERVAL_SECONDS)
        self._pending: set[asyncio.Task[None]] = set()
        self._cache_enabled = cache_ttl > 0

    async def create(self, name: str) -> CreatedKey:
        name = name.strip()
        if not name or len(name) > 100 or not name.isprintable():
            raise InvalidRequest("An API key's name is 1 to 100 printable characters.")
        key = new_api_key()
        try:
            async with self._sessionmaker() as db, db.begin():
                await ApiKeyRepository(db).add(
                    ApiKey(name=name, prefix=key[:SHOWN_PREFIX_LENGTH], key_hash=digest(key))
                )
        except IntegrityError:
            raise InvalidRequest(f"An API key named {name!r} exists already.") from None
        return CreatedKey(name=name, key=key)

    async def list(self) -> list[ApiKey]:
        async with self._sessionmaker() as db:
            return await ApiKeyRepository(db).all()

    async def revoke(self, name: str) -> bool:
        async with self._sessionmaker() as db, db.begin():
            revoked = await ApiKeyRepository(db).revoke(name, datetime.now(UTC))
        self._verified.clear()  # this process stops accepting it at once
        return revoked

    async def authenticate(self, key: str) -> None:
        """Accept `key` or raise InvalidApiKey (401). Cached for the cache TTL."""
        if len(key) != API_KEY_LENGTH or not looks_like_api_key(key):
            raise InvalidApiKey()
        key_hash = digest(key)
        if key_hash in self._verified:
            self._touch_later(key_hash)
            return
        async with self._sessionmaker() as db:
            found = await ApiKeyRepository(db).get_active(key_hash)
        if found is None:
            raise InvalidApiKey()
        if self._cache_enabled:
            self._verified[key_hash] = True
        self._touch_later(key_hash)

    def _touch_later(self, key_hash: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key_hash, -TOUCH_INTERVAL_SECONDS) < TOUCH_INTERVAL_SECONDS:
            return
        self._touched[key_hash] = now
        # Bookkeeping must not add a write to the request's latency.
        task = asyncio.get_running_loop().create_task(self._touch(key_hash))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _touch(self, key_hash: str) -> None:
        try:
            async with self._sessionmaker() as db, db.begin():
                await ApiKeyRepository(db).touch(key_hash, datetime.now(UTC))
        except Exception as e:  # bookkeeping only: the request was served regardless
            log.warning("could not record an API key's last use: %s", type(e).__name__)

    async def aclose(self) -> None:
        """Let pending last-used writes finish (called at shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
