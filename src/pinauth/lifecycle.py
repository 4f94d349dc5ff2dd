"""Lifecycle events about a connection, recorded in the caller's transaction.

The one place the keeper, key rotation and the token manager report that a connection
became unusable or is about to: the event is written to the webhook outbox (webhooks.py)
in the same transaction as the change it reports, and delivered from there.
"""

from __future__ import annotations

import logging
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from pinauth.models import Connection

log = logging.getLogger(__name__)

EventType = Literal["connection.reauthorization_required", "connection.expiring"]


async def record_connection_event(
    db: AsyncSession, event_type: EventType, connection: Connection
) -> None:
    """Record `event_type` for `connection` in `db`'s transaction (the caller commits)."""
    # Until the webhook outbox (branch h-webhooks) is merged, the event is only logged.
    log.info("%s: connection %s", event_type, connection.public_id)
