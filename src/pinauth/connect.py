"""Connect sessions: a backend lets one browser link a Pinterest account to an end user.

The backend mints one (API key), hands its `connect_url` to the browser, and the browser's
`/auth/login` consumes it (see AuthService.start_login): single use, short-lived, stored
only as a hash.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.crypto import digest
from pinauth.errors import InvalidConnectSession
from pinauth.models import ConnectSession
from pinauth.repository import ConnectSessionRepository
from pinauth.settings import Settings

CONNECT_SESSION_PREFIX = "pinauth_cs_"
MAX_TOKEN_LENGTH = 128


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
    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]):
        self._settings = settings
        self._sessionmaker = sessionmaker
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
