"""Test helpers shared by the test modules: constants, app runners, login steps, servers."""

from __future__ import annotations

import asyncio
import base64
import glob
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
from sqlalchemy import insert, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from starlette.types import ASGIApp, Receive, Scope, Send

from pinauth.apikeys import ApiKeyService
from pinauth.app import create_app
from pinauth.cache import ConnectionCache
from pinauth.crypto import TokenCipher, TokenDecryptionError
from pinauth.db import create_engine, create_sessionmaker
from pinauth.keeper import Keeper
from pinauth.logs import JsonFormatter
from pinauth.models import Base, Connection, ConnectionStatus, new_public_id
from pinauth.observability import Metrics
from pinauth.pinterest.http import create_http_client
from pinauth.pinterest.oauth import PinterestOAuth
from pinauth.sandbox import SandboxConfig
from pinauth.server import uvicorn_options
from pinauth.settings import Settings
from pinauth.tokens import TokenManager

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


# Lifetimes no datetime can hold, both ways, in each field that carries one: the token
# answer's tokens are still real (Pinterest has rotated the refresh token), so pinauth
# stores them with the lifetime clamped. `None` drops the field.
ABSURD = 999999999999999999999
ABSURD_LIFETIMES: list[dict[str, int | None]] = [
    {"expires_in": ABSURD},
    {"expires_in": -ABSURD},
    {"refresh_token_expires_in": ABSURD, "refresh_token_expires_at": None},
    {"refresh_token_expires_in": -ABSURD, "refresh_token_expires_at": None},
    {"refresh_token_expires_at": ABSURD},
    {"refresh_token_expires_at": -ABSURD},
]
TEN_YEARS = 3650 * 86400


def with_fields(body: dict[str, Any], fields: dict[str, int | None]) -> dict[str, Any]:
    """`body` with `fields` set, or dropped where `None`."""
    changed = body | {k: v for k, v in fields.items() if v is not None}
    return {k: v for k, v in changed.items() if fields.get(k, 0) is not None}


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


def truncate_all(url: str) -> None:
    async def truncate() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                # Every table the models know, so a new one is never left holding rows.
                tables = ", ".join(Base.metadata.tables)
                await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        finally:
            await engine.dispose()

    asyncio.run(truncate())


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "database_url": database_url,
        "secret_key": "test-secret-key-" + "k" * 32,
        "encryption_keys": Fernet.generate_key().decode(),
        # Most tests reach the app at 127.0.0.1:<port>, a name their redirect URI does
        # not use; tests/test_frontend.py covers the redirect to the public origin.
        "canonical_redirect": False,
        # Off unless a test is about it (tests/test_keeper.py): a keeper pass at start-up
        # would race the tests that count token requests and queries.
        "keeper": False,
    } | overrides
    return Settings(_env_file=None, **values)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(
    url: str, process: subprocess.Popen[Any], timeout: float = 30, *, verify: bool = True
) -> None:
    """Poll `url` until it answers 200; fail early, with its output, if `process` dies.
    `verify=False` for a test's self-signed certificate."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{process.args!r} exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(url, timeout=1, verify=verify).status_code == 200:
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


def http_response(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"", reason: bytes = b"OK"
) -> bytes:
    """An HTTP/1.1 response, byte for byte: headers no HTTP library would let a test send."""
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return (
        b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n\r\n" % (status, reason, head, len(body)) + body
    )


@asynccontextmanager
async def raw_http_upstream(answer: Callable[[str, str], bytes]) -> AsyncIterator[str]:
    """A loopback HTTP/1.1 server writing `answer(method, target)` verbatim; yields its URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: the client reuses its connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                for line in lines:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length" and int(value):
                        await reader.readexactly(int(value))
                writer.write(answer(method, target))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def count_rows(database_url: str, table: str, where: str = "") -> int:
    """Rows in one of pinauth's tables, read straight from the database."""
    assert table in ("connections", "sessions", "login_states", "connect_results")
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            query = f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else "")
            return int((await connection.execute(text(query))).scalar_one())
    finally:
        await engine.dispose()


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


class ManualClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def account_tokens(account_id: str) -> tuple[str, str]:
    """(access, refresh) tokens that name their account, so a request shows whose it is."""
    return f"pina_ACCESS-{account_id}", f"pinr_REFRESH-{account_id}"


async def connect_as(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, account: dict[str, Any]
) -> str:
    """Log `client` in as Pinterest `account`; returns the access token it was granted."""
    access, refresh = account_tokens(account["id"])
    await log_in_as(client, pinterest, account, access, refresh)
    return access


@contextmanager
def captured_logs(level: int = logging.INFO) -> Iterator[io.StringIO]:
    """Everything logged meanwhile, as JSON lines formatted like `pinauth serve` does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def events(stream: io.StringIO, text: str) -> list[dict[str, Any]]:
    """The captured JSON log lines whose event contains `text`."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in lines if text in line["event"]]


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any PINAUTH_/PINTEREST_ setting, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    return env | values


class Process:
    """`python -m pinauth <args>`, its output (stdout and stderr) in a log file in `cwd`."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, ready_url: str) -> None:
        self.args, self.env, self.cwd, self.ready_url = args, env, cwd, ready_url
        self.log = cwd / f"{args[0]}-{free_port()}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn it; `wait_ready` waits for it to answer (several can start together)."""
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
            print(self.output())  # pytest shows it with the failure
            raise

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited within 15 s."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (PINAUTH_LOG_FORMAT=json); anything else fails the test."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]


class PinauthProcess(Process):
    """A Process whose `start` returns once it answers."""

    def start(self) -> None:
        super().start()
        self.wait_ready()


def sandbox_login(browser: httpx.Client, base: str, sandbox: str) -> None:
    """A user logs in through pinauth at `base` and consents on the sandbox at `sandbox`."""
    login = browser.get(f"{base}/auth/login")
    assert login.status_code == 302, login.text
    params = parse_qs(urlsplit(login.headers["location"]).query)
    fields = {k: v[0] for k, v in params.items() if k != "response_type"}
    decision = httpx.post(f"{sandbox}/oauth/", data=fields | {"decision": "allow"})
    callback = urlsplit(decision.headers["location"]).query
    assert browser.get(f"{base}/auth/callback?{callback}").status_code == 303


def postgres_bin() -> Path | None:
    """Where PostgreSQL's server programs are (Debian's layout), if they are installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own, on a free port, that it can stop and start.

    Its data directory is a copy of a template cluster (`initdb` once per test session).
    The server refuses to run as root, so its programs run as the `postgres` OS user, in
    a directory under /tmp that user can reach (pytest's tmp_path is private to root).
    """

    def __init__(self, template: Path) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None
        self.bin = bin_dir
        self.directory = _postgres_tempdir()
        self.data = self.directory / "data"
        self.port = free_port()
        _as_postgres("cp", "-a", str(template), str(self.data))

    @staticmethod
    def template() -> Path:
        """A fresh cluster (trust authentication, superuser postgres) to copy from."""
        bin_dir = postgres_bin()
        assert bin_dir is not None
        data = _postgres_tempdir() / "template"
        _as_postgres(
            str(bin_dir / "initdb"),
            *("-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions"),
        )
        return data

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        log = str(self.directory / "server.log")
        _as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        """Fast shutdown: open connections are terminated, as when a server goes down."""
        _as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new database on this server; returns its URL."""
        _as_postgres(
            str(self.bin / "psql"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q"),
            *("-c", f'CREATE DATABASE "{name}"'),
        )
        return self.url(name)

    def remove(self) -> None:
        """Stop the server if it runs, and delete its directory."""
        _as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False
        )
        shutil.rmtree(self.directory, ignore_errors=True)


def _postgres_tempdir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pinauth-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    return directory


def _as_postgres(*command: str, check: bool = True) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stderr}")


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
    it through consent, and the backend confirms the result for `end_user_id`; returns
    the connection id the confirmation answers."""
    result = await complete_connect_link(
        backend, browser, pinterest, end_user_id, account, access, refresh
    )
    confirmed = await backend.post(
        "/v1/connections/confirm", json={"result": result, "end_user_id": end_user_id}
    )
    assert confirmed.status_code == 200, confirmed.text
    return str(confirmed.json()["id"])


