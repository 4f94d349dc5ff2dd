"""Response bodies, typed so /docs shows exactly what clients get."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pinauth.errors import (
    PayloadTooLarge,
    PinauthError,
    ReauthorizationRequired,
    ShuttingDown,
    UnprocessableRequest,
)
from pinauth.models import (
    Connection,
    ConnectionStatus,
    ConnectionSummary,
    WebhookEvent,
    WebhookEventStatus,
)


class ErrorResponse(BaseModel):
    """pinauth's own error; `error` is a stable code, `message` a sentence for people."""

    error: str = Field(examples=["not_authenticated"])
    message: str = Field(examples=["No valid session: connect a Pinterest account first."])
    login_url: str | None = Field(
        None, description="Where to send the user to log in again (reauthorization_required)."
    )
    connect_session_url: str | None = Field(
        None,
        description="With an API key, reauthorization_required: where the backend creates a "
        "connect session for the end user to reconnect.",
    )
    end_user_id: str | None = Field(
        None, description="With an API key, reauthorization_required: the connection's end user."
    )


class PinterestErrorResponse(BaseModel):
    """Pinterest's own error body, passed through unchanged."""

    code: int = Field(examples=[2])
    message: str = Field(examples=["Authentication failed."])


class MeResponse(BaseModel):
    connection_id: str = Field(description="The connection's public id.")
    pinterest_user_id: str
    username: str
    scopes: list[str]
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    status: ConnectionStatus


class RefreshResponse(BaseModel):
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None


class BoardsPage(BaseModel):
    items: list[dict[str, Any]] = Field(description="Boards in Pinterest's own shape.")
    bookmark: str | None = Field(
        None, description="Pass back as `bookmark` for the next page; null on the last page."
    )


# Routes acting for a browser's session cookie (the scheme is declared in api/docs.py).
COOKIE_SECURITY: dict[str, Any] = {"security": [{"sessionCookie": []}]}
# Routes that take either: the app backend's API key, or a browser's cookie.
API_KEY_OR_COOKIE: list[dict[str, list[str]]] = [{"apiKey": []}, {"sessionCookie": []}]

RETRY_AFTER_HEADER: dict[str, Any] = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer", "minimum": 1},
}

# A request that fails validation (query, path, header or body) is answered like this.
VALIDATION_EXAMPLE = {
    "error": "invalid_request",
    "message": "Invalid request: query.limit: Input should be less than or equal to 100",
}


def _example(error: type[PinauthError]) -> dict[str, Any]:
    value: dict[str, Any] = {"error": error.code, "message": error.default_message}
    if issubclass(error, ReauthorizationRequired):
        value["login_url"] = "https://pinauth.example.com/auth/login"
    if issubclass(error, UnprocessableRequest):
        value = VALIDATION_EXAMPLE
    return {"summary": error.code, "value": value}


