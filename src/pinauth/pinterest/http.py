"""The one shared HTTP client to Pinterest, and translation of its failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from pinauth import __version__
from pinauth.errors import UpstreamError, UpstreamTimeout
from pinauth.pinterest.transport import AiohttpTransport
from pinauth.settings import Settings

USER_AGENT = f"pinauth/{__version__}"


def create_transport() -> httpx.AsyncBaseTransport:
    """The network under every call to Pinterest: aiohttp, chosen by measurement."""
    return AiohttpTransport()


def http_timeout(settings: Settings) -> httpx.Timeout:
    """Every call to Pinterest, through the client or its transport, uses these."""
    return httpx.Timeout(
        connect=settings.http_connect_timeout,
        read=settings.http_read_timeout,
        write=settings.http_read_timeout,
        pool=settings.http_pool_timeout,
    )


def create_http_client(
    settings: Settings, transport: httpx.AsyncBaseTransport
) -> httpx.AsyncClient:
    """The process's one client to Pinterest; closing it closes `transport`."""
    return httpx.AsyncClient(
        transport=transport,
        # One client serves every user: it must never remember a cookie from one
        # user's response and send it with another's request.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        timeout=http_timeout(settings),
        # Proxy env vars and .netrc must not redirect or decorate calls carrying tokens,
        # and a redirect from Pinterest must never carry the bearer token elsewhere.
        trust_env=False,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


@asynccontextmanager
async def translate_transport_errors(what: str) -> AsyncIterator[None]:
    """Turn httpx's transport failures into pinauth errors that leak no internals."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise UpstreamTimeout(f"Pinterest did not answer {what} in time.") from e
    except httpx.TransportError as e:
        raise UpstreamError(f"Pinterest could not be reached for {what}.") from e


def pinterest_error_message(response: httpx.Response) -> str:
    """Pinterest's own `{"code", "message"}` error text, if the body has one."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:300]
    return ""