async def complete_connect_link(
    backend: httpx.AsyncClient,
    browser: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    minted_for: str,
    account: dict[str, Any],
    access: str,
    refresh: str,
    *,
    return_to: str | None = None,
) -> str:
    """The backend mints a connect session for `minted_for`, and `browser` completes it
    as Pinterest `account`; returns the `pinauth_connect_result` it came back with."""
    body = {"end_user_id": minted_for} | ({"return_to": return_to} if return_to else {})
    minted = await backend.post("/v1/connect-sessions", json=body)
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
    query = parse_qs(urlsplit(callback.headers["location"]).query)
    return str(query["pinauth_connect_result"][0])


@asynccontextmanager
async def served_like_pinauth_serve(app: FastAPI, settings: Settings) -> AsyncIterator[str]:
    """`app` behind a real uvicorn with the options `pinauth serve` gives it (its HTTP
    protocol and limits included), on a loopback port, in this event loop. Yields the
    base URL; connections made before uvicorn is up wait in the listen backlog."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, **uvicorn_options(settings))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        listener.close()


class _Recorder(asyncio.Protocol):
    """Keeps every byte the server sends, even when the connection ends in a reset."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.arrived = asyncio.Event()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)


class RawConnection:
    """A TCP connection to the server: send bytes exactly as given, see what comes back."""

    def __init__(self, transport: asyncio.Transport, recorder: _Recorder) -> None:
        self._transport = transport
        self._recorder = recorder

    def send(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    @property
    def received(self) -> bytes:
        return bytes(self._recorder.received)

    @property
    def closed(self) -> bool:
        return self._recorder.closed.done()

    async def wait_for(self, marker: bytes, timeout: float = 10) -> None:
        """Wait until `marker` has arrived (e.g. the end of a first response)."""
        async with asyncio.timeout(timeout):
            while marker not in self._recorder.received:
                self._recorder.arrived.clear()
                await self._recorder.arrived.wait()

    async def wait_closed(self, timeout: float = 10) -> bytes:
        """Wait until the server ends the connection; everything it sent."""
        await asyncio.wait_for(asyncio.shield(self._recorder.closed), timeout)
        return self.received

    def close(self) -> None:
        self._transport.close()


@asynccontextmanager
async def raw_connection(base: str) -> AsyncIterator[RawConnection]:
    host, port = base.removeprefix("http://").split(":")
    transport, recorder = await asyncio.get_running_loop().create_connection(
        _Recorder, host, int(port)
    )
    connection = RawConnection(transport, recorder)
    try:
        yield connection
    finally:
        connection.close()


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def header_of(response: bytes, name: str) -> str | None:
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


async def connect_account(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> str:
    """Log in through /auth/login and /auth/callback with Pinterest mocked; returns the
    session's Cookie header. Pinterest's recorded calls are reset afterwards."""
    token = {
        "access_token": "pina_HELPER-ACCESS",
        "refresh_token": "pinr_HELPER-REFRESH",
        "token_type": "bearer",
        "expires_in": 2592000,
        "refresh_token_expires_in": 5184000,
        "scope": ",".join(settings.scopes),
        "response_type": "authorization_code",
    }
    account: dict[str, Any] = {"id": "549755885175", "username": "ada_pins"}
    pinterest.post(settings.token_url).respond(200, json=token)
    pinterest.get(f"{settings.api_url}/user_account").respond(200, json=account)
    login = await client.get("/auth/login")
    assert login.status_code == 302, login.text
    state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
    callback = await client.get("/auth/callback", params={"code": "helper", "state": state})
    assert callback.status_code == 303, callback.text
    pinterest.reset()
    return f"pinauth_session={client.cookies['pinauth_session']}"


def exchange(base: str, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes."""
    host, port = base.removeprefix("http://").split(":")
    chunks: list[bytes] = []
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def metrics_of(app: FastAPI) -> Metrics:
    """The Metrics instance `create_app` built for `app` (RequestContextMiddleware's)."""
    for middleware in app.user_middleware:
        metrics = middleware.kwargs.get("metrics")
        if isinstance(metrics, Metrics):
            return metrics
    raise AssertionError("no middleware of the app was given the metrics")


@asynccontextmanager
async def in_process_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """`app` with its lifespan running, called in-process at http://localhost:8000."""
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://localhost:8000"
        ) as client,
    ):
        yield client


def csp_directives(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as {directive: [sources]}."""
    directives: dict[str, list[str]] = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives


@dataclass(frozen=True)
class SandboxedPinauth:
    """`pinauth serve` and `pinauth sandbox` as real processes, wired to each other
    (not started: the caller starts and stops both)."""

    sandbox: PinauthProcess
    service: PinauthProcess
    base: str
    sandbox_url: str


def sandboxed_pinauth(
    tmp_path: Path, database_url: str, ready_path: str, **settings: str
) -> SandboxedPinauth:
    sandbox_port, port = free_port(), free_port()
    base, sandbox_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sandbox_port}"
    config = SandboxConfig()
    sandbox = PinauthProcess(
        ["sandbox", "--port", str(sandbox_port), "--redirect-uri", f"{base}/auth/callback"],
        clean_env(),
        tmp_path,
        f"{sandbox_url}/_sandbox/counters",
    )
    env = clean_env(
        PINTEREST_CLIENT_ID=config.client_id,
        PINTEREST_CLIENT_SECRET=config.client_secret,
        PINTEREST_REDIRECT_URI=f"{base}/auth/callback",
        PINTEREST_AUTHORIZE_URL=f"{sandbox_url}/oauth/",
        PINTEREST_API_URL=f"{sandbox_url}/v5",
        PINAUTH_DATABASE_URL=database_url,
        PINAUTH_SECRET_KEY="process-test-secret-" + "p" * 32,
        PINAUTH_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        PINAUTH_LOG_FORMAT="json",
        **settings,
    )
    service = PinauthProcess(["serve", "--port", str(port)], env, tmp_path, base + ready_path)
    return SandboxedPinauth(sandbox, service, base, sandbox_url)


@dataclass(frozen=True)
class ServedWithSandbox:
    """A running pinauth (real uvicorn, loopback) whose Pinterest is its own mounted sandbox."""

    base: str
    settings: Settings

    @property
    def sandbox(self) -> str:
        return f"{self.base}/sandbox"


@asynccontextmanager
async def pinauth_with_sandbox(
    database_url: str, *, demo_backend: bool = False, **overrides: Any
) -> AsyncIterator[ServedWithSandbox]:
    """pinauth as `pinauth serve --demo` wires it (sandbox at /sandbox, called over HTTP),
    served by uvicorn with `pinauth serve`'s options on a loopback port, in this event loop;
    with `demo_backend`, the demo page's backend panel too."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    sandbox = SandboxConfig(redirect_uris=(f"{base}/auth/callback",))
    settings = make_settings(
        database_url,
        client_id=sandbox.client_id,
        client_secret=sandbox.client_secret,
        redirect_uri=f"{base}/auth/callback",
        authorize_url=f"{base}/sandbox/oauth/",
        api_url=f"{base}/sandbox/v5",
        scopes="user_accounts:read,boards:read,boards:write,pins:read,pins:write",
        **overrides,
    )
    app = create_app(settings, sandbox=sandbox, demo_backend_url=base if demo_backend else None)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, **uvicorn_options(settings)))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:  # its lifespan has run (the demo backend's key exists)
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield ServedWithSandbox(base, settings)
    finally:
        server.should_exit = True
        await task
        listener.close()


async def consent_in_sandbox(browser: httpx.AsyncClient, start_url: str) -> httpx.Response:
    """A browser follows `start_url` (a connect_url or /auth/login) through the sandbox's
    consent page, allows, and comes back to /auth/callback; returns the callback's answer."""
    login = await browser.get(start_url)
    assert login.status_code == 302, login.text
    consent = urlsplit(login.headers["location"])
    fields = {k: v[0] for k, v in parse_qs(consent.query).items() if k != "response_type"}
    decision = await browser.post(
        consent._replace(query="").geturl(), data=fields | {"decision": "allow"}
    )
    assert decision.status_code in (302, 303), decision.text
    callback = await browser.get(decision.headers["location"])
    assert callback.status_code == 303, callback.text
    return callback


async def connect_in_sandbox(backend: httpx.AsyncClient, base: str, end_user_id: str) -> str:
    """The backend's whole connect flow against a sandbox: mint a connect session for
    `end_user_id`, a fresh browser consents, the backend confirms the result it came back
    with; returns the connection id."""
    minted = await backend.post(f"{base}/v1/connect-sessions", json={"end_user_id": end_user_id})
    assert minted.status_code == 201, minted.text
    async with httpx.AsyncClient(base_url=base, timeout=30) as browser:
        landed = await consent_in_sandbox(browser, minted.json()["connect_url"])
    [result] = parse_qs(urlsplit(landed.headers["location"]).query)["pinauth_connect_result"]
    confirmed = await backend.post(
        f"{base}/v1/connections/confirm", json={"result": result, "end_user_id": end_user_id}
    )
    assert confirmed.status_code == 200, confirmed.text
    return str(confirmed.json()["id"])


# --- the keeper and key rotation (tests/test_keeper.py, tests/test_key_rotation.py) -----


class SimClock:
    """Wall-clock and monotonic time that move only when a test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.wall = start or datetime.now(UTC)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


class RotatingTokenEndpoint:
    """Pinterest's refresh grant, strict like the real one: every refresh token works once,
    and each answer carries the next (`pinr_<n>_<k>` becomes `pinr_<n>_<k+1>`).

    Counts every call and every spent token; `down` makes it answer 503; `gate` (when set)
    holds each call until the test opens it.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.spent: list[str] = []
        self.reused: list[str] = []
        self.live: set[str] = set()
        self.down = False
        self.asked = asyncio.Event()
        self.gate: asyncio.Event | None = None

    def issue(self, name: str) -> tuple[str, str]:
        """A first token pair for connection `name`."""
        refresh = f"pinr_{name}_0"
        self.live.add(refresh)
        return f"pina_{name}_0", refresh

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return httpx.Response(503, json={"code": 503, "message": "unavailable"})
        form = parse_qs(request.content.decode())
        token = form["refresh_token"][0]
        if token not in self.live:
            self.reused.append(token)
            return httpx.Response(400, json={"code": 1, "message": "invalid refresh token"})
        self.live.remove(token)
        self.spent.append(token)
        stem, _, generation = token.rpartition("_")
        following = f"{stem}_{int(generation) + 1}"
        self.live.add(following)
        body = token_json(following.replace("pinr_", "pina_"), following, response_type="refresh")
        body.pop("refresh_token_expires_at")
        return httpx.Response(200, json=body)


async def seed_connections(
    settings: Settings,
    endpoint: RotatingTokenEndpoint,
    count: int,
    *,
    refresh_expires_in: timedelta,
    access_expires_in: timedelta = timedelta(days=20),
    now: datetime | None = None,
    cipher: TokenCipher | None = None,
    first: int = 0,
) -> list[str]:
    """Insert `count` active connections straight into the database; their public ids.

    They are numbered from `first`: account `n` starts with the tokens `pin?_<n>_0`.
    """
    now = now or datetime.now(UTC)
    cipher = cipher or TokenCipher([k.get_secret_value() for k in settings.encryption_keys])
    rows = []
    for n in range(first, first + count):
        access, refresh = endpoint.issue(str(n))
        rows.append(
            {
                "public_id": new_public_id(),
                "pinterest_user_id": str(n),
                "username": f"user{n}",
                "scopes": "boards:read",
                "access_token_encrypted": cipher.encrypt(access),
                "refresh_token_encrypted": cipher.encrypt(refresh),
                "access_token_expires_at": now + access_expires_in,
                "refresh_token_expires_at": now + refresh_expires_in,
                "status": ConnectionStatus.ACTIVE,
                "version": 1,
            }
        )
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(Connection), rows)
    finally:
        await engine.dispose()
    return [str(row["public_id"]) for row in rows]


