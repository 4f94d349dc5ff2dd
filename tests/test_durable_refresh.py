"""A token Pinterest sent is stored whatever happens to the request that asked for it."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import respx

from pinauth.settings import Settings
from tests.helpers import (
    ACCESS_1,
    ACCESS_2,
    ALL_TOKENS,
    API,
    REFRESH_1,
    REFRESH_2,
    TOKEN_URL,
    allow_token_writes,
    counted_client,
    expire_refresh_leases,
    log_in,
    make_settings,
    refuse_token_writes,
    run_client,
    stored_tokens,
    token_json,
)


async def test_cancelled_request_still_stores_the_new_tokens(
    pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards the shield around the refresh task: the request is cancelled (a client
    disconnect) while Pinterest is answering; the rotated pair must still be stored.
    Fails (the old, now dead, pair stays stored) without `asyncio.shield`."""
    asked, answer = asyncio.Event(), asyncio.Event()

    async def token_endpoint(_request: httpx.Request) -> httpx.Response:
        asked.set()
        await answer.wait()
        return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        _, _, version = await stored_tokens(settings)
        token = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        request = asyncio.create_task(client.post("/auth/refresh"))
        await asyncio.wait_for(asked.wait(), 10)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        answer.set()
        # Leaving the block shuts the app down, which waits for the refresh in flight.

    assert token.call_count == 1
    assert await stored_tokens(settings) == (ACCESS_2, REFRESH_2, version + 1)


@pytest.mark.parametrize("cache_ttl", [None, 0], ids=["cache_on", "cache_off"])
async def test_refused_token_write_keeps_serving_the_new_token_and_stores_it_later(
    pinterest: respx.MockRouter,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    cache_ttl: int | None,
) -> None:
    """Guards the in-memory copy and the write retry: the database refuses the write of
    the answer. Requests go on with the new access token, the dead refresh token is never
    spent again, and the write lands once the database takes writes again (here at the
    latest on shutdown, which waits for it). Fails without `_unsaved` / the retrying
    writer (the old pair stays stored, or the next call refreshes with a dead token).
    With the cache off (PINAUTH_CACHE_TTL=0) nothing but `_unsaved` holds the new pair."""
    settings = (
        make_settings(database_url)
        if cache_ttl is None
        else make_settings(database_url, cache_ttl_seconds=cache_ttl)
    )
    caplog.set_level(logging.INFO)

    async def token_endpoint(_request: httpx.Request) -> httpx.Response:
        # Pinterest has rotated the token; now the database goes away.
        await refuse_token_writes(settings.database_url)
        return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        _, _, version = await stored_tokens(settings)
        token = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

        refreshed = await client.post("/auth/refresh")
        assert refreshed.status_code == 200
        assert (await client.get("/pinterest/boards")).status_code == 200
        assert boards.calls.last.request.headers["authorization"] == f"Bearer {ACCESS_2}"
        # Another refresh would spend the dead refresh token: it gets the kept pair.
        assert (await client.post("/auth/refresh")).status_code == 200
        assert token.call_count == 1
        assert await stored_tokens(settings) == (ACCESS_1, REFRESH_1, version)

        await allow_token_writes(settings.database_url)

    assert await stored_tokens(settings) == (ACCESS_2, REFRESH_2, version + 1)
    log = caplog.text
    assert "could not store connection" in log
    assert "stored connection" in log
    assert log.count("could not store connection") == 1  # once, not per attempt
    assert not [token for token in ALL_TOKENS if token in log]
    assert "gAAAAA" not in log  # no encrypted token either (Fernet's prefix)


