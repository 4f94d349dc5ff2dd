"""Errors pinauth raises, each knowing the HTTP status and code it is rendered with.

Every error the service itself makes reaches the client as
`{"error": "<code>", "message": "<sentence>"}`; one exception handler in `app.py`
renders them, so routers and services just raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pinauth.models import Connection


class ConfigurationError(Exception):
    """The settings cannot run a safe service; the message says what to fix."""


class PinauthError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "Something went wrong inside pinauth."
    # Whether responses carry Retry-After (documented in /docs; test_openapi_errors checks).
    sends_retry_after: ClassVar[bool] = False

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(self.message)

    def body(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, **self.extra}


class NotAuthenticated(PinauthError):
    status_code = 401
    code = "not_authenticated"
    default_message = "No valid session: connect a Pinterest account through /auth/login first."


class InvalidState(PinauthError):
    status_code = 400
    code = "invalid_state"
    default_message = "The login could not be verified; start again from /auth/login."


class AmbiguousSession(PinauthError):
    """Two cookies of one name: whichever is served, one was set by someone else."""

    status_code = 400
    code = "ambiguous_session"
    default_message = (
        "The request carries more than one pinauth session or login cookie: another site "
        "(a sibling subdomain) may have set one. Clear this site's cookies and log in again."
    )


class AccessDenied(PinauthError):
    status_code = 403
    code = "access_denied"
    default_message = "The Pinterest account owner did not grant access."


class AuthorizationFailed(PinauthError):
    status_code = 400
    code = "authorization_failed"
    default_message = "Pinterest did not complete the authorization."


class InvalidRequest(PinauthError):
    status_code = 400
    code = "invalid_request"
    default_message = "The request is missing or has malformed parameters."


class UnprocessableRequest(InvalidRequest):
    """Well-formed but unacceptable input; the message names the field."""

    status_code = 422


class InvalidCursor(PinauthError):
    status_code = 400
    code = "invalid_cursor"
    default_message = (
        "This cursor was not issued by this listing with these filters, or is older than "
        "24 hours; list again without it."
    )


class PayloadTooLarge(PinauthError):
    status_code = 413
    code = "payload_too_large"
    default_message = "The request body is larger than this service accepts."


class RequestHeadTooLarge(PinauthError):
    status_code = 431
    code = "request_header_too_large"
    default_message = "The request line and headers are larger than this service accepts."


class RequestTimeout(PinauthError):
    status_code = 408
    code = "request_timeout"
    default_message = "The request did not arrive in time."


class NotReady(PinauthError):
    status_code = 503
    code = "not_ready"
    default_message = "pinauth cannot serve requests yet."


class ForbiddenOrigin(PinauthError):
    status_code = 403
    code = "forbidden_origin"
    default_message = "This request's Origin is not allowed to act on the session."


class ReauthorizationRequired(PinauthError):
    status_code = 401
    code = "reauthorization_required"
    default_message = (
        "Pinterest no longer accepts this connection's tokens; the user must log in again."
    )

    def __init__(self, login_url: str, message: str | None = None) -> None:
        super().__init__(message, extra={"login_url": login_url})


class UndecryptableToken(ReauthorizationRequired):
    """No configured key decrypts the connection's access token.

    Carries the row so the token manager can mark it reauthorization_required (once).
    """

    def __init__(self, login_url: str, connection: Connection) -> None:
        super().__init__(login_url)
        self.connection = connection


class UpstreamError(PinauthError):
    status_code = 502
    code = "upstream_error"
    default_message = "Pinterest could not be reached or answered with an error."


class UpstreamUnavailable(UpstreamError):
    """Pinterest (or the lock guarding a refresh) is busy; the client should retry later."""

    status_code = 503
    sends_retry_after = True
    default_message = "Pinterest is temporarily unavailable; retry later."

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = retry_after


class PinterestClientRejected(PinauthError):
    """Pinterest's token endpoint refuses this app's own client credentials
    (PINTEREST_CLIENT_ID / PINTEREST_CLIENT_SECRET), so no token can be refreshed.

    Nothing about the connection is wrong: it is not marked, and the call can be retried
    once the credentials are fixed. Deliberately not an UpstreamError, which the refresh
    path handles per connection.
    """

    status_code = 503
    sends_retry_after = True
    code = "pinterest_client_rejected"
    default_message = (
        "Pinterest refuses this app's client credentials (PINTEREST_CLIENT_ID / "
        "PINTEREST_CLIENT_SECRET), so tokens cannot be refreshed; no connection was changed. "
        "Retry later."
    )

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)


class UpstreamTimeout(PinauthError):
    status_code = 504
    code = "upstream_timeout"
    default_message = "Pinterest did not answer in time."


class NotConfigured(PinauthError):
    status_code = 503
    code = "not_configured"
    default_message = (
        "PINTEREST_CLIENT_ID and PINTEREST_CLIENT_SECRET are not set, so pinauth cannot "
        "send anyone to Pinterest."
    )


class InvalidApiKey(PinauthError):
    status_code = 401
    code = "invalid_api_key"
    default_message = (
        "This route needs a valid API key as `Authorization: Bearer <key>`; create one with "
        "`pinauth api-keys create --name NAME`."
    )

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InvalidConnectSession(PinauthError):
    status_code = 400
    code = "invalid_connect_session"
    default_message = (
        "This connect session is unknown, expired or already used; ask the app for a new "
        "one (POST /v1/connect-sessions)."
    )


class InvalidConnectResult(PinauthError):
    status_code = 400
    code = "invalid_connect_result"
    default_message = (
        "This connect result is unknown, expired or already used; the end user has to "
        "connect again through a new connect session."
    )


class ConnectResultMismatch(PinauthError):
    """A connect result confirmed for another end user than its connect session's."""

    status_code = 403
    code = "connect_result_mismatch"
    default_message = (
        "This connect result belongs to a connect session minted for another end user; "
        "its connection was discarded, and nothing was linked to anyone."
    )


