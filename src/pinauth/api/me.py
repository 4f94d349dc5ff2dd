"""/me: the connected Pinterest account, without its tokens."""

from __future__ import annotations

from fastapi import APIRouter

from pinauth.api.deps import CurrentConnection
from pinauth.api.schemas import COOKIE_SECURITY, MeResponse, error_responses
from pinauth.errors import (
    AmbiguousSession,
    DatabaseUnavailable,
    NotAuthenticated,
    ProxyTokenNotAllowed,
)

router = APIRouter(tags=["account"])


@router.get(
    "/me",
    response_model=MeResponse,
    responses=error_responses(
        NotAuthenticated, AmbiguousSession, ProxyTokenNotAllowed, DatabaseUnavailable
    ),
    openapi_extra=COOKIE_SECURITY,
)
async def me(connection: CurrentConnection) -> MeResponse:
    """The Pinterest account connected to this session."""
    return MeResponse(
        connection_id=connection.public_id,
        pinterest_user_id=connection.pinterest_user_id,
        username=connection.username,
        scopes=connection.scope_list,
        access_token_expires_at=connection.access_token_expires_at,
        refresh_token_expires_at=connection.refresh_token_expires_at,
        status=connection.status,
    )
