"""Helpers shared by tests (fixtures stay in conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import respx
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.types import ASGIApp, Receive, Scope, Send

from pinauth.app import create_app
from pinauth.crypto import TokenCipher
from pinauth.settings import Settings
from tests.conftest import (
    API,
    SERVICE,
    TOKEN_URL,
    free_port,
    start_login,
    token_json,
    wait_until_serving,
)


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


async def stored_tokens(settings: Settings) -> tuple[str, str | None, int]:
    """The connection's access and refresh token as stored (decrypted), and its version."""
    engine = create_async_engine(settings.database_url)
    try:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT access_token_encrypted, refresh_token_encrypted, version "
                        "FROM connections"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])
    refresh = None if row[1] is None else cipher.decrypt(row[1])
    return cipher.decrypt(row[0]), refresh, int(row[2])


# A database that refuses to store new tokens, as one that is down would: a real error
# from the real database, raised where pinauth writes them, nothing in pinauth patched.
# Only writes that change the access token are refused, so other processes' leases and
# marks still land (an outage seen by one process only, e.g. its pool cut off).
_REFUSE_UPDATES = {
    "sqlite": [
        "CREATE TRIGGER refuse_updates BEFORE UPDATE OF access_token_encrypted ON connections "
        "WHEN NEW.access_token_encrypted IS NOT OLD.access_token_encrypted "
        "BEGIN SELECT RAISE(ABORT, 'the database is unavailable'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_updates() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the database is unavailable'; END $$",
        "CREATE TRIGGER refuse_updates BEFORE UPDATE ON connections FOR EACH ROW "
        "WHEN (NEW.access_token_encrypted IS DISTINCT FROM OLD.access_token_encrypted) "
        "EXECUTE FUNCTION refuse_updates()",
    ],
}
_ALLOW_UPDATES = {
    "sqlite": ["DROP TRIGGER refuse_updates"],
    "postgresql": [
        "DROP TRIGGER refuse_updates ON connections",
        "DROP FUNCTION refuse_updates()",
    ],
}


async def _run_sql(database_url: str, statements: dict[str, list[str]]) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            for statement in statements[engine.dialect.name]:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def refuse_token_writes(database_url: str) -> None:
    await _run_sql(database_url, _REFUSE_UPDATES)


async def allow_token_writes(database_url: str) -> None:
    await _run_sql(database_url, _ALLOW_UPDATES)


class Process:
    """A `python -m pinauth …` subprocess, its output in a log file in `cwd`."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, ready_url: str) -> None:
        self.args, self.env, self.cwd, self.ready_url = args, env, cwd, ready_url
        self.log = cwd / f"{args[0]}-{free_port()}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pinauth", *self.args],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        assert self.popen is not None
        try:
            wait_until_serving(self.ready_url, self.popen)
        except BaseException:
            print(self.log.read_text())  # pytest shows it with the failure
            raise

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def stored_refresh_token(database_url: str, key: str) -> str:
    """The connection's refresh token as stored, decrypted with `key`."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            encrypted = (
                await connection.execute(text("SELECT refresh_token_encrypted FROM connections"))
            ).scalar_one()
    finally:
        await engine.dispose()
    return TokenCipher([key]).decrypt(encrypted)


async def expire_refresh_leases(database_url: str) -> None:
    """Make every refresh lease one that has run out (the time it stands for has passed)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE connections SET refresh_lease_until = :past").bindparams(
                    past=datetime(2000, 1, 1, tzinfo=UTC)
                )
            )
    finally:
        await engine.dispose()
