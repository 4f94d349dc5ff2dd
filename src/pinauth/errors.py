"""Errors pinauth raises, each knowing the HTTP status and code it is rendered with.

Every error the service itself makes reaches the client as
`{"error": "<code>", "message": "<sentence>"}`; one exception handler in `app.py`
renders them, so routers and services just raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class ConfigurationError(Exception):
    """The settings cannot run a safe service; the message says what to fix."""


class PinauthError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "Something went wrong inside pinauth."

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


class UpstreamError(PinauthError):
    status_code = 502
    code = "upstream_error"
    default_message = "Pinterest could not be reached or answered with an error."


class UpstreamUnavailable(UpstreamError):
    """Pinterest (or the lock guarding a refresh) is busy; the client should retry later."""

    status_code = 503
    default_message = "Pinterest is temporarily unavailable; retry later."

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
        self.retry_after = retry_after


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
