"""/v1/webhook-events: the app's backend (API key) reads the outbox and asks for redelivery."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, status

from pinauth.api.deps import ServicesDep, require_api_key
from pinauth.api.schemas import (
    WebhookAttemptObject,
    WebhookEventDetail,
    WebhookEventObject,
    WebhookEventPage,
    error_responses,
)
from pinauth.api.v1 import BACKEND_ERRORS, PUBLIC_ID_PATTERN
from pinauth.errors import InvalidCursor, UnprocessableRequest, WebhookEventNotFound
from pinauth.models import WebhookEventStatus
from pinauth.webhooks import EventDetail

router = APIRouter(
    prefix="/v1/webhook-events",
    tags=["backend"],
    dependencies=[Depends(require_api_key)],
)

EventId = Annotated[
    str,
    Path(max_length=64, pattern=PUBLIC_ID_PATTERN, description="The event's id (evt_…)."),
]


def _detail(found: EventDetail) -> WebhookEventDetail:
    return WebhookEventDetail(
        **WebhookEventObject.of(found.event).model_dump(),
        payload=json.loads(found.event.body),
        delivery_attempts=[
            WebhookAttemptObject(
                attempted_at=a.attempted_at,
                duration_ms=a.duration_ms,
                response_code=a.response_code,
                outcome=a.outcome,
                error=a.error,
            )
            for a in found.attempts
        ],
    )


@router.get(
    "",
    response_model=WebhookEventPage,
    responses=error_responses(*BACKEND_ERRORS, InvalidCursor, UnprocessableRequest),
)
async def list_webhook_events(
    services: ServicesDep,
    event_status: Annotated[WebhookEventStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[
        str | None,
        Query(description="`next_cursor` of the previous page, with the same filters."),
    ] = None,
) -> WebhookEventPage:
    """Webhook events, newest first, optionally in one status (e.g. `failed`)."""
    rows, next_cursor = await services.webhook_events.page(
        limit=limit, cursor=cursor, status=event_status
    )
    return WebhookEventPage(items=[WebhookEventObject.of(e) for e in rows], next_cursor=next_cursor)


@router.get(
    "/{event_id}",
    response_model=WebhookEventDetail,
    responses=error_responses(*BACKEND_ERRORS, WebhookEventNotFound, UnprocessableRequest),
)
async def get_webhook_event(services: ServicesDep, event_id: EventId) -> WebhookEventDetail:
    """One event: its body as sent and every delivery attempt."""
    return _detail(await services.webhook_events.get(event_id))


@router.post(
    "/{event_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WebhookEventDetail,
    responses=error_responses(*BACKEND_ERRORS, WebhookEventNotFound, UnprocessableRequest),
)
async def redeliver_webhook_event(services: ServicesDep, event_id: EventId) -> WebhookEventDetail:
    """Deliver the event again, now, with a new 24-hour retry window."""
    return _detail(await services.webhook_events.redeliver(event_id))
