"""Helpers shared by tests (fixtures stay in conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import respx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Receive, Scope, Send

from pinauth.apikeys import ApiKeyService
from pinauth.app import create_app
from pinauth.db import create_engine, create_sessionmaker
from pinauth.settings import Settings
from tests.conftest import API, SERVICE, TOKEN_URL, start_login, token_json


async def log_in_as(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    account: dict[str, Any],
    access: str,
    refresh: str,
    **token_fields: Any,
) -> httpx.Response:
    """A complete login as the Pinterest `account`, which Pinterest grants `access`.

    Pinterest's recorded calls and routes are reset afterwards.
    """
    pinterest.post(TOKEN_URL).respond(200, json=token_json(access, refresh, **token_fields))
    pinterest.get(f"{API}/user_account").respond(200, json=account)
    state = await start_login(client)
    response = await client.get("/auth/callback", params={"code": "code", "state": state})
    assert response.status_code == 303, response.text
    pinterest.reset()
    pinterest.routes.clear()
    return response


def bearers(route: respx.Route) -> list[str]:
    """The access tokens `route` was called with, in order."""
    return [str(call.request.headers["authorization"]) for call in route.calls]


@asynccontextmanager
async def browsers(
    settings: Settings, pinterest: respx.MockRouter | None, count: int
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` browsers (cookie jars of their own) on one running app: one process.

    Pinterest is `pinterest` if given, else the real network (a loopback stand-in).
    """
    transport = None if pinterest is None else httpx.MockTransport(pinterest.async_handler)
    app = create_app(settings, transport=transport)
    async with LifespanManager(app) as manager, AsyncExitStack() as stack:
        asgi = httpx.ASGITransport(manager.app)
        yield [
            await stack.enter_async_context(httpx.AsyncClient(transport=asgi, base_url=SERVICE))
            for _ in range(count)
        ]


class InFlight:
    """Wraps an ASGI app and counts the requests inside it, so a test can hold an
    upstream answer until N requests are provably in flight at once (no sleeps)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0
        self._changed = asyncio.Condition()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._add(1)
        try:
            await self.app(scope, receive, send)
        finally:
            await self._add(-1)

    async def _add(self, delta: int) -> None:
        async with self._changed:
            self.count += delta
            self._changed.notify_all()

    async def reached(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


@asynccontextmanager
async def counted_client(
    settings: Settings, pinterest: respx.MockRouter
) -> AsyncIterator[tuple[httpx.AsyncClient, InFlight]]:
    """A browser on a running app, and the count of its requests inside the app."""
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with LifespanManager(app) as manager:
        in_flight = InFlight(manager.app)
        transport = httpx.ASGITransport(in_flight)
        async with httpx.AsyncClient(transport=transport, base_url=SERVICE) as client:
            yield client, in_flight


async def warm_up(client: httpx.AsyncClient) -> None:
    """Open the database pool's connections the way a running service has them.

    A fresh pool opens a connection per concurrent request, and SQLite serialises
    those openings behind any open transaction: that would hide a missing lock.
    """
    await asyncio.gather(*(client.get("/auth/login") for _ in range(10)))


async def create_api_key(settings: Settings, name: str = "backend") -> str:
    """A new API key, made the way `pinauth api-keys create` makes it."""
    engine = create_engine(settings)
    try:
        return (await ApiKeyService(create_sessionmaker(engine), 0).create(name)).key
    finally:
        await engine.dispose()


async def connect_end_user(
    backend: httpx.AsyncClient,
    browser: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    end_user_id: str,
    account: dict[str, Any],
    access: str,
    refresh: str,
) -> str:
    """The whole connect flow: the backend mints a connect session, the browser follows
    it through consent; returns the connection id the backend then finds."""
    minted = await backend.post("/v1/connect-sessions", json={"end_user_id": end_user_id})
    assert minted.status_code == 201, minted.text
    login = await browser.get(minted.json()["connect_url"])
    assert login.status_code == 302, login.text
    state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
    pinterest.post(TOKEN_URL).respond(200, json=token_json(access, refresh))
    pinterest.get(f"{API}/user_account").respond(200, json=account)
    callback = await browser.get("/auth/callback", params={"code": "code", "state": state})
    assert callback.status_code == 303, callback.text
    pinterest.reset()
    pinterest.routes.clear()
    me = await browser.get("/me")
    return str(me.json()["connection_id"])