def error_responses(
    *errors: type[PinauthError], pinterest: Iterable[int] = ()
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the pinauth errors a route can raise.

    One entry per status, with an example per error code (tests/test_openapi_errors.py
    checks the list against the code). Every route can also be cut short by a shutdown,
    and refuse a body over its limit (api/body_limit.py; the proxy's own limit otherwise).
    `pinterest`: statuses where Pinterest's own error body may come instead.
    """
    by_status: dict[int, list[type[PinauthError]]] = {}
    every: dict[type[PinauthError], None] = dict.fromkeys((*errors, PayloadTooLarge, ShuttingDown))
    for error in every:
        by_status.setdefault(error.status_code, []).append(error)
    relayed = set(pinterest)
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(by_status.keys() | relayed):
        group = by_status.get(status, [])
        examples = {e.code: _example(e) for e in group}
        codes = ", ".join(f"`{code}`" for code in examples)
        if group and status in relayed:
            description = f"pinauth's {codes}, or Pinterest's own error passed through."
            examples["pinterest"] = {
                "summary": "Pinterest's error",
                "value": {"code": 2, "message": "Authentication failed."},
            }
            schema: dict[str, Any] = {
                "oneOf": [
                    {"$ref": "#/components/schemas/ErrorResponse"},
                    {"$ref": "#/components/schemas/PinterestErrorResponse"},
                ]
            }
            entry: dict[str, Any] = {"description": description}
        elif group:
            entry = {"model": ErrorResponse, "description": f"pinauth error: {codes}."}
            schema = {}
        else:
            entry = {
                "model": PinterestErrorResponse,
                "description": "Pinterest's own error, passed through unchanged.",
            }
            schema = {}
        content: dict[str, Any] = {"examples": examples} if examples else {}
        if schema:
            content["schema"] = schema
        if content:
            entry["content"] = {"application/json": content}
        if status == 429 or any(e.sends_retry_after for e in group):
            entry["headers"] = {"Retry-After": RETRY_AFTER_HEADER}
        responses[status] = entry
    return responses


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must contain printable characters only")
    return value


EndUserId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=255,
        description="Your app's own id for the user (1-255 printable characters).",
        examples=["user_42"],
    ),
    AfterValidator(_printable),
]


class ConnectSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end_user_id: EndUserId
    return_to: str | None = Field(
        None,
        max_length=2048,
        description="Where the browser lands after consent: a relative path or an allowed "
        "origin (default PINAUTH_FRONTEND_URL).",
    )


class ConnectSessionResponse(BaseModel):
    token: str = Field(description="Single use; shown once.")
    connect_url: str = Field(description="Send the end user's browser here.")
    expires_at: datetime


class ConnectResultConfirmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    result: str = Field(
        min_length=1,
        max_length=256,
        description="The `pinauth_connect_result` the browser came back to return_to with.",
        examples=["pinauth_cr_…"],
    )
    end_user_id: EndUserId = Field(
        description="The end user logged in to your app in the browser that came back; "
        "must be the connect session's."
    )


class ConnectionObject(BaseModel):
    id: str = Field(examples=["conn_6kq3w2rj5vb4oj2y5c7nbb3xqe"])
    end_user_id: str | None = Field(
        description="Your user who linked it; null for logins without a connect session."
    )
    pinterest_user_id: str
    username: str
    scopes: list[str]
    status: ConnectionStatus
    created_at: datetime
    updated_at: datetime
    last_refreshed_at: datetime | None
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    next_refresh_at: datetime | None = Field(
        None,
        description="When the keeper next refreshes it, before its refresh token expires "
        "(null if it needs a new login).",
    )

    @classmethod
    def of(
        cls, connection: Connection | ConnectionSummary, *, next_refresh_at: datetime | None = None
    ) -> ConnectionObject:
        return cls(
            next_refresh_at=next_refresh_at,
            id=connection.public_id,
            end_user_id=connection.end_user_id,
            pinterest_user_id=connection.pinterest_user_id,
            username=connection.username,
            scopes=connection.scope_list,
            status=connection.status,
            created_at=connection.created_at,
            updated_at=connection.updated_at,
            last_refreshed_at=connection.last_refreshed_at,
            access_token_expires_at=connection.access_token_expires_at,
            refresh_token_expires_at=connection.refresh_token_expires_at,
        )


class ConnectionPage(BaseModel):
    items: list[ConnectionObject]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class ProxyTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_seconds: int = Field(
        3600,
        ge=1,
        le=86400,
        strict=True,
        description="How long the token lives, in seconds (1 to 86400; default 3600).",
    )


class ProxyTokenResponse(BaseModel):
    id: str = Field(
        examples=["pt_3mzq7c2hk4xw5v6n7p8r9s2t3u"],
        description="Names the token to revoke it: "
        "DELETE /v1/connections/{id}/proxy-tokens/{token_id}.",
    )
    token: str = Field(
        description="Send as `Authorization: Bearer <token>` to /pinterest/{path} and /boards; "
        "acts for this connection only. Shown once."
    )
    expires_at: datetime


class WebhookAttemptObject(BaseModel):
    attempted_at: datetime
    duration_ms: int
    response_code: int | None = Field(description="The receiver's status; null if none came.")
    outcome: Literal["delivered", "retry", "failed"]
    error: str | None


class WebhookEventObject(BaseModel):
    id: str = Field(examples=["evt_3mzq7c2hk4xw5v6n7p8r9s2t3u"])
    type: str = Field(examples=["connection.reauthorization_required"])
    connection_id: str
    status: WebhookEventStatus
    attempts: int = Field(description="Delivery attempts so far.")
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When it goes next (pending only).")
    delivered_at: datetime | None
    last_error: str | None

    @classmethod
    def of(cls, event: WebhookEvent) -> WebhookEventObject:
        pending = event.status is WebhookEventStatus.PENDING
        return cls(
            id=event.public_id,
            type=event.type,
            connection_id=event.connection_id,
            status=event.status,
            attempts=event.attempts,
            created_at=event.created_at,
            next_attempt_at=event.next_attempt_at if pending else None,
            delivered_at=event.delivered_at,
            last_error=event.last_error,
        )


class WebhookEventDetail(WebhookEventObject):
    payload: dict[str, Any] = Field(description="The body as sent (and signed).")
    delivery_attempts: list[WebhookAttemptObject]


class WebhookEventPage(BaseModel):
    items: list[WebhookEventObject]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
