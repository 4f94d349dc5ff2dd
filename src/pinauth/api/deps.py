"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Cookie, Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.auth import AuthService
from pinauth.errors import ForbiddenOrigin, NotAuthenticated
from pinauth.models import Connection
from pinauth.observability import CONNECTION_ID, Metrics
from pinauth.proxy import ProxyService
from pinauth.settings import Settings
from pinauth.tokens import TokenManager

SESSION_COOKIE = "pinauth_session"
LOGIN_COOKIE = "pinauth_login"


@dataclass(frozen=True, slots=True)
class Services:
    """Process-wide objects built once by the lifespan and shared by every request."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    auth: AuthService
    tokens: TokenManager
    proxy: ProxyService
    metrics: Metrics
    schema_head: str


# Dependencies are `async def` even when they never await: FastAPI runs plain `def`
# dependencies in a thread pool, a thread hop on every request.
async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
SessionCookie = Annotated[str | None, Cookie(alias=SESSION_COOKIE, include_in_schema=False)]


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
    connection = await services.auth.connection_for_session(request.cookies.get(SESSION_COOKIE))
    if connection is None:
        raise NotAuthenticated()
    CONNECTION_ID.set(connection.public_id)  # for this request's log lines
    return connection


CurrentConnection = Annotated[Connection, Depends(get_current_connection)]


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
    check_origin(request, services)


TrustedOrigin = Depends(require_trusted_origin)
