"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from http.cookies import _unquote  # what Starlette uses
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.apikeys import ApiKeyService
from pinauth.auth import AuthService
from pinauth.connect import ConnectSessions
from pinauth.connections import ConnectionService
from pinauth.errors import (
    AmbiguousSession,
    ConnectionIdAmbiguous,
    ConnectionIdRequired,
    ForbiddenOrigin,
    InvalidApiKey,
    NotAuthenticated,
    ProxyTokenConnectionMismatch,
    ProxyTokenNotAllowed,
)
from pinauth.models import Connection
from pinauth.observability import CONNECTION_ID, Metrics
from pinauth.proxy import InflightBodies, ProxyService
from pinauth.proxytokens import ProxyTokenService, looks_like_proxy_token
from pinauth.settings import Settings
from pinauth.tokens import TokenManager
from pinauth.webhooks import WebhookEvents

CONNECTION_ID_HEADER = "pinauth-connection-id"


@dataclass(frozen=True, slots=True)
class Services:
    """Process-wide objects built once by the lifespan and shared by every request."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    auth: AuthService
    api_keys: ApiKeyService
    connect_sessions: ConnectSessions
    connections: ConnectionService
    tokens: TokenManager
    proxy: ProxyService
    metrics: Metrics
    schema_head: str
    proxy_tokens: ProxyTokenService
    webhook_events: WebhookEvents
    # Proxied request bodies held at once (PINAUTH_MAX_INFLIGHT_BODY_BYTES).
    bodies: InflightBodies


# Dependencies are `async def` even when they never await: FastAPI runs plain `def`
# dependencies in a thread pool, a thread hop on every request.
async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
# Declares the bearer scheme in /docs (its Authorize button); checking is ours, so that
# failures get pinauth's error shape.
ApiKeyScheme = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(
        HTTPBearer(
            auto_error=False,
            scheme_name="apiKey",
            description="An API key from `pinauth api-keys create`.",
        )
    ),
]


def request_cookie(request: Request, name: str) -> str | None:
    """The cookie `name`, read from every Cookie header of the request; AmbiguousSession
    (400) if it is there more than once.

    A browser sends two cookies of one name when another site of the same registrable
    domain set one with `Domain=` (cookie tossing), and Starlette's `request.cookies`
    would quietly keep the last (and read the first Cookie header only). Neither is
    served: a tossed session cookie would act for the attacker's connection, a tossed
    login cookie finish the attacker's login. Cheap on the proxy's path: a header that
    does not contain the name is not split.
    """
    encoded = name.encode("latin-1")
    found: str | None = None
    for key, raw in request.scope["headers"]:
        if key != b"cookie" or encoded not in raw:
            continue
        for chunk in raw.decode("latin-1").split(";"):
            # Split as Starlette splits. A chunk without "=" is a nameless cookie, never
            # ours; a nameless one whose value is "<name>=…" is sent as that very pair,
            # and counts like any other.
            cookie_name, has_value, value = chunk.partition("=")
            if has_value and cookie_name.strip() == name:
                if found is not None:
                    raise AmbiguousSession()
                found = _unquote(value.strip())
    return found


async def read_session_cookie(request: Request) -> str | None:
    """The session cookie (AmbiguousSession if there are two), for routes that read it
    without requiring a session (logout, the login callback)."""
    services: Services = request.state.services
    return request_cookie(request, services.auth.cookie_names.session)


async def read_login_cookie(request: Request) -> str | None:
    """The login cookie (AmbiguousSession if there are two), for the login callback."""
    services: Services = request.state.services
    return request_cookie(request, services.auth.cookie_names.login)


SessionCookie = Annotated[str | None, Depends(read_session_cookie)]
LoginCookie = Annotated[str | None, Depends(read_login_cookie)]


# Methods that cannot change anything; every other method acting on a session cookie
# must come from a trusted origin.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def get_current_connection(request: Request) -> Connection:
    """The session's connection, or 401; the one way any route acts for a cookie.

    The Origin check lives here, not in each route, so no route can skip it: the proxy's
    fast path calls this directly, and every other route gets it as a dependency.
    """
    services: Services = request.state.services
    if request.method not in SAFE_METHODS:
        check_origin(request, services)
    cookie = request_cookie(request, services.auth.cookie_names.session)
    connection = await services.auth.connection_for_session(cookie)
    if connection is None:
        raise NotAuthenticated()
    CONNECTION_ID.set(connection.public_id)  # for this request's log lines
    return connection


async def get_session_connection(request: Request) -> Connection:
    """The session's connection for the browser routes (/me, /auth): never a proxy token's.

    A proxy token sent here is refused outright rather than ignored in favour of a
    cookie that may ride along, so a misrouted SDK call gets a clear answer.
    """
    refuse_proxy_token(request)
    return await get_current_connection(request)


CurrentConnection = Annotated[Connection, Depends(get_session_connection)]


def check_origin(request: Request, services: Services) -> None:
    """Refuse cross-site requests that would act on the session cookie.

    SameSite=Lax already keeps the cookie off most cross-site POSTs; checking Origin
    also covers same-site attackers (sibling subdomains), `Origin: null` (sandboxed
    frames, data: URLs) and older browsers. Requests without Origin come from
    non-browser clients, which cannot be driven by another site.
    """
    origin = request.headers.get("origin")
    if origin is None or origin in services.auth.trusted_origins():
        return
    if origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise ForbiddenOrigin()


async def require_trusted_origin(request: Request, services: ServicesDep) -> None:
    """The Origin check for state-changing routes that need no connection (logout)."""
    refuse_proxy_token(request)
    check_origin(request, services)


TrustedOrigin = Depends(require_trusted_origin)


async def require_public_host(request: Request) -> None:
    """Refuse any Host but pinauth's public one (the redirect URI's): for the demo's routes.

    The Origin check compares Origin with Host, so a DNS-rebinding page (its own name
    resolving to this server) passes it: it is same-origin with itself. Only the Host
    header tells it from the demo page.
    """
    services: Services = request.state.services
    public = services.auth.public_origin
    if not public.is_public_host(request):
        raise ForbiddenOrigin(
            f"The demo answers on pinauth's public origin only ({public.origin})."
        )


PublicHostOnly = Depends(require_public_host)


def bearer_token(request: Request) -> str | None:
    """The credential of `Authorization: Bearer <credential>`, if the request has one."""
    authorization = request.headers.get("authorization")
    if authorization is None:
        return None
    # Two credentials (an API key and a proxy token, say) would let the order of headers
    # decide who is acting; which one a proxy on the way keeps is anyone's guess.
    if len(request.headers.getlist("authorization")) > 1:
        raise InvalidApiKey("Send one Authorization header, not several.")
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credential:
        raise InvalidApiKey("The Authorization header must be `Bearer <key>`.")
    return credential.strip()


def refuse_proxy_token(request: Request) -> None:
    """ProxyTokenNotAllowed (403) if the request presents a proxy token."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and looks_like_proxy_token(credential.strip()):
            raise ProxyTokenNotAllowed()


