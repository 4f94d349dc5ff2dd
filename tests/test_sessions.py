"""Sessions: /me, logout, disconnect."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx
from sqlalchemy import Engine, event, func, select, update

from pinauth.db import create_engine, create_sessionmaker
from pinauth.models import AuthSession, Connection
from pinauth.settings import Settings
from tests.helpers import log_in, make_settings, run_client


async def count_rows(settings: Settings, model: type[AuthSession] | type[Connection]) -> int:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            return int((await db.execute(select(func.count()).select_from(model))).scalar_one())
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "cookie",
    [
        None,
        "garbage",
        # Well-formed but unsigned / signed by someone else.
        "dGhpcy1pcy1ub3QtYS1zZXNzaW9u.AAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
async def test_me_requires_a_valid_session(client: httpx.AsyncClient, cookie: str | None) -> None:
    if cookie:
        client.cookies.set("pinauth_session", cookie)
    response = await client.get("/me")
    assert response.status_code == 401
    assert response.json() == {
        "error": "not_authenticated",
        "message": "No valid session: connect a Pinterest account through /auth/login first.",
    }


async def test_logout_ends_the_session_server_side(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    cookie = client.cookies["pinauth_session"]

    response = await client.post("/auth/logout")

    assert response.status_code == 204
    assert 'pinauth_session=""' in response.headers["set-cookie"]
    assert "Max-Age=0" in response.headers["set-cookie"]
    # Replaying the old cookie does not work: the session is gone from the database.
    client.cookies.set("pinauth_session", cookie)
    assert (await client.get("/me")).status_code == 401
    assert await count_rows(settings, AuthSession) == 0
    assert await count_rows(settings, Connection) == 1  # the connection itself stays


async def test_logout_without_session_is_harmless(client: httpx.AsyncClient) -> None:
    assert (await client.post("/auth/logout")).status_code == 204


async def test_logout_rejects_foreign_origin(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    response = await client.post("/auth/logout", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert (await client.get("/me")).status_code == 200


async def test_disconnect_deletes_tokens_and_every_session(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    other_browser = client.cookies["pinauth_session"]
    client.cookies.clear()
    await log_in(client, pinterest)
    assert await count_rows(settings, AuthSession) == 2

    response = await client.delete("/auth/connection")

    assert response.status_code == 204
    assert await count_rows(settings, Connection) == 0
    assert await count_rows(settings, AuthSession) == 0
    client.cookies.set("pinauth_session", other_browser)
    assert (await client.get("/me")).status_code == 401


async def test_disconnect_requires_a_session(client: httpx.AsyncClient) -> None:
    response = await client.delete("/auth/connection")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


async def test_session_cache_expiry_causes_one_database_read(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """When a cached session expires under load, one query refills it for everyone."""
    session_reads: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM sessions" in statement:
            session_reads.append(statement)

    settings = make_settings(database_url, cache_ttl_seconds=0.05)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        await asyncio.sleep(0.1)  # the cached session expires
        # Every engine's statements, the app's included: observed, not mocked.
        event.listen(Engine, "before_cursor_execute", count)
        try:
            responses = await asyncio.gather(*(client.get("/me") for _ in range(20)))
        finally:
            event.remove(Engine, "before_cursor_execute", count)

    assert [r.status_code for r in responses] == [200] * 20
    assert len(session_reads) == 1


async def test_expired_sessions_are_purged_at_the_next_login(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            await db.execute(
                update(AuthSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
    finally:
        await engine.dispose()
    client.cookies.clear()

    await log_in(client, pinterest)

    assert await count_rows(settings, AuthSession) == 1  # only the new one
