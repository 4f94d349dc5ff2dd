"""POST /auth/refresh: rotation persisted atomically, one refresh at a time, failures classified."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from sqlalchemy import select

from pinauth.crypto import TokenCipher
from pinauth.db import create_engine, create_sessionmaker
from pinauth.models import Connection
from pinauth.settings import Settings
from tests.helpers import (
    ABSURD_LIFETIMES,
    ACCESS_2,
    BASIC,
    REFRESH_1,
    REFRESH_2,
    SERVICE,
    TEN_YEARS,
    TOKEN_URL,
    counted_client,
    log_in,
    make_settings,
    run_client,
    token_json,
    warm_up,
    with_fields,
)


async def stored_connection(settings: Settings) -> Connection:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            return (await db.execute(select(Connection))).scalar_one()
    finally:
        await engine.dispose()


def cipher(settings: Settings) -> TokenCipher:
    return TokenCipher([k.get_secret_value() for k in settings.encryption_keys])


async def test_refresh_rotates_and_persists_the_new_pair(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    before = await stored_connection(settings)
    route = pinterest.post(TOKEN_URL).respond(
        200, json=token_json(ACCESS_2, REFRESH_2, expires_in=60, response_type="refresh_token")
    )

    response = await client.post("/auth/refresh")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token_expires_at", "refresh_token_expires_at"}
    assert route.call_count == 1
    sent = route.calls.last.request
    assert sent.headers["authorization"] == BASIC
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(sent.content.decode(), strict_parsing=True) == {
        "grant_type": ["refresh_token"],
        "refresh_token": [REFRESH_1],
    }
    after = await stored_connection(settings)
    assert cipher(settings).decrypt(after.access_token_encrypted) == ACCESS_2
    assert after.refresh_token_encrypted is not None
    assert cipher(settings).decrypt(after.refresh_token_encrypted) == REFRESH_2
    assert after.version == before.version + 1
    assert after.access_token_expires_at < before.access_token_expires_at


async def test_refresh_keeps_the_old_refresh_token_if_none_comes_back(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, None))

    assert (await client.post("/auth/refresh")).status_code == 200

    after = await stored_connection(settings)
    assert cipher(settings).decrypt(after.access_token_encrypted) == ACCESS_2
    assert after.refresh_token_encrypted is not None
    assert cipher(settings).decrypt(after.refresh_token_encrypted) == REFRESH_1


@pytest.mark.parametrize("fields", ABSURD_LIFETIMES)
async def test_absurd_lifetimes_still_store_the_rotated_tokens(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    fields: dict[str, int | None],
) -> None:
    await log_in(client, pinterest)
    pinterest.post(TOKEN_URL).respond(
        200, json=with_fields(token_json(ACCESS_2, REFRESH_2), fields)
    )

    response = await client.post("/auth/refresh")

    assert response.status_code == 200, response.text
    after = await stored_connection(settings)
    assert cipher(settings).decrypt(after.access_token_encrypted) == ACCESS_2
    assert after.refresh_token_encrypted is not None
    assert cipher(settings).decrypt(after.refresh_token_encrypted) == REFRESH_2
    for field, value in response.json().items():
        remaining = datetime.fromisoformat(value).timestamp() - time.time()
        assert -60 < remaining <= TEN_YEARS, (field, value)


async def test_concurrent_refreshes_make_one_token_request(
    pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards single flight: Pinterest answers the token request only once all 20 calls
    are inside pinauth at the same time, so a caller that could refresh on its own would
    have. Fails (20 token requests) without the per-connection lock on SQLite."""
    async with counted_client(settings, pinterest) as (client, in_flight):
        await log_in(client, pinterest)
        await warm_up(client)

        async def token_endpoint(_request: httpx.Request) -> httpx.Response:
            await in_flight.reached(20)
            return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

        route = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        responses = await asyncio.gather(*(client.post("/auth/refresh") for _ in range(20)))

    assert [r.status_code for r in responses] == [200] * 20
    assert route.call_count == 1
    assert len({r.json()["access_token_expires_at"] for r in responses}) == 1
    after = await stored_connection(settings)
    assert after.refresh_token_encrypted is not None
    assert cipher(settings).decrypt(after.refresh_token_encrypted) == REFRESH_2


# A 401 is the app's credentials refused, not the grant: tests/test_client_rejected.py.
@pytest.mark.parametrize("status", [400, 403])
async def test_rejected_refresh_token_requires_reauthorization(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings, status: int
) -> None:
    await log_in(client, pinterest)
    route = pinterest.post(TOKEN_URL).respond(
        status, json={"code": 1, "message": "Invalid refresh token."}
    )

    response = await client.post("/auth/refresh")

    assert response.status_code == 401
    assert response.json()["error"] == "reauthorization_required"
    assert response.json()["login_url"] == f"{SERVICE}/auth/login"
    assert (await client.get("/me")).json()["status"] == "reauthorization_required"
    # No retry storm: the dead token is not sent again.
    again = await client.post("/auth/refresh")
    assert again.json()["error"] == "reauthorization_required"
    assert route.call_count == 1
    # The tokens are kept (encrypted), only taken out of use until the next login.
    after = await stored_connection(settings)
    assert after.refresh_token_encrypted is not None


async def test_login_again_restores_a_connection_needing_reauthorization(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    pinterest.post(TOKEN_URL).respond(400, json={"code": 2, "message": "dead"})
    await client.post("/auth/refresh")

    await log_in(client, pinterest)

    assert (await client.get("/me")).json()["status"] == "active"


@pytest.mark.parametrize(
    "failure",
    [httpx.Response(500, json={"code": 0, "message": "oops"}), httpx.ConnectError("down")],
)
async def test_transient_refresh_failure_keeps_tokens_and_cools_down(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    failure: httpx.Response | Exception,
) -> None:
    await log_in(client, pinterest)
    before = await stored_connection(settings)
    route = pinterest.post(TOKEN_URL)
    if isinstance(failure, Exception):
        route.side_effect = failure
    else:
        route.return_value = failure

    first = await client.post("/auth/refresh")
    second = await client.post("/auth/refresh")

    for response in (first, second):
        assert response.status_code == 503
        assert response.json()["error"] == "upstream_error"
        assert int(response.headers["retry-after"]) >= 1
    assert route.call_count == 1  # the cooldown kept the second one from Pinterest
    after = await stored_connection(settings)
    assert after.status == "active"
    assert after.refresh_token_encrypted == before.refresh_token_encrypted


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        (SERVICE, True),
        ("https://app.example.com", True),
        ("https://evil.example", False),
        ("null", False),
    ],
)
async def test_refresh_checks_origin(
    database_url: str, pinterest: respx.MockRouter, origin: str | None, allowed: bool
) -> None:
    settings = make_settings(database_url, cors_origins="https://app.example.com")
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        route = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
        headers = {"Origin": origin} if origin else {}
        response = await client.post("/auth/refresh", headers=headers)
    assert response.status_code == (200 if allowed else 403)
    assert route.call_count == (1 if allowed else 0)
    if not allowed:
        assert response.json()["error"] == "forbidden_origin"


async def test_refresh_without_session(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/refresh")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
