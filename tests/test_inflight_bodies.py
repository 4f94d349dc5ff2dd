"""The proxied request bodies one process holds at once are capped
(PINAUTH_MAX_INFLIGHT_BODY_BYTES): past the cap, 503 busy with Retry-After before the body
is read, and every request gives its share back however it ends."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import httpx
import pytest
import respx
from pydantic import ValidationError

from pinauth.settings import Settings
from tests.helpers import API, log_in, make_settings, run_client

BODY = 1000  # PINAUTH_MAX_BODY_BYTES here
CAP = 2500  # PINAUTH_MAX_INFLIGHT_BODY_BYTES here: two whole bodies fit, three do not


class Sent:
    """A body sent in `chunks` pieces of `size` bytes, counting the pieces read."""

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks, self.size, self.read = chunks, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.read += 1
            yield b"c" * self.size


class HeldUpstream:
    """Pinterest's POST /pins: bodies starting with `h` are held until `release` is set,
    once `arrived` has counted them in (so a test knows they are in flight); `e` fails to
    connect; anything else is answered at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0
        self._arrivals = asyncio.Condition()
        self.bodies: list[bytes] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        self.bodies.append(body)
        if body.startswith(b"e"):
            raise httpx.ConnectError("refused")
        if body.startswith(b"h"):
            async with self._arrivals:
                self.held += 1
                self._arrivals.notify_all()
            await self.release.wait()
        return httpx.Response(201, json={"id": "1", "size": len(body)})

    async def arrived(self, count: int) -> None:
        async with asyncio.timeout(10), self._arrivals:
            await self._arrivals.wait_for(lambda: self.held >= count)


def assert_busy(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "busy"
    assert response.headers["retry-after"] == "1"


async def test_bodies_past_the_in_flight_cap_are_refused_unread_and_every_share_returns(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the cap and its release: with two 1,000-byte bodies held upstream (2,000 of
    2,500 bytes), a third declared 1,000 bytes is refused 503 busy before a byte is read,
    and a chunked body as soon as its chunks pass the cap; then, after answers, a failed
    upstream, 413s and the refusals themselves, exactly the whole budget is free again
    (2,000 held plus 500 fit, 501 do not)."""
    settings = make_settings(database_url, max_body_bytes=BODY, max_inflight_body_bytes=CAP)
    upstream = HeldUpstream()
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        pinterest.post(f"{API}/pins").mock(side_effect=upstream)

        def post(content: bytes | Sent, **headers: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(
                client.post("/pinterest/pins", content=content, headers=headers)
            )

        first, second = post(b"h" * BODY), post(b"h" * BODY)
        await upstream.arrived(2)

        declared = Sent(chunks=1, size=BODY)
        assert_busy(await post(declared, **{"Content-Length": str(BODY)}))
        assert declared.read == 0  # refused before its body was read
        chunked = Sent(chunks=3, size=400)  # no Content-Length: reserved as it is read
        assert_busy(await post(chunked))
        assert chunked.read < 3
        assert len(upstream.bodies) == 2  # neither refused body went to Pinterest

        upstream.release.set()
        assert [(await t).status_code for t in (first, second)] == [201, 201]

        # Every other way a proxied body's request ends gives its bytes back.
        assert (await post(b"e" * BODY)).status_code == 502  # upstream unreachable
        assert (await post(b"x" * (BODY + 1))).status_code == 413  # declared, unreserved
        assert (await post(Sent(chunks=3, size=400))).status_code == 413  # 800 reserved first
        assert (await post(b"x" * BODY)).status_code == 201

        upstream.release.clear()
        upstream.held = 0
        first, second = post(b"h" * BODY), post(b"h" * BODY)
        await upstream.arrived(2)
        assert (await post(b"x" * (CAP - 2 * BODY))).status_code == 201  # fits exactly
        assert_busy(await post(b"x" * (CAP - 2 * BODY + 1)))
        upstream.release.set()
        assert [(await t).status_code for t in (first, second)] == [201, 201]


async def test_bodiless_and_small_calls_pass_while_the_budget_is_spent(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """A GET (no body) reserves nothing, so it is served while bodies fill the budget."""
    settings = make_settings(database_url, max_body_bytes=BODY, max_inflight_body_bytes=BODY)
    upstream = HeldUpstream()
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        pinterest.post(f"{API}/pins").mock(side_effect=upstream)
        pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        held = asyncio.create_task(client.post("/pinterest/pins", content=b"h" * BODY))
        await upstream.arrived(1)

        assert (await client.get("/pinterest/boards")).status_code == 200
        assert_busy(await client.post("/pinterest/pins", content=b"x"))

        upstream.release.set()
        assert (await held).status_code == 201


def test_a_cap_below_one_largest_body_is_refused_at_configuration() -> None:
    """Guards the settings check: such a cap would refuse every largest body as busy."""
    with pytest.raises(ValidationError, match="PINAUTH_MAX_INFLIGHT_BODY_BYTES"):
        Settings(
            _env_file=None,
            PINAUTH_MAX_BODY_BYTES=2000,
            PINAUTH_MAX_INFLIGHT_BODY_BYTES=1999,
        )
    assert Settings(_env_file=None).max_inflight_body_bytes == 64 * 1024 * 1024


async def test_a_large_declared_body_reaches_pinterest_byte_for_byte(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """A declared body over 256 KiB is read into one buffer of its size (pinterest.py);
    sent in uneven chunks, it arrives whole and unchanged, and its share is returned."""
    size = 700_001
    settings = make_settings(database_url, max_body_bytes=size, max_inflight_body_bytes=size)
    body = os.urandom(size)

    async def uneven() -> AsyncIterator[bytes]:
        for start, end in ((0, 1), (1, 65_537), (65_537, 400_000), (400_000, size)):
            yield body[start:end]

    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        route = pinterest.post(f"{API}/pins").respond(201, json={})
        for _ in range(2):  # the second fits only if the first gave its share back
            response = await client.post(
                "/pinterest/pins", content=uneven(), headers={"Content-Length": str(size)}
            )
            assert response.status_code == 201, response.text
            assert route.calls.last.request.content == body