class Caller(Enum):
    """Who called the proxy: what its errors should say differs."""

    BROWSER = "browser"  # a session cookie
    API_KEY = "api_key"  # the app's backend, naming the connection
    PROXY_TOKEN = "proxy_token"  # a proxy token, for its own connection only


async def get_acting_connection(request: Request) -> tuple[Connection, Caller]:
    """The connection a proxy call acts for, and who called.

    With an `Authorization` header the caller is the app's backend, and the cookie is
    ignored: either an API key plus the connection it names, or a proxy token, which
    acts for its own connection and no other. Without one it is a browser, and the
    cookie's session decides (Origin check included).
    """
    credential = bearer_token(request)
    if credential is None:
        return await get_current_connection(request), Caller.BROWSER
    services: Services = request.state.services
    public_id = request.headers.get(CONNECTION_ID_HEADER)
    if looks_like_proxy_token(credential):
        connection = await services.proxy_tokens.connection_for(credential)
        # Refused, not ignored: a caller naming another connection believes it acts for
        # that one, and quietly acting for the token's instead would post to the wrong
        # account. Naming the token's own connection is harmless and allowed.
        if public_id is not None and any(
            named and named != connection.public_id
            for named in request.headers.getlist(CONNECTION_ID_HEADER)
        ):
            raise ProxyTokenConnectionMismatch()
        CONNECTION_ID.set(connection.public_id)
        return connection, Caller.PROXY_TOKEN
    await services.api_keys.authenticate(credential)
    if not public_id:
        raise ConnectionIdRequired()
    # The first of two different ids would win silently, and the caller (or a client
    # library adding its own header beside the caller's) may have meant the other.
    if any(named != public_id for named in request.headers.getlist(CONNECTION_ID_HEADER)):
        raise ConnectionIdAmbiguous()
    connection = await services.connections.get(public_id)
    CONNECTION_ID.set(connection.public_id)
    return connection, Caller.API_KEY


async def require_api_key(request: Request, _scheme: ApiKeyScheme) -> None:
    """The app's backend only: a valid API key, never a cookie or a proxy token."""
    credential = bearer_token(request)
    if credential is None:
        raise InvalidApiKey()
    if looks_like_proxy_token(credential):
        raise ProxyTokenNotAllowed()
    services: Services = request.state.services
    await services.api_keys.authenticate(credential)
