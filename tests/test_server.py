"""The server's own limits, over raw sockets against uvicorn configured as `pinauth serve` runs it:
a cap on the request line and headers (431) and a deadline for the whole request (408)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import respx

from pinauth.app import create_app
from pinauth.settings import Settings
from tests.helpers import (
    RawConnection,
    body_of,
    connect_account,
    header_of,
    raw_connection,
    served_like_pinauth_serve,
    status_of,
)

BIG = 64 * 1024


async def test_a_64_kib_header_gets_431_and_the_service_stays_responsive(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the head cap: an oversized request line + headers is answered 431 and the
    connection closed once 16 KiB have arrived, instead of being buffered whole; four at
    once leave /healthz answering."""
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with served_like_pinauth_serve(app, settings) as base:
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * BIG + b"\r\n\r\n"
        async with (
            raw_connection(base) as c1,
            raw_connection(base) as c2,
            raw_connection(base) as c3,
            raw_connection(base) as c4,
        ):
            for connection in (c1, c2, c3, c4):
                connection.send(huge)
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                assert (await client.get("/healthz")).status_code == 200
            answers = [await c.wait_closed() for c in (c1, c2, c3, c4)]
        for answer in answers:
            assert status_of(answer) == 431, answer[:200]
            assert header_of(answer, "connection") == "close"
            assert header_of(answer, "x-content-type-options") == "nosniff"
            assert json.loads(body_of(answer))["error"] == "request_header_too_large"

        # The URL counts too; so does a head that never ends, and one that follows another
        # request in the same write (the count restarts there).
        async with (
            raw_connection(base) as long_url,
            raw_connection(base) as endless,
            raw_connection(base) as pipelined,
        ):
            long_url.send(b"GET /healthz?" + b"q" * BIG + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            endless.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"e" * 20_000)
            pipelined.send(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n"
            )
            assert status_of(await long_url.wait_closed()) == 431
            assert status_of(await endless.wait_closed()) == 431
            answer = await pipelined.wait_closed()
        assert status_of(answer) == 200
        assert answer.count(b"HTTP/1.1 431 ") == 1, answer


async def test_heads_under_the_cap_and_large_bodies_are_served(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards against false 431s: a 15 KiB head passes, three pipelined 8 KiB heads sent in
    one write (24 KiB together) are each served, and a 100 KiB body never counts as head."""
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with served_like_pinauth_serve(app, settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            cookie = await connect_account(client, pinterest, settings)
            near = await client.get("/healthz", headers={"X-Near": "n" * (15 * 1024)})
            assert near.status_code == 200

        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 8192 + b"\r\n\r\n"
        last = one.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
        async with raw_connection(base) as connection:
            connection.send(one + one + last)
            answer = await connection.wait_closed()
        assert answer.count(b"HTTP/1.1 200 OK") == 3, answer

        created = pinterest.post(f"{settings.api_url}/boards").respond(201, json={"id": "1"})
        body = json.dumps({"name": "x", "description": "d" * (100 * 1024)}).encode()
        async with raw_connection(base) as connection:
            connection.send(
                b"POST /pinterest/boards HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nCookie: " + cookie.encode() + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            assert status_of(await connection.wait_closed()) == 201
        assert created.calls.last.request.content == body


async def test_a_trickled_body_is_cut_with_408_at_the_deadline(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the whole-request deadline for bodies: one byte every 0.05 s keeps the
    connection busy (no idle timeout would fire), yet the request is answered 408 when
    the deadline (0.5 s here) passes, and nothing reaches Pinterest. It is the second
    request on its connection, so the deadline is the request's own."""
    settings = settings.model_copy(update={"request_read_timeout_seconds": 0.5})
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with served_like_pinauth_serve(app, settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            cookie = await connect_account(client, pinterest, settings)
        upstream = pinterest.route().respond(201, json={"id": "1"})
        async with raw_connection(base) as connection:
            connection.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await connection.wait_for(b'{"status":"ok"}')
            started = time.monotonic()
            connection.send(
                b"POST /pinterest/boards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nCookie: " + cookie.encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
            )
            answer = await _trickle_until_closed(connection)
            elapsed = time.monotonic() - started
        first, _, answer = answer.partition(b'{"status":"ok"}')
        assert status_of(first) == 200
        assert status_of(answer) == 408, answer
        assert json.loads(body_of(answer))["error"] == "request_timeout"
        assert answer.count(b"HTTP/1.1") == 1  # the app's own answer is not written after it
        assert 0.4 < elapsed < 5
        assert not upstream.called


async def test_a_trickled_head_is_cut_with_408_and_a_silent_connection_is_closed(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the deadline for heads (slowloris; a second request on its connection) and
    for connections that never send a request: both end at the deadline, the first with
    408, the second without a word."""
    settings = settings.model_copy(update={"request_read_timeout_seconds": 0.5})
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with served_like_pinauth_serve(app, settings) as base:
        async with raw_connection(base) as slow, raw_connection(base) as silent:
            slow.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await slow.wait_for(b'{"status":"ok"}')
            slow.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            answer = await _trickle_until_closed(slow)
            assert await silent.wait_closed(timeout=5) == b""
        assert status_of(answer.partition(b'{"status":"ok"}')[2]) == 408, answer

        # A request that arrives in time, in two writes, is served as always.
        async with raw_connection(base) as connection:
            for piece in (
                b"GET /healthz HTTP/1.1\r\n",
                b"Host: x\r\n",
                b"Connection: close\r\n\r\n",
            ):
                connection.send(piece)
            assert status_of(await connection.wait_closed()) == 200


async def _trickle_until_closed(connection: RawConnection) -> bytes:
    for _ in range(200):  # 10 s at most
        if connection.closed:
            break
        connection.send(b" ")
        await asyncio.sleep(0.05)  # the slow client's pace, not a wait for the server
    return await connection.wait_closed(timeout=5)
