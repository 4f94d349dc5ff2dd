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


async def get_current_connection(request: Request) -> Connection:
    """The session's connection, or 401. Also called directly by the proxy's hot path."""
    services: Services = request.state.services
    connection = await services.auth.connection_for_session(request.cookies.get(SESSION_COOKIE))
    if connection is None:
        raise NotAuthenticated()
    CONNECTION_ID.set(connection.id)  # for this request's log lines
    return connection


CurrentConnection = Annotated[Connection, Depends(get_current_connection)]


async def require_trusted_origin(request: Request, services: ServicesDep) -> None:
    """Refuse cross-site requests that would act on the session cookie.

    SameSite=Lax already keeps the cookie off most cross-site POSTs; checking Origin
    also covers same-site attackers (sibling subdomains) and older browsers.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own and origin not in services.auth.trusted_origins():
        raise ForbiddenOrigin()


TrustedOrigin = Depends(require_trusted_origin)