async def test_a_live_lease_elsewhere_is_waited_for_not_doubled(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the lease compare-and-swap across processes (two apps, one database): while
    A's token call is in flight, B must not spend the same refresh token; it waits, and
    answers 503 with Retry-After when A takes longer than PINAUTH_REFRESH_LOCK_TIMEOUT.
    Fails (B sends the spent token; Pinterest rejects it; B answers 401) without the
    lease check in `claim_refresh_lease`."""
    settings_a = make_settings(database_url)
    settings_b = make_settings(
        database_url,
        encryption_keys=settings_a.encryption_keys[0],
        refresh_lock_timeout_seconds=0.5,
    )
    asked, answer = asyncio.Event(), asyncio.Event()

    async def token_endpoint(request: httpx.Request) -> httpx.Response:
        if REFRESH_1 not in request.content.decode() or asked.is_set():
            return httpx.Response(400, json={"code": 1, "message": "Invalid refresh token."})
        asked.set()
        await answer.wait()
        return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

    async with run_client(settings_a, pinterest) as a, run_client(settings_b, pinterest) as b:
        await log_in(a, pinterest)
        b.cookies.update(a.cookies)
        token = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        first = asyncio.create_task(a.post("/auth/refresh"))
        await asyncio.wait_for(asked.wait(), 10)

        waited = await b.post("/auth/refresh")

        answer.set()
        assert (await first).status_code == 200
        after = await b.post("/auth/refresh")

    assert waited.status_code == 503, waited.text
    assert waited.json()["error"] == "upstream_error"
    # Until the holder's lease runs out at the latest (a fresh one here: about 15 s).
    assert 10 < int(waited.headers["retry-after"]) <= 15
    assert token.call_count == 1
    assert after.status_code == 200
    assert await stored_tokens(settings_a) == (ACCESS_2, REFRESH_2, 2)


async def test_a_lease_elsewhere_that_ends_hands_over_the_new_tokens(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """B finds A's live lease, polls, and uses A's stored tokens once they land, without
    a token call of its own."""
    settings_a = make_settings(database_url)
    settings_b = make_settings(database_url, encryption_keys=settings_a.encryption_keys[0])
    asked, answer = asyncio.Event(), asyncio.Event()

    async def token_endpoint(_request: httpx.Request) -> httpx.Response:
        asked.set()
        await answer.wait()
        return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

    async with (
        run_client(settings_a, pinterest) as a,
        counted_client(settings_b, pinterest) as (b, in_b),
    ):
        await log_in(a, pinterest)
        b.cookies.update(a.cookies)
        assert (await b.get("/me")).status_code == 200  # B has read the row as it was
        token = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        first = asyncio.create_task(a.post("/auth/refresh"))
        await asyncio.wait_for(asked.wait(), 10)
        second = asyncio.create_task(b.post("/auth/refresh"))
        await in_b.reached(1)
        answer.set()
        responses = [await first, await second]

    assert [r.status_code for r in responses] == [200, 200]
    assert token.call_count == 1
    assert responses[0].json() == responses[1].json()


async def test_a_late_write_wins_over_a_rejection_of_the_token_it_replaced(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards `over_rejection`: A got the new pair but the database refused it for longer
    than A's lease. B then took the lease over, spent the dead refresh token, was rejected
    and marked the connection reauthorization_required. A's write, landing afterwards,
    must still win: its pair is the live one. Fails (the user stays logged out, with the
    live pair dropped) without the `over_rejection` condition."""
    settings_a = make_settings(database_url)
    settings_b = make_settings(database_url, encryption_keys=settings_a.encryption_keys[0])

    async def token_endpoint(request: httpx.Request) -> httpx.Response:
        if REFRESH_1 in request.content.decode() and not spent:
            spent.append(REFRESH_1)
            await refuse_token_writes(database_url)
            return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))
        return httpx.Response(400, json={"code": 1, "message": "Invalid refresh token."})

    spent: list[str] = []
    async with run_client(settings_b, pinterest) as b:
        async with run_client(settings_a, pinterest) as a:
            await log_in(a, pinterest)
            b.cookies.update(a.cookies)
            token = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
            assert (await a.post("/auth/refresh")).status_code == 200
            # A's lease runs out while its write is refused (here: it is made to).
            await expire_refresh_leases(database_url)

            rejected = await b.post("/auth/refresh")
            assert rejected.status_code == 401
            assert rejected.json()["error"] == "reauthorization_required"

            await allow_token_writes(database_url)
            # A's shutdown waits for its write.
    assert await stored_tokens(settings_a) == (ACCESS_2, REFRESH_2, 3)
    assert token.call_count == 2
    async with run_client(settings_b, pinterest) as fresh:  # nothing cached
        fresh.cookies.update(b.cookies)
        assert (await fresh.get("/me")).json()["status"] == "active"