@dataclass
class Replica:
    """What one `pinauth serve` process holds for the token lifecycle, in this process."""

    sessionmaker: async_sessionmaker[AsyncSession]
    tokens: TokenManager
    keeper: Keeper
    metrics: Metrics


@asynccontextmanager
async def replica(
    settings: Settings,
    pinterest: respx.MockRouter,
    clock: SimClock,
    seed: int = 0,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[Replica]:
    """A process's engine, TokenManager and Keeper, Pinterest reached through `pinterest`;
    leases are stamped with `clock` and renewed after `sleep`."""
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    metrics = Metrics()
    http = create_http_client(settings, httpx.MockTransport(pinterest.async_handler))
    cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])
    tokens = TokenManager(
        settings,
        sessionmaker,
        PinterestOAuth(http, settings, metrics),
        cipher,
        ConnectionCache(settings.cache_ttl_seconds),
        metrics,
        clock=clock.monotonic,
        wall_clock=clock.now,
        sleep=sleep,
    )
    keeper = Keeper(
        settings, sessionmaker, tokens, metrics, clock=clock.now, rng=random.Random(seed)
    )
    try:
        yield Replica(sessionmaker, tokens, keeper, metrics)
    finally:
        await keeper.stop()
        await tokens.aclose()
        await http.aclose()
        await engine.dispose()


