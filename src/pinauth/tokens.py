"""Keeps each connection's tokens fresh: one refresh at a time, even across replicas.

Pinterest rotates the refresh token on every refresh and kills the old one, so two
refreshes racing with the same refresh token log the user out for good. Within a
process an asyncio lock per connection makes concurrent callers share one refresh;
across processes the connection row is re-read under `SELECT … FOR UPDATE`, and a
caller that finds the version moved on since it last looked uses the new tokens
instead of refreshing again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cachetools import LRUCache
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from pinauth.cache import MAX_ENTRIES, ConnectionCache
from pinauth.crypto import TokenCipher, TokenDecryptionError
from pinauth.errors import (
    NotAuthenticated,
    PinauthError,
    ReauthorizationRequired,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from pinauth.models import Connection, ConnectionStatus
from pinauth.observability import Metrics
from pinauth.pinterest.oauth import PinterestOAuth, TokenRejected, TokenSet
from pinauth.repository import ConnectionRepository
from pinauth.settings import Settings

log = logging.getLogger(__name__)

# Seconds to wait before calling a failing token endpoint again for the same connection.
TRANSIENT_FAILURE_COOLDOWN = 10
# PostgreSQL's "lock_not_available", raised when lock_timeout runs out.
LOCK_NOT_AVAILABLE = "55P03"


def apply_token_set(connection: Connection, tokens: TokenSet, cipher: TokenCipher) -> None:
    """Write a token pair onto the row; the caller commits both halves together."""
    connection.access_token_encrypted = cipher.encrypt(tokens.access_token)
    connection.access_token_expires_at = tokens.access_token_expires_at
    # Pinterest rotates the refresh token; keep the old one only if none came back.
    if tokens.refresh_token is not None:
        connection.refresh_token_encrypted = cipher.encrypt(tokens.refresh_token)
    if tokens.refresh_token_expires_at is not None:
        connection.refresh_token_expires_at = tokens.refresh_token_expires_at
    if tokens.scopes is not None:
        connection.scopes = ",".join(tokens.scopes)
    connection.status = ConnectionStatus.ACTIVE
    connection.last_refreshed_at = datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Credential:
    """An access token ready to send, and the row version it came from."""

    connection: Connection
    access_token: str

    def __repr__(self) -> str:
        connection = self.connection
        return f"Credential(connection={connection.public_id}, version={connection.version})"


class TokenManager:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        oauth: PinterestOAuth,
        cipher: TokenCipher,
        cache: ConnectionCache,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._oauth = oauth
        self._cipher = cipher
        self._cache = cache
        self._margin = timedelta(seconds=settings.refresh_margin_seconds)
        # All keyed by public id, which is never reused.
        # Weak values: a lock lives only while some request holds or awaits it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Bounded: both are per connection, and connections are unbounded.
        self._cooldown_until: LRUCache[str, float] = LRUCache(MAX_ENTRIES)
        # How long the access tokens this process last got for a connection were valid.
        self._lifetimes: LRUCache[str, timedelta] = LRUCache(MAX_ENTRIES)

    def reauthorization_required(self) -> ReauthorizationRequired:
        return ReauthorizationRequired(self._settings.login_url)

    def credential(self, connection: Connection) -> Credential:
        """The connection's access token, decrypted once per row version."""
        if connection.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
            raise self.reauthorization_required()
        token = self._cache.access_token(connection)
        if token is None:
            try:
                token = self._cipher.decrypt(connection.access_token_encrypted)
            except TokenDecryptionError:
                # The key that encrypted it was removed from PINAUTH_ENCRYPTION_KEYS.
                raise self.reauthorization_required() from None
            self._cache.remember_access_token(connection, token)
        return Credential(connection, token)

    async def usable_credential(self, connection: Connection) -> Credential:
        """A credential to call Pinterest with, refreshed first if it is about to expire.

        If the proactive refresh fails only transiently and the token has not expired
        yet, the current token is still good: use it rather than fail the call.
        """
        now = datetime.now(UTC)
        margin = self._margin
        lifetime = self._lifetimes.get(connection.public_id)
        if lifetime is not None:
            # Tokens that live shorter than the margin would otherwise be "expiring" from
            # the moment they are issued, and every call would refresh again.
            margin = min(margin, lifetime / 2)
        if connection.access_token_expires_at - now > margin:
            return self.credential(connection)
        try:
            return self.credential(await self.refresh(connection))
        except UpstreamUnavailable:
            if connection.access_token_expires_at > now:
                log.warning(
                    "using connection %s's current token until refresh recovers",
                    connection.public_id,
                )
                return self.credential(connection)
            raise

    async def replace_rejected(self, rejected: Credential) -> tuple[Credential, bool]:
        """Pinterest refused `rejected`: a credential to retry with, and whether it is fresh.

        Fresh means Pinterest issued it to this very caller after the rejection, so its
        answer stands. If the row had already moved on (another request, replica or login
        changed the tokens), its token is tried instead of spending the refresh token; it
        is not fresh, and a caller it fails for comes back here with it.
        """
        connection, refreshed = await self._refresh(rejected.connection)
        return self.credential(connection), refreshed

    async def refresh(self, seen: Connection) -> Connection:
        """Refresh `seen`'s tokens, unless its row changed since it was read.

        Returns the connection as stored afterwards. Every concurrent caller that saw
        the same version gets the result of a single token request.
        """
        connection, _ = await self._refresh(seen)
        return connection

    async def _refresh(self, seen: Connection) -> tuple[Connection, bool]:
        """`refresh`, also telling whether this call got new tokens from Pinterest."""
        public_id = seen.public_id
        lock = self._locks.get(public_id)
        if lock is None:
            lock = self._locks[public_id] = asyncio.Lock()
        try:
            async with asyncio.timeout(self._settings.refresh_lock_timeout_seconds):
                await lock.acquire()
        except TimeoutError:
            raise UpstreamUnavailable(
                "A token refresh for this connection is still in progress; retry shortly."
            ) from None
        try:
            # Whoever held the lock may have refreshed this connection for us already.
            cached = self._cache.cached_connection(public_id)
            if cached is not None and cached.version > seen.version:
                return cached, False
            refreshed, fresh = await self._refresh_locked(seen)
            self._cache.remember_connection(refreshed)
            return refreshed, fresh
        finally:
            lock.release()

    async def _refresh_locked(self, seen: Connection) -> tuple[Connection, bool]:
        failure: PinauthError | None = None
        fresh = False
        async with self._sessionmaker() as db:
            try:
                async with db.begin():
                    connection = await ConnectionRepository(db).get_for_update(
                        seen.public_id, lock_timeout=self._settings.refresh_lock_timeout_seconds
                    )
                    if connection is None:
                        raise NotAuthenticated("This Pinterest connection no longer exists.")
                    if connection.version != seen.version:
                        log.debug("connection %s changed since it was read", seen.public_id)
                    elif connection.status is ConnectionStatus.ACTIVE:
                        failure = await self._refresh_row(connection)
                        fresh = failure is None
            except DBAPIError as e:
                if _sqlstate(e) == LOCK_NOT_AVAILABLE:
                    raise UpstreamUnavailable(
                        "Another replica is refreshing this connection; retry shortly."
                    ) from e
                raise
            except StaleDataError as e:
                # Only reachable when processes share SQLite, which has no row locks.
                raise UpstreamUnavailable(
                    "This connection changed during the refresh; retry shortly."
                ) from e
        if failure is not None:
            raise failure
        if connection.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
            self._cache.remember_connection(connection)
            raise self.reauthorization_required()
        return connection, fresh

    async def _refresh_row(self, connection: Connection) -> PinauthError | None:
        """Call the token endpoint and update the locked row.

        Returns a transient error to raise once the transaction has ended. A rejected
        refresh token is not raised here either: it marks the row, which must commit.
        """
        public_id = connection.public_id
        remaining = self._cooldown_until.get(public_id, 0.0) - time.monotonic()
        if remaining > 0:
            return UpstreamUnavailable(
                "Pinterest's token endpoint failed moments ago; retry shortly.",
                retry_after=int(remaining) + 1,
            )
        try:
            if connection.refresh_token_encrypted is None:
                raise TokenRejected("no refresh token stored")
            refresh_token = self._cipher.decrypt(connection.refresh_token_encrypted)
            tokens = await self._oauth.refresh(refresh_token)
        except (TokenRejected, TokenDecryptionError) as e:
            log.warning("connection %s needs reauthorization: %s", public_id, type(e).__name__)
            connection.status = ConnectionStatus.REAUTHORIZATION_REQUIRED
            self._metrics.refreshes.labels("rejected").inc()
            return None
        except (UpstreamError, UpstreamTimeout) as e:
            log.warning("refresh of connection %s failed transiently: %s", public_id, e)
            self._metrics.refreshes.labels("transient_error").inc()
            self._cooldown_until[public_id] = time.monotonic() + TRANSIENT_FAILURE_COOLDOWN
            retry_after = e.retry_after if isinstance(e, UpstreamUnavailable) else 0
            return UpstreamUnavailable(
                "Pinterest's token endpoint is unavailable; retry later.",
                retry_after=max(retry_after, TRANSIENT_FAILURE_COOLDOWN),
            )
        self._cooldown_until.pop(public_id, None)
        self._metrics.refreshes.labels("ok").inc()
        self._lifetimes[public_id] = tokens.access_token_expires_at - datetime.now(UTC)
        apply_token_set(connection, tokens, self._cipher)
        log.info("refreshed tokens of connection %s", public_id)
        return None


def _sqlstate(error: DBAPIError) -> str | None:
    orig = error.orig
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
