"""Lifecycle webhooks: a durable outbox, signed deliveries, and verification for receivers.

An event is a row written in the same transaction as the change it reports (`record_event`),
so a change is never committed without its event, nor an event without its change. A
dispatcher in each `pinauth serve` process delivers the outbox afterwards, at least once.
"""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncSession

from pinauth.api.schemas import ConnectionObject
from pinauth.models import Connection, WebhookEvent, new_event_id
from pinauth.repository import WebhookEventRepository

SIGNATURE_HEADER = "Pinauth-Signature"
EVENT_ID_HEADER = "Pinauth-Event-Id"


class EventType(enum.StrEnum):
    CREATED = "connection.created"
    UPDATED = "connection.updated"
    REAUTHORIZATION_REQUIRED = "connection.reauthorization_required"
    RECOVERED = "connection.recovered"
    DELETED = "connection.deleted"
    EXPIRING = "connection.expiring"


# What the connection object is built from; a row fresh from an INSERT or UPDATE has some
# of them expired (server defaults, onupdate) and they are read back in the transaction.
_SHOWN = (frozenset(ConnectionObject.model_fields) - {"id"}) | {"public_id"}


async def record_event(
    session: AsyncSession,
    event_type: EventType | str,
    connection: Connection,
    *,
    now: datetime | None = None,
) -> WebhookEvent:
    """Add an outbox row reporting `event_type` for `connection`, in the caller's transaction.

    Call it after the change is flushed, in the same transaction, and let the caller commit:
    on PostgreSQL the row lock of the change then orders the events of one connection by
    id in commit order. `connection` must be attached to `session` (or deleted in it, or
    fully loaded). The body is the /v1 connection object: never a token.
    """
    event_type = EventType(event_type)
    state = inspect(connection)
    if state.persistent and _SHOWN & (state.unloaded | state.expired_attributes):
        await session.refresh(connection)
    created_at = (now or datetime.now(UTC)).astimezone(UTC)
    public_id = new_event_id()
    body = {
        "id": public_id,
        "type": event_type.value,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "data": {"connection": ConnectionObject.of(connection).model_dump(mode="json")},
    }
    return await WebhookEventRepository(session).add(
        WebhookEvent(
            public_id=public_id,
            type=event_type.value,
            connection_id=connection.public_id,
            body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
            created_at=created_at,
            next_attempt_at=created_at,
            attempts=0,
        )
    )