async def stored_connections(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every connection as stored, by public id, its tokens decrypted (None if no key can)."""
    cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])
    engine = create_async_engine(settings.database_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(select(*Connection.__table__.c))).mappings().all()
    finally:
        await engine.dispose()

    def plain(ciphertext: str | None) -> str | None:
        if ciphertext is None:
            return None
        try:
            return cipher.decrypt(ciphertext)
        except TokenDecryptionError:
            return None

    return {
        row["public_id"]: dict(row)
        | {
            "access": plain(row["access_token_encrypted"]),
            "refresh": plain(row["refresh_token_encrypted"]),
        }
        for row in rows
    }


async def outbox_types(settings: Settings) -> list[tuple[str, str]]:
    """(event type, connection id) of every event in the webhook outbox, oldest first."""
    engine = create_async_engine(settings.database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT type, connection_id FROM webhook_events ORDER BY id")
            )
            return [(str(row[0]), str(row[1])) for row in rows]
    finally:
        await engine.dispose()


# --- real-browser tests (Debian's Chromium; Playwright never downloads a browser) -------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> None:
    """Skip the calling test module without Chromium; CI (PINAUTH_REQUIRE_E2E=1) fails instead."""
    if Path(CHROMIUM).exists() and shutil.which("chromium") is not None:
        return
    if os.environ.get("PINAUTH_REQUIRE_E2E") == "1":
        pytest.fail(f"PINAUTH_REQUIRE_E2E=1 but {CHROMIUM} is missing", pytrace=False)
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@contextmanager
def demo_process(tmp_path: Path, port: int, **env_values: str) -> Iterator[None]:
    """`pinauth serve --demo` on `port`, its own SQLite file in `tmp_path`; its output is
    printed at the end (pytest shows it only when a test failed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env |= {"PINAUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}", **env_values}
    process = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/healthz", process)
        yield
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        print(output)