class ConnectionNotFound(PinauthError):
    status_code = 404
    code = "connection_not_found"
    default_message = "No connection has that id."


class ConnectionIdRequired(PinauthError):
    status_code = 400
    code = "connection_id_required"
    default_message = (
        "With an API key, name the connection to act for in the Pinauth-Connection-Id header."
    )


class ConnectionIdAmbiguous(PinauthError):
    status_code = 400
    code = "ambiguous_connection_id"
    default_message = (
        "The request names more than one connection in Pinauth-Connection-Id headers; "
        "send exactly one."
    )


class DatabaseUnavailable(PinauthError):
    """The database cannot be reached or refuses work; nothing about the request is wrong."""

    status_code = 503
    sends_retry_after = True
    code = "database_unavailable"
    default_message = "pinauth's database is unavailable at the moment; retry later."

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class Busy(PinauthError):
    """This process holds as many proxied request bodies as it may (in bytes) right now."""

    status_code = 503
    sends_retry_after = True
    code = "busy"
    default_message = (
        "pinauth is holding as many request bodies as it may at the moment; retry shortly."
    )

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class ShuttingDown(PinauthError):
    """The process stopped before this request finished (its shutdown timeout ran out)."""

    status_code = 503
    sends_retry_after = True
    code = "shutting_down"
    default_message = (
        "pinauth was shutting down and stopped this request before it finished; retry it "
        "(a request that changes something may already have taken effect)."
    )

    def __init__(self, *, retry_after: int = 5) -> None:
        # Connection: close, so the client's retry opens a connection to a live process.
        super().__init__(headers={"Retry-After": str(max(1, retry_after)), "Connection": "close"})


class InvalidProxyToken(PinauthError):
    """A proxy token that is malformed, unknown, expired, or whose connection is gone."""

    status_code = 401
    code = "invalid_proxy_token"
    default_message = (
        "This proxy token is unknown, expired or its connection was deleted; mint a new one "
        "with POST /v1/connections/{id}/proxy-tokens."
    )

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ProxyTokenNotFound(PinauthError):
    status_code = 404
    code = "proxy_token_not_found"
    default_message = "This connection has no proxy token with that id (revoked, or expired)."


class ProxyTokenNotAllowed(PinauthError):
    """A proxy token presented where only an API key or a browser session may act."""

    status_code = 403
    code = "proxy_token_not_allowed"
    default_message = (
        "A proxy token acts only on /pinterest/{path} and /boards, for its own connection; "
        "this route needs an API key (or, for /me and /auth, a browser session)."
    )


class ProxyTokenConnectionMismatch(PinauthError):
    """A proxy token sent with a Pinauth-Connection-Id naming another connection."""

    status_code = 403
    code = "proxy_token_connection_mismatch"
    default_message = (
        "A proxy token acts only for the connection it was minted for, and the "
        "Pinauth-Connection-Id header names another; drop the header or use that "
        "connection's own proxy token."
    )


class WebhookEventNotFound(PinauthError):
    status_code = 404
    code = "webhook_event_not_found"
    default_message = "No webhook event has that id."
