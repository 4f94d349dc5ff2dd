"""The network under the shared httpx client: aiohttp, chosen by measurement (see bench/)."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


class PinterestTransport(AiohttpTransport):
    """httpx-aiohttp with the two things a multi-user proxy must not inherit.

    - aiohttp's ClientSession keeps a cookie jar: a cookie Pinterest set on one user's
      response would be sent with every other user's requests. It gets a dummy jar.
    - httpx-aiohttp maps every `ClientConnectionError`, a reset included, to
      `httpx.ConnectTimeout`; a reset is not a timeout, so it is re-raised as one
      of httpx's network errors.
    """

    def __init__(self, *, max_connections: int = 100) -> None:
        self._max_connections = max_connections
        super().__init__(trust_env=False, client=self._make_session)

    def _make_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._max_connections, ssl=self.ssl_context, keepalive_timeout=30
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as e:
            cause = e.__cause__
            if isinstance(cause, asyncio.TimeoutError):
                raise
            if isinstance(cause, aiohttp.ClientConnectorError):
                raise httpx.ConnectError(str(e), request=request) from cause
            raise httpx.ReadError(str(e), request=request) from cause
