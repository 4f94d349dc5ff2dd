"""When the keeper refreshes a connection: what the keeper acts on and what the API and
webhook bodies show as `next_refresh_at` (PINAUTH_KEEPALIVE_DAYS, with per-connection
jitter)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from pinauth.models import Connection, ConnectionStatus, ConnectionSummary
from pinauth.settings import Settings

# Connections made together are spread over this long (at most half the window).
MAX_SPREAD = timedelta(days=1)


def jitter_fraction(public_id: str) -> float:
    """A fixed pseudo-random number in [0, 1) per connection (its id is random)."""
    digest = hashlib.sha256(public_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True, slots=True)
class Schedule:
    """When connections are due, from PINAUTH_KEEPALIVE_DAYS."""

    window: timedelta
    spread: timedelta

    @classmethod
    def of(cls, settings: Settings) -> Schedule:
        window = timedelta(days=settings.keepalive_days)
        return cls(window=window, spread=min(MAX_SPREAD, window / 2))

    def due_at(self, connection: Connection | ConnectionSummary) -> datetime | None:
        """When the keeper refreshes the connection (None: never, it cannot be refreshed).

        Always at or before its refresh token enters the window: the jitter only ever
        makes it earlier.
        """
        expires = connection.refresh_token_expires_at
        if expires is None:
            return None
        return expires - self.window - self.spread * jitter_fraction(connection.public_id)

    def next_refresh_at(self, connection: Connection | ConnectionSummary) -> datetime | None:
        """What the API shows: the due time, or later if the keeper is backing off."""
        if connection.status is not ConnectionStatus.ACTIVE:
            return None
        due = self.due_at(connection)
        if due is None:
            return None
        later = connection.keeper_not_before
        return later if later is not None and later > due else due

    def horizon(self, now: datetime) -> datetime:
        """Rows whose refresh token expires by this may be due now."""
        return now + self.window + self.spread


def next_refresh_at(
    connection: Connection | ConnectionSummary, settings: Settings
) -> datetime | None:
    return Schedule.of(settings).next_refresh_at(connection)
