"""The keeper refreshes connections before their refresh tokens die unused.

Pinterest is mocked at the edge by a strict token endpoint (every refresh token works
once); time is a simulated clock the tests move, never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
import respx
from cryptography.fernet import Fernet
from fastapi import FastAPI, Request, Response
from prometheus_client import generate_latest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.apikeys import ApiKeyService
from pinauth.app import create_app
from pinauth.db import create_engine, create_sessionmaker
from pinauth.keeper import BACKOFF_MAX, BATCH_PER_WORKER
from pinauth.models import Connection, ConnectionStatus
from pinauth.observability import Metrics
from pinauth.repository import ConnectionRepository
from pinauth.schedule import Schedule
from pinauth.settings import Settings
from tests.helpers import (
    POSTGRES_ADMIN_URL,
    TOKEN_URL,
    RotatingTokenEndpoint,
    SimClock,
    live_server,
    make_settings,
    outbox_types,
    replica,
    seed_connections,
    serve_app,
    stored_connections,
)

DUE = timedelta(days=5)  # well inside the default 14-day window
NOT_DUE = timedelta(days=50)


@pytest.fixture
def endpoint(pinterest: respx.MockRouter) -> RotatingTokenEndpoint:
    fake = RotatingTokenEndpoint()
    pinterest.post(TOKEN_URL).mock(side_effect=fake)
    return fake


def metric(metrics: Metrics, text: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(text + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{text} not exported")


async def test_keeper_refreshes_due_connections_and_leaves_the_rest(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    clock = SimClock()
    due = await seed_connections(settings, endpoint, 3, refresh_expires_in=DUE, now=clock.now())
    later = await seed_connections(
        settings, endpoint, 2, refresh_expires_in=NOT_DUE, now=clock.now(), first=3
    )

    async with replica(settings, pinterest, clock) as one:
        done = await one.keeper.run_once()
        assert metric(one.metrics, 'pinauth_keeper_refreshes_total{outcome="refreshed"}') == 3
        next_due = metric(one.metrics, "pinauth_keeper_next_due_timestamp_seconds")

    assert done.refreshed == 3
    assert endpoint.calls == 3
    assert endpoint.reused == []
    stored = await stored_connections(settings)
    for n, public_id in enumerate(due):
        assert stored[public_id]["refresh"] == f"pinr_{n}_1"
        assert stored[public_id]["keeper_not_before"] is None
        assert stored[public_id]["refresh_token_expires_at"] > clock.now() + timedelta(days=59)
    for public_id in later:
        assert stored[public_id]["refresh"].endswith("_0")
    # The next due is one of the untouched connections, inside its spread.
    schedule = Schedule.of(settings)
    soonest = clock.now() + NOT_DUE - schedule.window
    assert (soonest - schedule.spread).timestamp() <= next_due <= soonest.timestamp()


async def test_connection_api_shows_next_refresh_at(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    stored = (await stored_connections(settings))[public_id]
    async with serve_app(create_app(settings)) as client:
        key = await client_api_key(settings)
        shown = await client.get(
            f"/v1/connections/{public_id}", headers={"Authorization": f"Bearer {key}"}
        )
    assert shown.status_code == 200
    expires = stored["refresh_token_expires_at"]
    next_refresh = shown.json()["next_refresh_at"]
    assert next_refresh is not None
    at = datetime.fromisoformat(next_refresh)
    assert expires - timedelta(days=15) <= at <= expires - timedelta(days=14)


async def client_api_key(settings: Settings) -> str:
    engine = create_engine(settings)
    try:
        created = await ApiKeyService(create_sessionmaker(engine), 0).create("backend")
    finally:
        await engine.dispose()
    return created.key


async def test_two_keepers_refresh_1000_due_connections_exactly_once(
    database_url: str, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the claim (its `keeper_not_before` filter, SKIP LOCKED on PostgreSQL): two
    keepers over one database split the work, so no connection is looked after twice.
    With the filter removed, both keepers claimed the same rows (their `seen` overlapped)."""
    settings = make_settings(database_url, keeper_concurrency=8)
    clock = SimClock()
    await seed_connections(settings, endpoint, 1000, refresh_expires_in=DUE, now=clock.now())

    async with (
        replica(settings, pinterest, clock, seed=1) as a,
        replica(settings, pinterest, clock, seed=2) as b,
    ):
        done_a, done_b = await asyncio.gather(a.keeper.run_once(), b.keeper.run_once())

    assert endpoint.calls == 1000
    assert endpoint.reused == []
    assert done_a.refreshed + done_b.refreshed == 1000
    assert not done_a.seen & done_b.seen
    stored = await stored_connections(settings)
    assert sorted(row["refresh"] for row in stored.values()) == sorted(
        f"pinr_{n}_1" for n in range(1000)
    )


