"""/v1: the app's backend (API key): connect sessions and the connections API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status

from pinauth.api.deps import ServicesDep, require_api_key
from pinauth.api.schemas import (
    ConnectionObject,
    ConnectionPage,
    ConnectResultConfirmRequest,
    ConnectSessionRequest,
    ConnectSessionResponse,
    EndUserId,
    ProxyTokenRequest,
    ProxyTokenResponse,
    error_responses,
)
from pinauth.errors import (
    ConnectionNotFound,
    ConnectResultMismatch,
    DatabaseUnavailable,
    InvalidApiKey,
    InvalidConnectResult,
    InvalidCursor,
    PinauthError,
    ProxyTokenNotAllowed,
    ProxyTokenNotFound,
    UnprocessableRequest,
)
from pinauth.models import ConnectionStatus
from pinauth.schedule import next_refresh_at

router = APIRouter(
    prefix="/v1",
    tags=["backend"],
    dependencies=[Depends(require_api_key)],
)

# What every route here can answer (not router-level `responses`: a route's own entry for
# a status would replace the router's, dropping its examples).
BACKEND_ERRORS: tuple[type[PinauthError], ...] = (
    InvalidApiKey,
    ProxyTokenNotAllowed,
    DatabaseUnavailable,
)

# Public ids are URL-safe; anything else (a NUL, which PostgreSQL refuses in text and
# answered 500) is not an id at all.
PUBLIC_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
ConnectionId = Annotated[
    str,
    Path(max_length=64, pattern=PUBLIC_ID_PATTERN, description="The connection's public id."),
]
ProxyTokenId = Annotated[
    str,
    Path(max_length=64, pattern=PUBLIC_ID_PATTERN, description="The proxy token's id (pt_…)."),
]


@router.post(
    "/connect-sessions",
    status_code=status.HTTP_201_CREATED,
    response_model=ConnectSessionResponse,
    responses=error_responses(*BACKEND_ERRORS, UnprocessableRequest),
)
async def create_connect_session(
    services: ServicesDep, body: ConnectSessionRequest
) -> ConnectSessionResponse:
    """Let one browser link a Pinterest account to `end_user_id`: send it to `connect_url`."""
    if body.return_to is not None and not services.auth.is_trusted_destination(body.return_to):
        raise UnprocessableRequest(
            "return_to must be a relative path or an origin in PINAUTH_CORS_ORIGINS "
            "(or the frontend's own)."
        )
    minted = await services.connect_sessions.mint(body.end_user_id, body.return_to)
    return ConnectSessionResponse(
        token=minted.token, connect_url=minted.connect_url, expires_at=minted.expires_at
    )


@router.post(
    "/connections/confirm",
    response_model=ConnectionObject,
    responses={
        200: {
            "description": "Confirmed: the connection, now `active` (`connection.created` "
            "sent), or renewed with the new login's tokens for a reconnect."
        },
        **error_responses(
            *BACKEND_ERRORS, InvalidConnectResult, ConnectResultMismatch, UnprocessableRequest
        ),
    },
)
async def confirm_connection(
    services: ServicesDep, body: ConnectResultConfirmRequest
) -> ConnectionObject:
    """Confirm a connect session's login for the end user logged in to your app.

    The browser comes back to the connect session's return_to with
    `?pinauth_connect_result=…`; send that value with the end user logged in to your app in
    that browser. The connection counts only then: until confirmed it is `pending` (not
    listed unless asked for, not proxied, no proxy token, no webhook; a reconnect keeps
    serving its old tokens). For another end user than the connect session's, the answer
    is `403 connect_result_mismatch` and what the login made is discarded: whoever
    completed the link was not your logged-in user.
    """
    connection = await services.connect_sessions.confirm(body.result, body.end_user_id)
    return ConnectionObject.of(
        connection, next_refresh_at=next_refresh_at(connection, services.settings)
    )


@router.get(
    "/connections",
    response_model=ConnectionPage,
    responses=error_responses(*BACKEND_ERRORS, InvalidCursor, UnprocessableRequest),
)
async def list_connections(
    services: ServicesDep,
    end_user_id: Annotated[EndUserId | None, Query()] = None,
    connection_status: Annotated[ConnectionStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[
        str | None,
        Query(description="`next_cursor` of the previous page, with the same filters."),
    ] = None,
) -> ConnectionPage:
    """Connections, oldest first, optionally of one end user or in one status.

    Pending connections (awaiting POST /v1/connections/confirm) are listed only with
    `status=pending`."""
    rows, next_cursor = await services.connections.page(
        limit=limit, cursor=cursor, end_user_id=end_user_id, status=connection_status
    )
    items = [
        ConnectionObject.of(c, next_refresh_at=next_refresh_at(c, services.settings)) for c in rows
    ]
    return ConnectionPage(items=items, next_cursor=next_cursor)


@router.get(
    "/connections/{connection_id}",
    response_model=ConnectionObject,
    responses=error_responses(*BACKEND_ERRORS, ConnectionNotFound, UnprocessableRequest),
)
async def get_connection(services: ServicesDep, connection_id: ConnectionId) -> ConnectionObject:
    """One connection (never its tokens)."""
    connection = await services.connections.read(connection_id)
    return ConnectionObject.of(
        connection, next_refresh_at=next_refresh_at(connection, services.settings)
    )


@router.delete(
    "/connections/{connection_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(*BACKEND_ERRORS, ConnectionNotFound, UnprocessableRequest),
)
async def delete_connection(services: ServicesDep, connection_id: ConnectionId) -> Response:
    """Delete the connection's tokens and end its browser sessions."""
    await services.connections.delete(connection_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/connections/{connection_id}/proxy-tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=ProxyTokenResponse,
    responses=error_responses(*BACKEND_ERRORS, ConnectionNotFound, UnprocessableRequest),
)
async def create_proxy_token(
    services: ServicesDep,
    connection_id: ConnectionId,
    body: ProxyTokenRequest | None = None,
) -> ProxyTokenResponse:
    """A token acting for this connection on /pinterest and /boards only, until it expires."""
    ttl = (body or ProxyTokenRequest()).ttl_seconds
    minted = await services.proxy_tokens.mint(connection_id, ttl)
    return ProxyTokenResponse(id=minted.id, token=minted.token, expires_at=minted.expires_at)


@router.delete(
    "/connections/{connection_id}/proxy-tokens/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(
        *BACKEND_ERRORS, ConnectionNotFound, ProxyTokenNotFound, UnprocessableRequest
    ),
)
async def revoke_proxy_token(
    services: ServicesDep, connection_id: ConnectionId, token_id: ProxyTokenId
) -> Response:
    """Revoke one of the connection's proxy tokens: refused at once by this process, and
    by every other within PINAUTH_CACHE_TTL."""
    await services.proxy_tokens.revoke(connection_id, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/connections/{connection_id}/proxy-tokens",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(*BACKEND_ERRORS, ConnectionNotFound, UnprocessableRequest),
)
async def revoke_proxy_tokens(services: ServicesDep, connection_id: ConnectionId) -> Response:
    """Revoke every proxy token of the connection (the connection itself stays), as one
    revocation each."""
    await services.proxy_tokens.revoke_all(connection_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
