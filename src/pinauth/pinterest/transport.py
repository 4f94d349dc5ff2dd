"""The network under the shared httpx client: aiohttp, chosen by measurement (see bench/).

httpx's own transport costs ~700 µs of CPU per call here against ~70 µs for aiohttp, so
the httpx API rides on aiohttp. This adapter is deliberately narrow: it reads each body
whole (Pinterest answers in small JSON documents, and pinauth buffers them anyway), caches
aiohttp's timeout objects, and maps aiohttp's errors onto httpx's precisely, because the
proxy's retry and status decisions depend on telling a refused connection from a reset
from a timeout.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from functools import lru_cache

import aiohttp
import httpx

_NETWORK_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    # Order matters: the first match wins, most specific first.
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.TransportError),
)


# Bodies larger than this go out in slices of it, each written once the socket has taken
# the last: handed over whole, the part the socket cannot take at once is copied into
# the connection's write buffer, a second copy of a large upload per request in flight.
_WHOLE_BODY_BYTES = 256 * 1024


async def _pieces(body: bytes) -> AsyncIterator[memoryview]:
    """`body` in slices, without copying (the request's Content-Length frames them)."""
    view = memoryview(body)
    for start in range(0, len(view), _WHOLE_BODY_BYTES):
        yield view[start : start + _WHOLE_BODY_BYTES]


@lru_cache(maxsize=16)
def _client_timeout(
    connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    # ClientTimeout is an attrs class; building one per request shows up in profiles.
    return aiohttp.ClientTimeout(sock_connect=connect, sock_read=read, connect=pool)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over one shared aiohttp ClientSession.

    The session has a dummy cookie jar: a cookie Pinterest set on one user's response
    must never ride along with another user's request. Redirects are never followed.
    """

    def __init__(self, *, max_connections: int = 100, verify: ssl.SSLContext | None = None):
        self._max_connections = max_connections
        self._ssl = verify or httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: aiohttp wants a running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, ssl=self._ssl, keepalive_timeout=30
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,  # httpx decodes per Content-Encoding
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        try:
            async with self._get_session().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=_pieces(body) if len(body) > _WHOLE_BODY_BYTES else body or None,
                allow_redirects=False,
                timeout=_client_timeout(
                    timeout.get("connect"), timeout.get("read"), timeout.get("pool")
                ),
            ) as upstream:
                content = await upstream.read()
        except TimeoutError as e:
            timeout_error = (
                httpx.ConnectTimeout
                if isinstance(e, aiohttp.ConnectionTimeoutError)
                else httpx.ReadTimeout
            )
            raise timeout_error(str(e) or "timed out", request=request) from e
        except aiohttp.ClientError as e:
            for aiohttp_error, httpx_error in _NETWORK_ERRORS:
                if isinstance(e, aiohttp_error):
                    raise httpx_error(str(e), request=request) from e
            raise  # pragma: no cover - every ClientError matches the last row
        return httpx.Response(
            upstream.status,
            headers=upstream.raw_headers,
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