async def test_the_first_batch_is_the_soonest_to_expire(
    database_url: str, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the claim's order (refresh-token expiry, not id): more due connections than
    one batch, inserted in an order unrelated to their expiries; the first batch the
    keeper takes, which it finishes before claiming the next, is the soonest to expire."""
    settings = make_settings(database_url, keeper_concurrency=1)  # a batch of 8
    batch = BATCH_PER_WORKER
    clock = SimClock()
    hours = random.Random(20).sample(range(3 * batch), 3 * batch)
    for n, hour in enumerate(hours):
        await seed_connections(
            settings,
            endpoint,
            1,
            refresh_expires_in=DUE + timedelta(hours=hour),
            now=clock.now(),
            first=n,
        )
    soonest = {n for n, hour in enumerate(hours) if hour < batch}

    async with replica(settings, pinterest, clock) as one:
        done = await one.keeper.run_once()

    assert done.refreshed == 3 * batch
    first_batch = {int(token.split("_")[1]) for token in endpoint.spent[:batch]}
    assert first_batch == soonest
    assert soonest != set(range(batch))  # id order would take other ones


@pytest.mark.skipif(not POSTGRES_ADMIN_URL, reason="SKIP LOCKED is PostgreSQL's")
async def test_a_keeper_claims_past_rows_another_transaction_holds(
    database_url: str, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards SKIP LOCKED: another transaction holds FOR UPDATE on the soonest due rows;
    a keeper pass still finishes and claims exactly the others, without waiting for
    that transaction. The timeout only detects a pass stuck behind the locks (it is
    released afterwards either way); nothing is timed."""
    settings = make_settings(database_url)
    clock = SimClock()
    locked = await seed_connections(settings, endpoint, 3, refresh_expires_in=DUE, now=clock.now())
    free = await seed_connections(
        settings, endpoint, 3, refresh_expires_in=DUE + timedelta(hours=1), now=clock.now(), first=3
    )
    holder = create_async_engine(database_url)
    try:
        async with holder.connect() as connection:
            transaction = await connection.begin()
            held = await connection.execute(
                select(Connection.id).where(Connection.public_id.in_(locked)).with_for_update()
            )
            assert len(held.all()) == 3
            async with replica(settings, pinterest, clock) as one:
                keeper_pass = asyncio.create_task(one.keeper.run_once())
                finished, _ = await asyncio.wait({keeper_pass}, timeout=60)
                await transaction.rollback()
                done = await keeper_pass
    finally:
        await holder.dispose()

    assert finished, "the keeper pass waited for another transaction's row locks"
    assert done.seen == set(free)
    assert done.refreshed == 3
    stored = await stored_connections(settings)
    assert {stored[public_id]["refresh"][-2:] for public_id in free} == {"_1"}
    assert {stored[public_id]["refresh"][-2:] for public_id in locked} == {"_0"}
    assert all(stored[public_id]["keeper_not_before"] is None for public_id in locked)


async def test_a_keeper_racing_a_request_refresh_makes_one_token_request(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """In one process the keeper joins the request's refresh in flight; on another replica
    it finds the lease or the new version. Either way, one token request."""
    clock = SimClock()
    async with (
        replica(settings, pinterest, clock) as a,
        replica(settings, pinterest, clock) as b,
    ):
        for n, keeper_side in enumerate((a, b)):
            # One due connection at a time, so the keeper has only the raced one to do.
            [public_id] = await seed_connections(
                settings,
                endpoint,
                1,
                refresh_expires_in=DUE,
                access_expires_in=timedelta(seconds=30),  # inside the refresh margin
                now=clock.now(),
                first=n,
            )
            async with a.sessionmaker() as db:
                row = await ConnectionRepository(db).get(public_id)
            assert row is not None
            endpoint.gate = asyncio.Event()
            endpoint.asked.clear()
            before = endpoint.calls
            request = asyncio.create_task(a.tokens.usable_credential(row))
            await asyncio.wait_for(endpoint.asked.wait(), 10)
            keeper = asyncio.create_task(keeper_side.keeper.run_once())
            endpoint.gate.set()
            credential = await request
            await keeper
            assert endpoint.calls - before == 1
            assert credential.access_token == f"pina_{n}_1"
    assert endpoint.reused == []
    stored = await stored_connections(settings)
    assert {row["refresh"][-2:] for row in stored.values()} == {"_1"}


async def test_token_endpoint_down_for_ten_minutes_backs_off_per_connection(
    pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint, database_url: str
) -> None:
    """Guards the back-off: the keeper wakes every second of ten simulated minutes with
    Pinterest down. Without it (a zero pause) each connection was tried every 10 s, on
    the request path's cooldown: 60 calls apiece instead of a handful."""
    settings = make_settings(database_url, keeper_interval_seconds=1)
    clock = SimClock()
    await seed_connections(settings, endpoint, 5, refresh_expires_in=DUE, now=clock.now())
    endpoint.down = True
    async with replica(settings, pinterest, clock) as one:
        for _ in range(600):
            await one.keeper.run_once()
            clock.advance(1)
        failed_calls = endpoint.calls
        failed = metric(one.metrics, 'pinauth_keeper_refreshes_total{outcome="failed"}')
        stored = await stored_connections(settings)
        assert all(row["keeper_failures"] >= 3 for row in stored.values())

        endpoint.down = False
        clock.advance(BACKOFF_MAX.total_seconds())
        done = await one.keeper.run_once()

    assert 5 * 3 <= failed_calls <= 5 * 6, failed_calls
    assert failed == failed_calls
    assert done.refreshed == 5
    stored = await stored_connections(settings)
    assert all(row["keeper_failures"] == 0 for row in stored.values())
    assert all(row["refresh"].endswith("_1") for row in stored.values())


async def test_an_expired_refresh_token_needs_reauthorization_without_a_call(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the expiry check: without it the keeper spent a call on a dead token."""
    clock = SimClock()
    [public_id] = await seed_connections(
        settings, endpoint, 1, refresh_expires_in=DUE, now=clock.now()
    )
    clock.advance(DUE.total_seconds() + 60)
    async with replica(settings, pinterest, clock) as one:
        first = await one.keeper.run_once()
        second = await one.keeper.run_once()
    assert endpoint.calls == 0
    assert (first.reauthorization_required, second.reauthorization_required) == (1, 0)
    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] == ConnectionStatus.REAUTHORIZATION_REQUIRED
    assert await outbox_types(settings) == [("connection.reauthorization_required", public_id)]


async def test_a_connection_the_keeper_cannot_refresh_is_reported_expiring_once(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    clock = SimClock()
    await seed_connections(
        settings, endpoint, 1, refresh_expires_in=timedelta(days=2), now=clock.now()
    )
    endpoint.down = True
    async with replica(settings, pinterest, clock) as one:
        for _ in range(5):
            await one.keeper.run_once()
            clock.advance(BACKOFF_MAX.total_seconds())
    assert endpoint.calls == 5
    assert [t for t, _ in await outbox_types(settings)] == ["connection.expiring"]


async def test_connections_made_together_are_refreshed_apart(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the jitter: 200 connections made at once, their tokens half a day from the
    window. Without jitter none was due yet; with it, about half are now and the rest
    within half a day, each at its own time."""
    clock = SimClock()
    schedule = Schedule.of(settings)
    await seed_connections(
        settings,
        endpoint,
        200,
        refresh_expires_in=schedule.window + schedule.spread / 2,
        now=clock.now(),
    )
    async with replica(settings, pinterest, clock) as one:
        first = await one.keeper.run_once()
        assert 60 <= first.refreshed <= 140, first.refreshed
        assert first.refreshed + first.scheduled == 200
        again = await one.keeper.run_once()
        assert again.refreshed == again.scheduled == 0  # the rest wait for their time
        clock.advance((schedule.spread / 4).total_seconds())
        middle = await one.keeper.run_once()
        assert 0 < middle.refreshed < 200 - first.refreshed
        clock.advance((schedule.spread / 4).total_seconds())
        await one.keeper.run_once()
    assert endpoint.calls == 200
    assert endpoint.reused == []


async def test_serve_runs_the_keeper_unless_turned_off(database_url: str) -> None:
    on = create_app(make_settings(database_url, keeper=True))
    async with serve_app(on):
        assert on.state.keeper.running
        await asyncio.wait_for(on.state.keeper.pass_done.wait(), 10)
    assert not on.state.keeper.running
    off = create_app(make_settings(database_url, keeper=False))
    async with serve_app(off):
        assert not hasattr(off.state, "keeper")


@pytest.mark.parametrize("days", ["0", "60", "fourteen"])
def test_keepalive_days_outside_1_to_59_is_refused_at_start(tmp_path: Path, days: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pinauth", "keeper", "--once"],
        env={
            "PATH": "/usr/bin:/bin",
            "PINAUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'k.db'}",
            "PINAUTH_KEEPALIVE_DAYS": days,
        },
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "PINAUTH_KEEPALIVE_DAYS" in result.stderr
    assert "Traceback" not in result.stderr


def test_keeper_command_runs_one_pass(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pinauth", "keeper", "--once"],
        env={
            "PATH": "/usr/bin:/bin",
            "PINAUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'k.db'}",
            "PINAUTH_SECRET_KEY": "k" * 40,
            "PINAUTH_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "PINTEREST_CLIENT_ID": "cid",
            "PINTEREST_CLIENT_SECRET": "csecret",
            "PINAUTH_LOG_LEVEL": "warning",
        },
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "refreshed 0, failed 0, need reauthorization 0" in result.stdout


@pytest.mark.skipif(not POSTGRES_ADMIN_URL, reason="replica processes need PostgreSQL")
async def test_two_keeper_processes_refresh_1000_due_connections_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    """The same as two real replicas: two `pinauth keeper --once` processes over one
    PostgreSQL, Pinterest's token endpoint a loopback server counting every call."""
    settings = make_settings(database_url)
    endpoint = RotatingTokenEndpoint()
    await seed_connections(settings, endpoint, 1000, refresh_expires_in=DUE)

    pinterest = FastAPI()

    @pinterest.post("/v5/oauth/token")
    async def token(request: Request) -> Response:
        answer = await endpoint(httpx.Request("POST", TOKEN_URL, content=await request.body()))
        return Response(answer.content, answer.status_code, media_type="application/json")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env |= {
        "PINAUTH_DATABASE_URL": database_url,
        "PINAUTH_SECRET_KEY": settings.secret_key.get_secret_value(),
        "PINAUTH_ENCRYPTION_KEYS": settings.encryption_keys[0].get_secret_value(),
        "PINTEREST_CLIENT_ID": "cid",
        "PINTEREST_CLIENT_SECRET": "csecret",
        "PINAUTH_KEEPER_CONCURRENCY": "8",
        "PINAUTH_LOG_LEVEL": "error",
    }
    async with live_server(pinterest) as url:
        env["PINTEREST_API_URL"] = f"{url}/v5"
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pinauth",
                "keeper",
                "--once",
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        outputs = [await process.communicate() for process in processes]

    refreshed = 0
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
        refreshed += int(out.decode().split()[1].rstrip(","))
    assert endpoint.calls == 1000
    assert endpoint.reused == []
    assert refreshed == 1000
    stored = await stored_connections(settings)
    assert sorted(row["refresh"] for row in stored.values()) == sorted(
        f"pinr_{n}_1" for n in range(1000)
    )


async def test_stopping_finishes_refreshes_under_way_and_starts_no_more(
    database_url: str, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the stop check before each refresh: a shutdown mid-pass waits for the one
    refresh in flight, not for the whole batch (without it, all ten were refreshed)."""
    settings = make_settings(database_url, keeper_concurrency=1)
    clock = SimClock()
    await seed_connections(settings, endpoint, 10, refresh_expires_in=DUE, now=clock.now())
    endpoint.gate = asyncio.Event()
    async with replica(settings, pinterest, clock) as one:
        one.keeper.start()
        await asyncio.wait_for(endpoint.asked.wait(), 10)
        one.keeper.request_stop()  # as SIGTERM does, through stop(), mid-refresh
        endpoint.gate.set()
        await one.keeper.stop()
    assert endpoint.calls == 1
    stored = await stored_connections(settings)
    assert sorted(row["refresh"][-2:] for row in stored.values()) == ["_0"] * 9 + ["_1"]
