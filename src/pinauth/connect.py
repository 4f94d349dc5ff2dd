"""Connect sessions: a backend lets one browser link a Pinterest account to an end user.

The backend mints one (API key), hands its `connect_url` to the browser, and the browser's
`/auth/login` consumes it (see AuthService.start_login): single use, short-lived, stored
only as a hash.

A connect link is a bearer link: whoever completes it chooses the Pinterest account. So
its login counts only once the backend, which alone knows who is logged in to the app,
confirms it (the model of Plaid's public token): the browser comes back to `return_to`
with `pinauth_connect_result=<one-time value>`, and `POST /v1/connections/confirm`
presents that value with the end user logged in. A match makes the pending connection
active (or, for a reconnect, moves the waiting tokens onto it); anything else discards
what the login made, attached to nobody.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from pinauth.cache import ConnectionCache
from pinauth.crypto import digest
from pinauth.errors import ConnectResultMismatch, InvalidConnectResult, InvalidConnectSession
from pinauth.models import Connection, ConnectionStatus, ConnectSession
from pinauth.repository import (
    ConnectionRepository,
    ConnectResultRepository,
    ConnectSessionRepository,
)
from pinauth.schedule import Schedule
from pinauth.settings import Settings
from pinauth.webhooks import EventType, record_event

CONNECT_SESSION_PREFIX = "pinauth_cs_"
MAX_TOKEN_LENGTH = 128
# `pinauth_connect_result=` on return_to: 256 random bits behind a recognisable prefix.
CONNECT_RESULT_PREFIX = "pinauth_cr_"
CONNECT_RESULT_PARAMETER = "pinauth_connect_result"
CONNECT_RESULT_LENGTH = len(CONNECT_RESULT_PREFIX) + 43
# A confirmation that loses a race with a refresh of the same row reads it again.
CONFIRM_ATTEMPTS = 5


def new_connect_result() -> str:
    return CONNECT_RESULT_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class MintedConnectSession:
    token: str
    connect_url: str
    expires_at: datetime


def connect_session_hash(token: str) -> str:
    """What the database knows a connect session by; InvalidConnectSession if malformed."""
    if not token.startswith(CONNECT_SESSION_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidConnectSession()
    return digest(token)


class ConnectSessions:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        cache: ConnectionCache,
    ):
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._cache = cache
        self._schedule = Schedule.of(settings)
        self._ttl = timedelta(seconds=settings.connect_session_ttl_seconds)

    async def mint(self, end_user_id: str, return_to: str | None) -> MintedConnectSession:
        token = CONNECT_SESSION_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        expires_at = now + self._ttl
        async with self._sessionmaker() as db, db.begin():
            sessions = ConnectSessionRepository(db)
            await sessions.delete_expired(now)
            await sessions.add(
                ConnectSession(
                    token_hash=digest(token),
                    end_user_id=end_user_id,
                    return_to=return_to,
                    expires_at=expires_at,
                )
            )
        connect_url = f"{self._settings.login_url}?{urlencode({'connect_session': token})}"
        return MintedConnectSession(token=token, connect_url=connect_url, expires_at=expires_at)

    async def confirm(self, result: str, end_user_id: str) -> Connection:
        """The connection a connect session's login made, now serving `end_user_id`.

        InvalidConnectResult for an unknown, used or expired result. ConnectResultMismatch
        when `end_user_id` is not the one the connect session was minted for: the result
        is burnt and what the login made is discarded in the same transaction (a new
        connection with its tokens; a reconnect's waiting tokens), before the answer.
        """
        if len(result) != CONNECT_RESULT_LENGTH or not result.startswith(CONNECT_RESULT_PREFIX):
            raise InvalidConnectResult()
        result_hash = digest(result)
        for attempt in range(CONFIRM_ATTEMPTS):
            try:
                async with self._sessionmaker() as db, db.begin():
                    outcome = await self._confirm(db, result_hash, end_user_id)
            except StaleDataError:
                # A refresh or login of the same row committed first: read it again (the
                # rollback also put the burnt result back).
                if attempt == CONFIRM_ATTEMPTS - 1:
                    raise
                continue
            if outcome is None:
                raise ConnectResultMismatch()
            # The renewed row (a higher version) replaces a cached reauthorization_required
            # one now, not when the cache entry expires.
            self._cache.remember_connection(outcome)
            return outcome
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _confirm(
        self, db: AsyncSession, result_hash: str, end_user_id: str
    ) -> Connection | None:
        """Burn the result and act on it; None (committed) for a mismatch."""
        now = datetime.now(UTC)
        pending = await ConnectResultRepository(db).consume(result_hash, now)
        if pending is None:
            raise InvalidConnectResult()
        connections = ConnectionRepository(db)
        connection = await connections.get_by_id(pending.connection_id)
        if connection is None:  # deleted meanwhile: its results went with it
            raise InvalidConnectResult()
        if pending.end_user_id != end_user_id:
            if connection.status is ConnectionStatus.PENDING:
                # Its tokens (and any other result of it) go with it; nobody ever saw it.
                await connections.delete(connection)
            # A reconnect's waiting tokens lived only in the result, burnt above.
            return None
        access_token, expires_at = pending.access_token_encrypted, pending.access_token_expires_at
        if access_token is not None and expires_at is not None:
            # A reconnect: the row served its old tokens until now.
            was_usable = connection.status is ConnectionStatus.ACTIVE
            connection.username = pending.username or connection.username
            if pending.scopes is not None:
                connection.scopes = pending.scopes
            connection.access_token_encrypted = access_token
            connection.access_token_expires_at = expires_at
            # A new login's refresh token replaces the old one even if Pinterest sent none.
            connection.refresh_token_encrypted = pending.refresh_token_encrypted
            connection.refresh_token_expires_at = pending.refresh_token_expires_at
            connection.last_refreshed_at = now
            connection.status = ConnectionStatus.ACTIVE
            await db.flush()
            # As for a browser's login: a connection that needed a new login and got one
            # has recovered, and the app can stop telling its user to reconnect.
            event = EventType.UPDATED if was_usable else EventType.RECOVERED
            await record_event(db, event, connection, schedule=self._schedule)
        elif connection.status is ConnectionStatus.PENDING:
            connection.status = ConnectionStatus.ACTIVE
            await db.flush()
            await record_event(db, EventType.CREATED, connection, schedule=self._schedule)
        # Else another result of the same login attempt confirmed it already.
        return connection
