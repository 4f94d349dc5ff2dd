"""Test helpers (new ones live here rather than in conftest.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import respx
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from pinauth.observability import Metrics
from pinauth.server import uvicorn_options
from pinauth.settings import Settings


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
