"""/healthz, /readyz and /metrics: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Header, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from pinauth.api.deps import ServicesDep
from pinauth.api.schemas import error_responses
from pinauth.errors import (
    DatabaseUnavailable,
    NotAuthenticated,
    NotReady,
    PinterestClientRejected,
)
from pinauth.models import ConnectionStatus
from pinauth.repository import ConnectionRepository, SchemaRepository

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str


class Readiness(Health):
    # Only while Pinterest refuses the app's client credentials (status "degraded").
    error: str | None = None
    message: str | None = None
    since: datetime | None = None


@router.get("/healthz", response_model=Health, responses=error_responses())
async def healthz() -> Health:
    """Liveness: the process is up and serving (no I/O)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses=error_responses(NotReady),
)
async def readyz(services: ServicesDep) -> Readiness:
    """Readiness: the database answers and its schema is at the version this code expects.

    While Pinterest refuses the app's client credentials, still 200 but `"status":
    "degraded"` with `"error": "pinterest_client_rejected"`: every replica shares the
    credentials, so a 503 would take them all out of the load balancer at once, while calls
    whose access tokens are still valid go on working.
    """
    try:
        async with services.sessionmaker() as db:
            version = await SchemaRepository(db).version()
    except Exception as e:  # any failure to reach the database means "not ready"
        raise NotReady("The database is unreachable.") from e
    if version != services.schema_head:
        raise NotReady(
            f"The database schema is at {version or 'nothing'}, not {services.schema_head}: "
            "run `pinauth migrate`."
        )
    client = services.tokens.client_credentials
    if client.rejected:
        return Readiness(
            status="degraded",
            error=PinterestClientRejected.code,
            message=(
                "Pinterest refuses this app's client credentials (PINTEREST_CLIENT_ID / "
                "PINTEREST_CLIENT_SECRET): calls that need a token refresh answer 503 "
                "pinterest_client_rejected; no connection is changed."
            ),
            since=client.rejected_since,
        )
    return Readiness(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}},
        **error_responses(NotAuthenticated, DatabaseUnavailable),
    },
)
async def metrics(
    services: ServicesDep, authorization: Annotated[str | None, Header()] = None
) -> Response:
    """Prometheus metrics: requests, upstream latency, token refreshes, connections."""
    expected = services.settings.metrics_token.get_secret_value()
    if expected and not secrets.compare_digest(authorization or "", f"Bearer {expected}"):
        raise NotAuthenticated(
            "GET /metrics needs the bearer token configured in PINAUTH_METRICS_TOKEN."
        )
    async with services.sessionmaker() as db:
        counts = await ConnectionRepository(db).count_by_status()
    for status in ConnectionStatus:
        services.metrics.connections.labels(status.value).set(counts.get(status, 0))
    # Rendering walks every series: in a worker thread, so a scrape never stalls the loop.
    body = await anyio.to_thread.run_sync(generate_latest, services.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
