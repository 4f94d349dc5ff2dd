"""Rows anyone can create are bounded: pending logins, sessions per connection; expired
rows are purged on a schedule by a task the app's lifespan runs."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import respx

from pinauth.app import create_app
from pinauth.db import create_engine, create_sessionmaker
from pinauth.housekeeping import ExpiredRowPurger
from pinauth.models import LoginState
from pinauth.repository import LoginStateRepository
from pinauth.settings import Settings
from tests.helpers import (
    API,
    TOKEN_URL,
    USER_ACCOUNT,
    count_rows,
    make_settings,
    mock_login_upstream,
    run_client,
    serve_app,
    start_login,
    token_json,
)

JSON = {"Accept": "application/json"}


async def begin_login(client: httpx.AsyncClient) -> tuple[str, str]:
    """A login started by a browser of its own: (state, that browser's login cookie)."""
    client.cookies.clear()
    state = await start_login(client)
    return state, client.cookies["pinauth_login"]


async def finish_login(client: httpx.AsyncClient, state: str, nonce: str) -> httpx.Response:
    client.cookies.clear()
    client.cookies.set("pinauth_login", nonce)
    # JSON, so a failure is the error itself rather than a redirect to the frontend.
    return await client.get("/auth/callback", params={"code": "c", "state": state}, headers=JSON)


async def new_browser_session(client: httpx.AsyncClient) -> str:
    """A complete login from a fresh browser (no earlier session cookie); its cookie."""
    state, nonce = await begin_login(client)
    response = await finish_login(client, state, nonce)
    assert response.status_code == 303, response.text
    return response.cookies["pinauth_session"]


async def me(client: httpx.AsyncClient, session: str) -> int:
    client.cookies.clear()
    client.cookies.set("pinauth_session", session)
    return (await client.get("/me")).status_code


# --- pending logins --------------------------------------------------------------------


async def test_pending_logins_are_capped_and_the_oldest_evicted(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards PINAUTH_MAX_PENDING_LOGINS: the table never grows past it, the newest logins
    still complete, and an evicted one fails cleanly (400 invalid_state, no 500)."""
    settings = make_settings(database_url, max_pending_logins=5)
    async with run_client(settings, pinterest) as client:
        mock_login_upstream(pinterest)
        started = [await begin_login(client) for _ in range(12)]
        assert await count_rows(database_url, "login_states") == 5

        oldest = await finish_login(client, *started[0])
        newest = [await finish_login(client, *login) for login in started[-5:]]

    assert oldest.status_code == 400
    assert oldest.json()["error"] == "invalid_state"
    assert [r.status_code for r in newest] == [303] * 5


async def test_a_flood_of_concurrent_logins_stays_bounded(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the cap under concurrency (on PostgreSQL, SKIP LOCKED): 200 /auth/login calls,
    20 at a time, all answer 302 and leave at most the cap plus those in flight; the next
    login trims the table to the cap exactly."""
    cap, flood, in_flight = 30, 200, 20
    settings = make_settings(database_url, max_pending_logins=cap)
    async with run_client(settings, pinterest) as client:
        statuses: list[int] = []
        for _ in range(flood // in_flight):
            batch = [client.get("/auth/login") for _ in range(in_flight)]
            statuses += [r.status_code for r in await asyncio.gather(*batch)]
        after_flood = await count_rows(database_url, "login_states")
        await client.get("/auth/login")
        after_one_more = await count_rows(database_url, "login_states")

    assert statuses == [302] * flood
    assert after_flood <= cap + in_flight
    assert after_one_more == cap


# --- sessions per connection -----------------------------------------------------------


async def test_sessions_per_connection_are_capped_and_the_oldest_evicted(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards PINAUTH_MAX_SESSIONS_PER_CONNECTION: logging in from a fourth browser ends
    the oldest browser's session at once, even though this process had it cached."""
    settings = make_settings(database_url, max_sessions_per_connection=3)
    async with run_client(settings, pinterest) as client:
        mock_login_upstream(pinterest)
        sessions = []
        for _ in range(5):
            sessions.append(await new_browser_session(client))
            assert await me(client, sessions[-1]) == 200  # now cached in this process
        statuses = [await me(client, session) for session in sessions]

    assert statuses == [401, 401, 200, 200, 200]
    assert await count_rows(database_url, "sessions") == 3


async def test_the_session_cap_is_per_connection(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the eviction's scope: another Pinterest account's logins evict none of these."""
    settings = make_settings(database_url, max_sessions_per_connection=2)
    async with run_client(settings, pinterest) as client:
        mock_login_upstream(pinterest)
        alice = [await new_browser_session(client) for _ in range(2)]
        pinterest.get(f"{API}/user_account").respond(
            200, json=USER_ACCOUNT | {"id": "1111", "username": "bob"}
        )
        pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_BOB", "pinr_BOB"))
        for _ in range(3):
            await new_browser_session(client)
        statuses = [await me(client, session) for session in alice]

    assert statuses == [200, 200]
    assert await count_rows(database_url, "sessions") == 4


# --- purging expired rows --------------------------------------------------------------


async def test_purge_deletes_exactly_the_expired_rows(
    settings: Settings, database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the purge's cut-off, with an injected clock: pending logins go after 10
    minutes, sessions after their 30 days, and nothing live goes."""
    async with run_client(settings, pinterest) as client:
        mock_login_upstream(pinterest)
        await new_browser_session(client)
        await begin_login(client)
    start = datetime.now(UTC)
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)

        def purger_at(moment: datetime) -> ExpiredRowPurger:
            return ExpiredRowPurger(sessionmaker, 60, clock=lambda: moment)

        nothing = await purger_at(start).purge_once()
        logins = await purger_at(start + timedelta(minutes=11)).purge_once()
        still = await count_rows(database_url, "sessions")
        sessions = await purger_at(start + timedelta(days=31)).purge_once()
    finally:
        await engine.dispose()

    assert (nothing.sessions, nothing.login_states) == (0, 0)
    assert (logins.sessions, logins.login_states) == (0, 1)
    assert still == 1
    assert (sessions.sessions, sessions.login_states) == (1, 0)
    assert await count_rows(database_url, "sessions") == 0


async def test_the_lifespan_starts_and_stops_the_purger(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the wiring: an expired pending login left from before start-up is gone
    after the task's first pass, and shutting the app down stops the task."""
    settings = make_settings(database_url, purge_interval_seconds=3600)
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            await LoginStateRepository(db).add(
                LoginState(nonce_hash="e" * 64, expires_at=datetime.now(UTC) - timedelta(1))
            )
    finally:
        await engine.dispose()
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))

    async with serve_app(app):
        purger: ExpiredRowPurger = app.state.purger
        await asyncio.wait_for(purger.first_pass_done.wait(), timeout=10)
        assert purger.running
        assert await count_rows(database_url, "login_states") == 0

    assert not purger.running


async def test_a_failing_purge_is_logged_and_the_task_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the task's resilience: a database without pinauth's tables (not migrated
    yet, or down) makes a pass fail with a warning, and the task keeps running."""
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    engine = create_engine(settings)
    purger = ExpiredRowPurger(create_sessionmaker(engine), 3600)
    try:
        with caplog.at_level(logging.WARNING, logger="pinauth.housekeeping"):
            purger.start()
            await asyncio.wait_for(purger.first_pass_done.wait(), timeout=10)
            assert purger.running
    finally:
        await purger.stop()
        await engine.dispose()

    assert purger.passes == 1
    assert "purging expired rows failed" in caplog.text
