"""Fixtures: a fresh migrated database per test, the app in-process, Pinterest mocked by respx."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
import uvicorn
from asgi_lifespan import LifespanManager
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.app import create_app
from pinauth.migrations import upgrade_to_head
from pinauth.settings import Settings

API = "https://api.pinterest.com/v5"
TOKEN_URL = f"{API}/oauth/token"
CLIENT_ID = "1234567"
CLIENT_SECRET = "client-secret-value-xyz"
SERVICE = "http://localhost:8000"
BASIC = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()

# Distinctive token values, so a leak is easy to grep for.
ACCESS_1 = "pina_ACCESS-ONE-5f2c9e"
REFRESH_1 = "pinr_REFRESH-ONE-8d1a7b"
ACCESS_2 = "pina_ACCESS-TWO-a93b01"
REFRESH_2 = "pinr_REFRESH-TWO-c4e6f2"
ALL_TOKENS = (ACCESS_1, REFRESH_1, ACCESS_2, REFRESH_2)


def token_json(
    access: str = ACCESS_1,
    refresh: str | None = REFRESH_1,
    *,
    expires_in: int | str = 2592000,
    response_type: str = "authorization_code",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": access,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": "user_accounts:read,boards:read,pins:read",
        "response_type": response_type,
    }
    if refresh is not None:
        body |= {
            "refresh_token": refresh,
            "refresh_token_expires_in": 5184000,
            "refresh_token_expires_at": 1900000000,
        }
    return body


USER_ACCOUNT = {"id": "549755885175", "username": "ada_pins", "account_type": "PINNER"}


# `make test` runs the suite twice: on SQLite, and with this set to a PostgreSQL server
# (postgresql+asyncpg://user@host:port/admin_db), where it gets a database of its own.
POSTGRES_ADMIN_URL = os.environ.get("PINAUTH_TEST_POSTGRES_URL", "")


@contextmanager
def new_postgres_database(prefix: str) -> Iterator[str]:
    """An empty PostgreSQL database of its own; dropped on exit. Yields its URL."""
    admin = make_url(POSTGRES_ADMIN_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin_sql(statement: str) -> None:
        engine = create_async_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new PostgreSQL database for this test run, migrated once."""
    with new_postgres_database("pinauth_test") as url:
        upgrade_to_head(url)
        yield url


def _truncate_all(url: str) -> None:
    async def truncate() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    text(
                        "TRUNCATE connections, sessions, login_states, api_keys,"
                        " connect_sessions RESTART IDENTITY CASCADE"
                    )
                )
        finally:
            await engine.dispose()

    asyncio.run(truncate())


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with the schema at head and no rows, for this test alone."""
    if POSTGRES_ADMIN_URL:
        url: str = request.getfixturevalue("postgres_url")
        _truncate_all(url)
        return url
    url = f"sqlite+aiosqlite:///{tmp_path / 'pinauth.db'}"
    upgrade_to_head(url)
    return url


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "database_url": database_url,
        "secret_key": "test-secret-key-" + "k" * 32,
        "encryption_keys": Fernet.generate_key().decode(),
    } | overrides
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def pinterest() -> respx.MockRouter:
    """Pinterest, mocked at the edge: the app's injected transport, nothing patched
    globally. A request no route matches fails the test."""
    return respx.MockRouter(assert_all_called=False, assert_all_mocked=True)


@pytest.fixture
def app(settings: Settings, pinterest: respx.MockRouter) -> FastAPI:
    return create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))


@asynccontextmanager
async def serve_app(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, reached in-process like a browser would."""
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url=SERVICE) as client,
    ):
        yield client


def run_client(
    settings: Settings, pinterest: respx.MockRouter
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return serve_app(create_app(settings, transport=httpx.MockTransport(pinterest.async_handler)))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(app) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Poll `url` until it answers 200; fail early, with its output, if `process` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{process.args!r} exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{process.args!r} did not answer {url} within {timeout} s")
        time.sleep(0.1)


@asynccontextmanager
async def live_server(app: FastAPI) -> AsyncIterator[str]:
    """The app behind a real uvicorn on a loopback port, in this event loop."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await task


async def raw_request(base: str, method: str, target: str, cookie: str) -> tuple[int, bytes]:
    """Send a request line byte for byte (httpx would normalise `..` away first)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def mock_login_upstream(
    pinterest: respx.MockRouter, tokens: dict[str, Any] | None = None
) -> tuple[respx.Route, respx.Route]:
    token = pinterest.post(TOKEN_URL).respond(200, json=tokens or token_json())
    account = pinterest.get(f"{API}/user_account").respond(200, json=USER_ACCOUNT)
    return token, account


async def start_login(client: httpx.AsyncClient, return_to: str | None = None) -> str:
    """Run /auth/login like a browser; return the state Pinterest would echo back."""
    params = {"return_to": return_to} if return_to else {}
    response = await client.get("/auth/login", params=params)
    assert response.status_code == 302
    return parse_qs(urlsplit(response.headers["location"]).query)["state"][0]


async def log_in(client: httpx.AsyncClient, pinterest: respx.MockRouter) -> httpx.Response:
    """A complete, successful login; the client keeps the session cookie.

    Pinterest's recorded calls are reset afterwards, so tests count only their own.
    """
    mock_login_upstream(pinterest)
    state = await start_login(client)
    response = await client.get("/auth/callback", params={"code": "auth-code-1", "state": state})
    assert response.status_code == 303, response.text
    pinterest.reset()
    return response
