"""/auth: the OAuth login with Pinterest, and the browser session it creates."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import RedirectResponse

from pinauth.api.deps import (
    CurrentConnection,
    LoginCookie,
    ServicesDep,
    SessionCookie,
    TrustedOrigin,
)
from pinauth.api.schemas import COOKIE_SECURITY, RefreshResponse, error_responses
from pinauth.errors import (
    AccessDenied,
    AmbiguousSession,
    AuthorizationFailed,
    ConnectionNotFound,
    DatabaseUnavailable,
    ForbiddenOrigin,
    InvalidConnectSession,
    InvalidRequest,
    InvalidState,
    NotAuthenticated,
    NotConfigured,
    PinauthError,
    PinterestClientRejected,
    ProxyTokenNotAllowed,
    ReauthorizationRequired,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from pinauth.frontend import wants_json
from pinauth.settings import Settings

router = APIRouter(prefix="/auth", tags=["auth"])
log = logging.getLogger(__name__)

# The callback answers a browser and an API client differently (see wants_json).
_VARY_ACCEPT = {"Vary": "Accept"}


def _set_cookie(
    response: Response, settings: Settings, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
    )


def _clear_cookie(response: Response, settings: Settings, name: str) -> None:
    response.delete_cookie(
        name, path="/", httponly=True, samesite="lax", secure=settings.secure_cookies
    )


@router.get(
    "/login",
    name="login",
    status_code=status.HTTP_302_FOUND,
    response_class=RedirectResponse,
    responses={
        302: {"description": "Redirect to Pinterest's consent page."},
        307: {
            "description": "Reached on another host name than the redirect URI's: the same "
            "path and query on pinauth's public origin, where the login has to happen."
        },
        **error_responses(InvalidConnectSession, NotConfigured, DatabaseUnavailable),
    },
)
async def login(
    request: Request,
    services: ServicesDep,
    return_to: Annotated[
        str | None,
        Query(
            description="Where to send the browser after login: a relative path or an "
            "allowed origin. Anything else falls back to PINAUTH_FRONTEND_URL."
        ),
    ] = None,
    connect_session: Annotated[
        str | None,
        Query(
            description="A connect session's token (from POST /v1/connect-sessions): the "
            "login then links the account to that session's end user. Single use."
        ),
    ] = None,
) -> RedirectResponse:
    """Start a Pinterest login: redirect the browser to Pinterest's consent page."""
    # Before anything else: the login cookie must be set on the origin of the callback.
    moved = services.auth.public_origin.redirect(request)
    if moved is not None:
        return moved
    settings = services.settings
    if not settings.client_id or not settings.client_secret.get_secret_value():
        raise NotConfigured()
    start = await services.auth.start_login(return_to, connect_session)
    response = RedirectResponse(start.authorize_url, status_code=status.HTTP_302_FOUND)
    login_cookie = services.auth.cookie_names.login
    _set_cookie(response, settings, login_cookie, start.nonce, settings.state_max_age_seconds)
    return response


@router.get(
    "/callback",
    status_code=status.HTTP_303_SEE_OTHER,
    response_class=RedirectResponse,
    responses={
        303: {
            "description": "Logged in: redirect to return_to with a session cookie; through a "
            "connect session, with `?pinauth_connect_result=<one-time value>` for the app's "
            "backend to confirm (POST /v1/connections/confirm) and no session cookie. Failed: "
            "redirect to return_to (or PINAUTH_FRONTEND_URL) with `?pinauth_error=<code>`; "
            "the errors below are answered as JSON only to `Accept: application/json`, but "
            "`ambiguous_session` (two session or login cookies), which is always refused."
        },
        **error_responses(
            AmbiguousSession,
            InvalidState,
            InvalidRequest,
            AuthorizationFailed,
            AccessDenied,
            UpstreamError,
            UpstreamUnavailable,
            PinterestClientRejected,
            UpstreamTimeout,
            DatabaseUnavailable,
        ),
    },
)
async def callback(
    request: Request,
    services: ServicesDep,
    session_cookie: SessionCookie,
    login_cookie: LoginCookie,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
) -> RedirectResponse:
    """Finish a Pinterest login: verify state, exchange the code, start a session.

    Any failure sends the browser back to the frontend with `?pinauth_error=<code>`,
    unless the request asks for JSON (`Accept: application/json`).
    """
    try:
        result = await services.auth.complete_login(
            code=code,
            state=state,
            error=error,
            nonce=login_cookie,
            previous_session_cookie=session_cookie,
        )
    except Exception as e:
        if wants_json(request.headers):
            raise
        reason = e.code if isinstance(e, PinauthError) else PinauthError.code
        if isinstance(e, PinauthError):
            # The code only: messages can quote the callback's query.
            log.info("login callback failed: %s", reason)
        else:
            log.error("login callback failed", exc_info=e)
        # A browser on pinauth's callback URL looking at JSON is stuck; its frontend
        # can say what happened and offer to try again.
        return RedirectResponse(
            services.auth.failed_login_destination(state, reason),
            status_code=status.HTTP_303_SEE_OTHER,
            headers=_VARY_ACCEPT,
        )
    settings = services.settings
    names = services.auth.cookie_names
    response = RedirectResponse(
        result.redirect_to, status_code=status.HTTP_303_SEE_OTHER, headers=_VARY_ACCEPT
    )
    if result.session_cookie is not None:
        _set_cookie(
            response,
            settings,
            names.session,
            result.session_cookie,
            settings.session_max_age_seconds,
        )
    _clear_cookie(response, settings, names.login)
    return response


@router.post(
    "/refresh",
    response_model=RefreshResponse,
    responses=error_responses(
        NotAuthenticated,
        AmbiguousSession,
        ProxyTokenNotAllowed,
        ReauthorizationRequired,
        ForbiddenOrigin,
        UpstreamUnavailable,
        PinterestClientRejected,
        DatabaseUnavailable,
    ),
    openapi_extra=COOKIE_SECURITY,
)
async def refresh(services: ServicesDep, connection: CurrentConnection) -> RefreshResponse:
    """Refresh the session's Pinterest tokens now; returns the new expiry times."""
    refreshed = await services.tokens.refresh(connection)
    return RefreshResponse(
        access_token_expires_at=refreshed.access_token_expires_at,
        refresh_token_expires_at=refreshed.refresh_token_expires_at,
    )


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[TrustedOrigin],
    responses=error_responses(
        AmbiguousSession, ForbiddenOrigin, ProxyTokenNotAllowed, DatabaseUnavailable
    ),
    # The cookie is optional: without one there is nothing to end.
    openapi_extra={"security": [{"sessionCookie": []}, {}]},
)
async def logout(services: ServicesDep, session_cookie: SessionCookie) -> Response:
    """End this browser's session; the Pinterest connection stays stored."""
    await services.auth.logout(session_cookie)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    _clear_cookie(response, services.settings, services.auth.cookie_names.session)
    return response


@router.delete(
    "/connection",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(
        NotAuthenticated,
        AmbiguousSession,
        ProxyTokenNotAllowed,
        ForbiddenOrigin,
        ConnectionNotFound,
        DatabaseUnavailable,
    ),
    openapi_extra=COOKIE_SECURITY,
)
async def disconnect(services: ServicesDep, connection: CurrentConnection) -> Response:
    """Disconnect Pinterest: delete the stored tokens and end every session using them."""
    await services.connections.delete(connection.public_id)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    _clear_cookie(response, services.settings, services.auth.cookie_names.session)
    return response
