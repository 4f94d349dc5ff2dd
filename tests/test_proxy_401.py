"""Pinterest's own 401 never reaches the client (issue 19, item 5).

A call that met a 401 ends in Pinterest's answer to a retry with a token issued after
that 401, or in pinauth's own reauthorization_required or 503. Pinterest is mocked at
the edge with respx.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from pinauth.migrations import upgrade_to_head
from pinauth.settings import Settings
from tests.helpers import (
    ACCESS_1,
    ACCESS_2,
    API,
    REFRESH_2,
    TOKEN_URL,
    PrivatePostgres,
    allow_token_writes,
    log_in,
    make_settings,
    refuse_token_writes,
    run_client,
    stored_tokens,
    token_json,
)

REJECTED = {"code": 2, "message": "Authentication failed."}


def bearers(route: respx.Route) -> list[str]:
    return [str(call.request.headers["authorization"]) for call in route.calls]


def assert_pinauths_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "upstream_error"
    assert int(response.headers["retry-after"]) >= 1


async def test_a_fresh_token_rejected_too_is_pinauths_503_not_pinterests_401(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """401, then the retry with the token refreshed after it gets a 401 again: one refresh,
    no loop, and the client gets pinauth's 503, not Pinterest's 401."""
    await log_in(client, pinterest)
    token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
    api = pinterest.get(f"{API}/boards").respond(401, json=REJECTED)

    response = await client.get("/pinterest/boards")

    assert_pinauths_503(response)
    assert token.call_count == 1
    assert bearers(api) == [f"Bearer {ACCESS_1}", f"Bearer {ACCESS_2}"]


async def test_tokens_held_in_memory_then_rejected_end_in_503_not_401(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards "only a token issued after the 401": the database refuses the write of new
    tokens, so the process serves them from memory; when Pinterest then rejects them,
    nothing newer can be had (a refresh needs the database), and the call used to retry
    with the same rejected token and pass Pinterest's 401 on. Now: 503, and no refresh
    token spent while the first answer is unsaved."""
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        await refuse_token_writes(settings.database_url)
        token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
        accepted = {f"Bearer {ACCESS_2}"}
        api = pinterest.get(f"{API}/boards").mock(
            side_effect=lambda request: httpx.Response(
                200 if request.headers["authorization"] in accepted else 401,
                json={"items": []} if request.headers["authorization"] in accepted else REJECTED,
            )
        )
        first = await client.get("/pinterest/boards")  # refreshed; served from memory
        accepted.clear()  # Pinterest now rejects the in-memory token too
        second = await client.get("/pinterest/boards")
        await allow_token_writes(settings.database_url)

    assert first.status_code == 200
    assert_pinauths_503(second)
    assert token.call_count == 1
    assert bearers(api) == [
        f"Bearer {ACCESS_1}",
        f"Bearer {ACCESS_2}",
        f"Bearer {ACCESS_2}",
    ]
    # The shutdown waited for the write that was pending.
    assert (await stored_tokens(settings))[:2] == (ACCESS_2, REFRESH_2)


@pytest.fixture
def private_database(private_postgres: PrivatePostgres) -> str:
    url = private_postgres.create_database("pinauth")
    upgrade_to_head(url)
    return url


async def test_a_401_met_while_the_database_is_down_is_pinauths_503(
    private_postgres: PrivatePostgres, private_database: str, pinterest: respx.MockRouter
) -> None:
    """PostgreSQL stops between the call and its 401: the refresh cannot claim its lease,
    and the client gets 503 database_unavailable, never Pinterest's 401, and no refresh
    token is spent without a database to store its answer."""
    settings = make_settings(private_database, database_timeout_seconds=1)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))

        async def stop_then_reject(_request: httpx.Request) -> httpx.Response:
            await asyncio.to_thread(private_postgres.stop)
            return httpx.Response(401, json=REJECTED)

        pinterest.get(f"{API}/boards").mock(side_effect=stop_then_reject)
        try:
            response = await client.get("/pinterest/boards")
        finally:
            await asyncio.to_thread(private_postgres.start)

    assert response.status_code == 503, response.text
    assert response.json()["error"] == "database_unavailable"
    assert token.call_count == 0
