"""Proxy tokens: a credential the app's backend hands to code that speaks Pinterest's API.

`POST /v1/connections/{id}/proxy-tokens` (API key) mints one. It acts for that one
connection, on the proxy routes only (`/pinterest/{path}`, `/boards`), until it expires
or the connection is deleted; it is what the official Pinterest SDK sends as its "access
token" when pointed at pinauth, while the Pinterest token itself never leaves pinauth.

Like an API key it is 256 random bits behind a recognisable prefix, and only its SHA-256
is stored: with full entropy a fast hash is as good as a slow one, and keeps the check
off the proxy's hot path.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cachetools import LRUCache
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.cache import ConnectionCache
from pinauth.connections import ConnectionService
from pinauth.crypto import digest
from pinauth.errors import ConnectionNotFound, InvalidProxyToken
from pinauth.models import Connection, ConnectionStatus, ProxyToken
from pinauth.repository import ConnectionRepository, ProxyTokenRepository

PROXY_TOKEN_PREFIX = "pinauth_pt_"
# 32 random bytes as url-safe base64: 43 characters.
PROXY_TOKEN_LENGTH = len(PROXY_TOKEN_PREFIX) + 43
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 86400
MAX_CACHED_TOKENS = 10_000


def new_proxy_token() -> str:
    return PROXY_TOKEN_PREFIX + secrets.token_urlsafe(32)


def looks_like_proxy_token(value: str) -> bool:
    return value.startswith(PROXY_TOKEN_PREFIX)


@dataclass(frozen=True, slots=True)
class MintedProxyToken:
    token: str  # shown once, never stored
    expires_at: datetime


class ProxyTokenService:
    """Mints proxy tokens and resolves them to their connection."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cache: ConnectionCache,
        connections: ConnectionService,
        cache_ttl: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._cache = cache
        self._connections = connections
        # Wall-clock seconds, because expiry is a moment stored in the database.
        self._clock = clock
        # Token hash -> (connection's public id, expiry). Keyed by the hash of a random
        # 256-bit token and pointing at a public id, neither ever reused, so an entry can
        # only ever answer for its own connection. The connection itself is not kept here:
        # each use looks it up through the connection cache, which a delete empties and
        # tombstones (and revalidation or its TTL catches a delete elsewhere), so a token
        # does not outlive its connection. Nothing else ends a token before its expiry
        # (no route revokes one, and its row never changes), so an entry needs no TTL of
        # its own: it is kept until the token expires or is crowded out.
        self._resolved: LRUCache[str, tuple[str, float]] = LRUCache(MAX_CACHED_TOKENS)
        self._cache_enabled = cache_ttl > 0

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def mint(self, public_id: str, ttl_seconds: int) -> MintedProxyToken:
        """A new token for the connection; ConnectionNotFound if there is none."""
        token = new_proxy_token()
        expires_at = self._now() + timedelta(seconds=ttl_seconds)
        try:
            async with self._sessionmaker() as db, db.begin():
                connection = await ConnectionRepository(db).get(public_id)
                # A pending connection acts for nobody until the backend confirms it.
                if connection is None or connection.status is ConnectionStatus.PENDING:
                    raise ConnectionNotFound()
                await ProxyTokenRepository(db).add(
                    ProxyToken(
                        token_hash=digest(token),
                        connection_id=connection.id,
                        expires_at=expires_at,
                    )
                )
        except IntegrityError as e:
            # The connection was deleted between the read and the insert (its foreign key
            # refused the token): the same answer as if the delete had come first.
            raise ConnectionNotFound() from e
        return MintedProxyToken(token=token, expires_at=expires_at)

    async def connection_for(self, token: str) -> Connection:
        """The token's connection, or InvalidProxyToken (401)."""
        # Cheap checks first: anything not shaped like a token never costs a hash or a query.
        if len(token) != PROXY_TOKEN_LENGTH or not looks_like_proxy_token(token):
            raise InvalidProxyToken()
        token_hash = digest(token)
        entry = self._resolved.get(token_hash)
        if entry is None:
            return await self._load(token_hash)
        public_id, expires = entry
        if self._clock() >= expires:
            self._resolved.pop(token_hash, None)
            raise InvalidProxyToken("This proxy token has expired; mint a new one.")
        if self._cache.is_deleted(public_id):
            raise InvalidProxyToken()
        try:
            return await self._connections.get(public_id)
        except ConnectionNotFound:
            # Deleted on another replica (its tokens went with it): not this caller's 404.
            self._resolved.pop(token_hash, None)
            raise InvalidProxyToken() from None

    async def _load(self, token_hash: str) -> Connection:
        async with self._sessionmaker() as db:
            found = await ProxyTokenRepository(db).get_active(token_hash, self._now())
        if found is None:
            raise InvalidProxyToken()
        connection = found.connection
        # Deleted in this process while the query ran: the row just read is a ghost.
        if self._cache.is_deleted(connection.public_id):
            raise InvalidProxyToken()
        if self._cache_enabled and self._cache.remember_connection(connection):
            self._resolved[token_hash] = (connection.public_id, found.expires_at.timestamp())
        return connection
