"""The production transport (httpx over aiohttp) against real sockets on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pinauth.errors import UpstreamError, UpstreamTimeout
from pinauth.pinterest.client import PinterestClient, UpstreamRequest
from pinauth.pinterest.http import create_transport
from pinauth.settings import Settings
from tests.helpers import free_port, make_settings


async def echo(request: web.Request) -> web.Response:
    response = web.json_response(
        {
            "cookie": request.headers.get("Cookie"),
            "authorization": request.headers.get("Authorization"),
        }
    )
    response.set_cookie("tracker", "user-a", domain="127.0.0.1")
    return response


async def received(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "length": request.headers.get("Content-Length"),
            "chunked": "Transfer-Encoding" in request.headers,
            "digest": hashlib.sha256(body).hexdigest(),
        }
    )


async def slow(_request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.json_response({})


async def reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    return web.json_response({})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_get("/v5/echo", echo)
    app.router.add_get("/v5/slow", slow)
    app.router.add_post("/v5/received", received)
    app.router.add_get("/v5/reset", reset)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v5"
    finally:
        await runner.cleanup()


def settings_for(api_url: str, **overrides: object) -> Settings:
    return make_settings("sqlite+aiosqlite://", api_url=api_url, max_retries=1, **overrides)


async def test_one_users_cookie_never_reaches_another(upstream: str) -> None:
    settings = settings_for(upstream)
    async with create_transport() as transport:
        client = PinterestClient(transport, settings)
        first = await client.send(UpstreamRequest("GET", "echo"), "token-of-user-a")
        second = await client.send(UpstreamRequest("GET", "echo"), "token-of-user-b")

    assert "tracker=user-a" in first.headers["set-cookie"]
    assert second.json() == {"cookie": None, "authorization": "Bearer token-of-user-b"}


async def test_connection_reset_is_an_upstream_error(upstream: str) -> None:
    settings = settings_for(upstream)
    async with create_transport() as transport:
        with pytest.raises(UpstreamError):
            await PinterestClient(transport, settings).send(UpstreamRequest("GET", "reset"), "t")


async def test_connection_refused_is_an_upstream_error() -> None:
    settings = settings_for(f"http://127.0.0.1:{free_port()}/v5")
    async with create_transport() as transport:
        with pytest.raises(UpstreamError):
            await PinterestClient(transport, settings).send(UpstreamRequest("GET", "echo"), "t")


async def test_slow_pinterest_is_a_timeout(upstream: str) -> None:
    settings = settings_for(upstream, http_read_timeout=0.3)
    async with create_transport() as transport:
        with pytest.raises(UpstreamTimeout):
            await PinterestClient(transport, settings).send(UpstreamRequest("GET", "slow"), "t")


async def test_a_large_body_arrives_whole_with_its_length(upstream: str) -> None:
    """A body over 256 KiB goes out in slices (transport.py), still framed by its
    Content-Length, byte for byte; so does a small one, whole."""
    settings = settings_for(upstream)
    async with create_transport() as transport:
        client = PinterestClient(transport, settings)
        for size in (3 * 1024 * 1024 + 7, 1000):
            body = os.urandom(size)
            response = await client.send(UpstreamRequest("POST", "received", body=body), "t")
            assert response.json() == {
                "length": str(size),
                "chunked": False,
                "digest": hashlib.sha256(body).hexdigest(),
            }
