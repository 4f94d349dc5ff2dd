"""Proxy tokens: a credential the app's backend hands to code that speaks Pinterest's API.

`POST /v1/connections/{id}/proxy-tokens` (API key) mints one. It acts for that one
connection, on the proxy routes only (`/pinterest/{path}`, `/boards`), until it expires,
is revoked (`DELETE /v1/connections/{id}/proxy-tokens[/{token_id}]`) or the connection is
deleted; it is what the official Pinterest SDK sends as its "access token" when pointed at
pinauth, while the Pinterest token itself never leaves pinauth.

Like an API key it is 256 random bits behind a recognisable prefix, and only its SHA-256
is stored: with full entropy a fast hash is as good as a slow one, and keeps the check
off the proxy's hot path.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.cache import ConnectionCache
from pinauth.connections import ConnectionService
from pinauth.crypto import digest
from pinauth.errors import ConnectionNotFound, InvalidProxyToken, ProxyTokenNotFound
from pinauth.models import (
    PROXY_TOKEN_ID_PREFIX,
    Connection,
    ConnectionStatus,
    ProxyToken,
    new_public_id,
)
from pinauth.repository import ConnectionRepository, ProxyTokenRepository

log = logging.getLogger(__name__)

PROXY_TOKEN_PREFIX = "pinauth_pt_"
# 32 random bytes as url-safe base64: 43 characters.
PROXY_TOKEN_LENGTH = len(PROXY_TOKEN_PREFIX) + 43
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 86400


def new_proxy_token() -> str:
    return PROXY_TOKEN_PREFIX + secrets.token_urlsafe(32)


def looks_like_proxy_token(value: str) -> bool:
    return value.startswith(PROXY_TOKEN_PREFIX)


@dataclass(frozen=True, slots=True)
class MintedProxyToken:
    id: str  # `pt_…`: what revoking it names
    token: str  # shown once, never stored
    expires_at: datetime


class ProxyTokenService:
    """Mints proxy tokens and resolves them to their connection."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cache: ConnectionCache,
        connections: ConnectionService,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessionmaker = sessionmaker
        # Token hash -> (connection's public id, expiry), in the connection cache: keyed by
        # the hash of a random 256-bit token and pointing at a public id, neither ever
        # reused, so an entry can only ever answer for its own connection. The connection
        # itself is not kept with it: each use looks it up through the connection cache,
        # which a delete empties and tombstones, so a token does not outlive its
        # connection. An entry lives PINAUTH_CACHE_TTL, renewed by revalidation while the
        # database still holds the token, so a revocation on another replica is seen
        # within the TTL; one here drops the entry at once.
        self._cache = cache
        self._connections = connections
        # Wall-clock seconds, because expiry is a moment stored in the database.
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def mint(self, public_id: str, ttl_seconds: int) -> MintedProxyToken:
        """A new token for the connection; ConnectionNotFound if there is none."""
        token = new_proxy_token()
        token_id = new_public_id(PROXY_TOKEN_ID_PREFIX)
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
                        public_id=token_id,
                        connection_id=connection.id,
                        expires_at=expires_at,
                    )
                )
        except IntegrityError as e:
            # The connection was deleted between the read and the insert (its foreign key
            # refused the token): the same answer as if the delete had come first.
            raise ConnectionNotFound() from e
        return MintedProxyToken(id=token_id, token=token, expires_at=expires_at)

    async def revoke(self, public_id: str, token_id: str) -> None:
        """End the connection's token `token_id` now: here at once, on other replicas
        within PINAUTH_CACHE_TTL. ConnectionNotFound, or ProxyTokenNotFound if the
        connection has no such token (another connection's is not this one's)."""
        async with self._sessionmaker() as db, db.begin():
            connection = await ConnectionRepository(db).get(public_id)
            if connection is None:
                raise ConnectionNotFound()
            token_hash = await ProxyTokenRepository(db).revoke(connection.id, token_id)
            if token_hash is None:
                raise ProxyTokenNotFound()
        # After the commit: a lookup that read the row before it cannot cache it again
        # (the forgetting bumps the cache's generation).
        self._cache.forget_proxy_token(token_hash)
        log.info("proxy token %s of connection %s revoked", token_id, public_id)

    async def revoke_all(self, public_id: str) -> None:
        """End every token of the connection now (as `revoke`); ConnectionNotFound."""
        async with self._sessionmaker() as db, db.begin():
            connection = await ConnectionRepository(db).get(public_id)
            if connection is None:
                raise ConnectionNotFound()
            count = await ProxyTokenRepository(db).revoke_all(connection.id)
        self._cache.forget_proxy_tokens(public_id)
        log.info("%d proxy token(s) of connection %s revoked", count, public_id)

    async def connection_for(self, token: str) -> Connection:
        """The token's connection, or InvalidProxyToken (401)."""
        # Cheap checks first: anything not shaped like a token never costs a hash or a query.
        if len(token) != PROXY_TOKEN_LENGTH or not looks_like_proxy_token(token):
            raise InvalidProxyToken()
        token_hash = digest(token)
        entry = self._cache.proxy_token(token_hash)
        if entry is None:
            return await self._load(token_hash)
        public_id, expires = entry
        if self._clock() >= expires:
            self._cache.drop_proxy_token(token_hash)
            raise InvalidProxyToken("This proxy token has expired; mint a new one.")
        if self._cache.is_deleted(public_id):
            raise InvalidProxyToken()
        try:
            return await self._connections.get(public_id)
        except ConnectionNotFound:
            # Deleted on another replica (its tokens went with it): not this caller's 404.
            self._cache.drop_proxy_token(token_hash)
            raise InvalidProxyToken() from None

    async def _load(self, token_hash: str) -> Connection:
        generation = self._cache.generation()
        async with self._sessionmaker() as db:
            found = await ProxyTokenRepository(db).get_active(token_hash, self._now())
        if found is None:
            raise InvalidProxyToken()
        connection = found.connection
        # Deleted in this process while the query ran: the row just read is a ghost.
        if self._cache.is_deleted(connection.public_id):
            raise InvalidProxyToken()
        self._cache.remember_proxy_token(
            token_hash, connection, found.expires_at.timestamp(), generation
        )
        return connection
