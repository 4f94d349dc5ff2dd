"""Refresh leases: renewed while their token call is in flight, short, and resolved by the
keeper when their holder died (issue 19, item 2).

Pinterest is mocked at the edge by a strict token endpoint (every refresh token works
once). Time is a simulated clock the tests move; the lease renewer's pauses are ended by
the test (`Pacer`), never slept through.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
import respx
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError

from pinauth.errors import DatabaseUnavailable, ReauthorizationRequired, UpstreamUnavailable
from pinauth.models import Connection, ConnectionStatus
from pinauth.repository import ConnectionRepository
from pinauth.settings import Settings
from pinauth.tokens import RecheckOutcome
from pinauth.webhooks import EventType
from tests.helpers import (
    TOKEN_URL,
    Replica,
    RotatingTokenEndpoint,
    SimClock,
    _run_sql,
    allow_token_writes,
    outbox_types,
    refuse_token_writes,
    replica,
    seed_connections,
    stored_connections,
)

LEASE = timedelta(seconds=15)
NOT_DUE = timedelta(days=50)  # the keeper's schedule leaves these alone
DEAD = "d" * 32  # the owner id a killed process left on the row


@pytest.fixture
def endpoint(pinterest: respx.MockRouter) -> RotatingTokenEndpoint:
    fake = RotatingTokenEndpoint()
    pinterest.post(TOKEN_URL).mock(side_effect=fake)
    return fake


class Pacer:
    """Stands in for `asyncio.sleep` in the lease renewer: each pause lasts until `tick`."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self.pausing = asyncio.Event()
        self._go = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self._go = go = asyncio.Event()
        self.pausing.set()
        await go.wait()

    async def tick(self) -> None:
        """End the pause under way; return once the renewer pauses again (renewal done)."""
        self.pausing.clear()
        self._go.set()
        await asyncio.wait_for(self.pausing.wait(), 10)


async def lease_until(settings: Settings, public_id: str) -> datetime | None:
    until: datetime | None = (await stored_connections(settings))[public_id]["refresh_lease_until"]
    return until


async def row(one: Replica, public_id: str) -> Connection:
    async with one.sessionmaker() as db:
        connection = await ConnectionRepository(db).get(public_id)
    assert connection is not None
    return connection


async def another_process_claims(one: Replica, connection: Connection, now: datetime) -> bool:
    """Whether another process could take the lease at `now` (then lets it go again)."""
    async with one.sessionmaker() as db, db.begin():
        repository = ConnectionRepository(db)
        claimed = await repository.claim_refresh_lease(
            connection.public_id, connection.version, "other", now, now + LEASE, lock_timeout=1
        )
        if claimed:
            await repository.release_refresh_lease(connection.public_id, "other")
    return claimed


async def leave_dead_lease(one: Replica, public_id: str, until: datetime) -> None:
    """The row as a process killed mid-refresh leaves it: its lease, never released."""
    async with one.sessionmaker() as db, db.begin():
        await db.execute(
            update(Connection)
            .where(Connection.public_id == public_id)
            .values(refresh_lease_owner=DEAD, refresh_lease_until=until)
            .execution_options(synchronize_session=False)
        )


def spent_by_the_dead_process(endpoint: RotatingTokenEndpoint, n: int) -> None:
    """Pinterest rotated connection `n`'s refresh token for a process that then died."""
    endpoint.live.remove(f"pinr_{n}_0")
    endpoint.live.add(f"pinr_{n}_1")


def test_the_default_lease_is_at_most_15_seconds(settings: Settings) -> None:
    assert settings.refresh_lease_seconds <= 15


async def test_a_lease_is_renewed_while_its_token_call_is_in_flight(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the renewal: a token call held for 20 s (longer than the 15 s lease) keeps
    its lease, renewed every 5 s, and no other process can take it meanwhile. Without the
    renewal the lease runs out at 15 s and another process claims it."""
    clock, pacer = SimClock(), Pacer()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    endpoint.gate = asyncio.Event()
    async with replica(settings, pinterest, clock, sleep=pacer) as one:
        seen = await row(one, public_id)
        refresh = asyncio.create_task(one.tokens.refresh(seen))
        await asyncio.wait_for(endpoint.asked.wait(), 10)
        await asyncio.wait_for(pacer.pausing.wait(), 10)
        assert await lease_until(settings, public_id) == clock.now() + LEASE
        for _ in range(4):
            clock.advance(5)
            await pacer.tick()
            assert await lease_until(settings, public_id) == clock.now() + LEASE
        # 20 s after the claim: past the first stamp's end, still the holder's.
        assert not await another_process_claims(one, seen, clock.now())
        endpoint.gate.set()
        fresh = await refresh

    assert pacer.pauses == [5.0] * 5  # every third of the lease; the last one cut short
    stored = (await stored_connections(settings))[public_id]
    assert stored["refresh"] == "pinr_0_1"
    assert stored["refresh_lease_owner"] is None
    assert fresh.version == seen.version + 1
    assert endpoint.calls == 1
    assert endpoint.reused == []


async def test_a_dead_holders_lease_frees_the_connection_after_one_lease(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """A killed process's lease holds its connection at most 15 s: before that callers get
    503 with a Retry-After within the lease; after it the next refresh goes ahead."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    quick = settings.model_copy(update={"refresh_lock_timeout_seconds": 0.05})
    async with replica(quick, pinterest, clock) as one:
        await leave_dead_lease(one, public_id, clock.now() + LEASE)
        clock.advance(14)
        with pytest.raises(UpstreamUnavailable) as refused:
            await one.tokens.refresh(await row(one, public_id))
        assert 1 <= refused.value.retry_after <= 15
        assert endpoint.calls == 0
        clock.advance(1.5)
        fresh = await one.tokens.refresh(await row(one, public_id))
    assert endpoint.calls == 1
    assert (await stored_connections(settings))[public_id]["refresh"] == "pinr_0_1"
    assert fresh.refresh_lease_owner is None


async def test_the_keeper_resolves_dead_leases_both_ways(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the keeper's dead-lease pass: two connections whose refresh died with its
    process, one after Pinterest rotated its token (spent) and one before (still good).
    With no call to the proxy, the keeper tries each stored refresh token once: the spent
    one becomes reauthorization_required with its event, the good one gets new tokens.
    Nothing happens before the grace a live holder's unsaved write may need."""
    clock = SimClock()
    spent, good = await seed_connections(settings, endpoint, 2, refresh_expires_in=NOT_DUE)
    spent_by_the_dead_process(endpoint, 0)
    async with replica(settings, pinterest, clock) as one:
        for public_id in (spent, good):
            await leave_dead_lease(one, public_id, clock.now() + LEASE)
        clock.advance(16)  # the dead leases ran out
        first = await one.keeper.run_once()
        assert first.dead_leases == 0
        assert endpoint.calls == 0
        clock.advance(one.keeper._lease_grace.total_seconds())
        second = await one.keeper.run_once()
        third = await one.keeper.run_once()

    assert (second.dead_leases, second.reauthorization_required, second.refreshed) == (2, 1, 1)
    assert third.dead_leases == 0
    stored = await stored_connections(settings)
    assert stored[spent]["status"] is ConnectionStatus.REAUTHORIZATION_REQUIRED
    assert stored[good]["status"] is ConnectionStatus.ACTIVE
    assert stored[good]["refresh"] == "pinr_1_1"
    assert stored[good]["refresh_lease_owner"] is None
    assert endpoint.reused == ["pinr_0_0"]  # tried once, then never again
    assert endpoint.calls == 2
    assert await outbox_types(settings) == [(EventType.REAUTHORIZATION_REQUIRED.value, spent)]


async def test_the_keeper_resolves_dead_leases_at_start(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Started after a kill -9, the keeper looks for dead leases in its first pass and comes
    back for them after the grace, not a whole PINAUTH_KEEPER_INTERVAL (600 s) later."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    spent_by_the_dead_process(endpoint, 0)
    async with replica(settings, pinterest, clock) as one:
        await leave_dead_lease(one, public_id, clock.now() - timedelta(seconds=1))
        keeper = one.keeper
        pauses: list[float] = []

        async def pause(seconds: float) -> None:  # the loop's pause, on the simulated clock
            pauses.append(seconds)
            clock.advance(seconds)
            if len(pauses) == 2:
                keeper.request_stop()

        keeper._pause = pause  # type: ignore[method-assign]
        keeper.start()
        assert keeper._task is not None
        await asyncio.wait_for(asyncio.shield(keeper._task), 30)  # ends after two passes

    grace = keeper._lease_grace.total_seconds()
    assert grace <= pauses[0] <= grace + 1
    assert keeper.passes == 2
    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] is ConnectionStatus.REAUTHORIZATION_REQUIRED
    assert await outbox_types(settings) == [(EventType.REAUTHORIZATION_REQUIRED.value, public_id)]


async def test_a_restart_quicker_than_a_lease_comes_back_when_it_runs_out(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Restarted right after a kill -9, the keeper's first pass meets the dead process's
    lease still running: it comes back when the lease runs out, then after the grace,
    and resolves it then, not a whole PINAUTH_KEEPER_INTERVAL (600 s) later."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    spent_by_the_dead_process(endpoint, 0)
    async with replica(settings, pinterest, clock) as one:
        await leave_dead_lease(one, public_id, clock.now() + timedelta(seconds=10))
        keeper = one.keeper
        pauses: list[float] = []

        async def pause(seconds: float) -> None:  # the loop's pause, on the simulated clock
            pauses.append(seconds)
            clock.advance(seconds)
            if len(pauses) == 3:
                keeper.request_stop()

        keeper._pause = pause  # type: ignore[method-assign]
        keeper.start()
        assert keeper._task is not None
        await asyncio.wait_for(asyncio.shield(keeper._task), 30)  # ends after three passes

    grace = keeper._lease_grace.total_seconds()
    assert 10 <= pauses[0] <= 11
    assert grace <= pauses[1] <= grace + 1
    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] is ConnectionStatus.REAUTHORIZATION_REQUIRED
    assert await outbox_types(settings) == [(EventType.REAUTHORIZATION_REQUIRED.value, public_id)]


async def test_the_keeper_leaves_a_lease_alone_while_its_holder_stores_from_memory(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the grace and the in-process check: replica A refreshed, but the database
    refused the write, so A serves the new tokens from memory and retries the write; its
    lease runs out meanwhile. Neither A's keeper nor B's may spend the stored (already
    spent) refresh token and mark a working connection; once A's write lands there is
    nothing to resolve. Without the grace, B's keeper marks it reauthorization_required."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    async with (
        replica(settings, pinterest, clock) as a,
        replica(settings, pinterest, clock, seed=1) as b,
    ):
        await refuse_token_writes(settings.database_url)
        fresh = await a.tokens.refresh(await row(a, public_id))
        assert fresh.version == 2  # served from memory; the database still has version 1
        clock.advance(16)  # A's lease ran out with no result stored
        assert (await b.keeper.run_once()).dead_leases == 0  # seen, within the grace
        clock.advance(b.keeper._lease_grace.total_seconds())
        # A's own keeper finds the tokens it holds and calls nobody.
        assert (await a.keeper.run_once()).refreshed == 0
        assert endpoint.calls == 1
        await allow_token_writes(settings.database_url)
        await asyncio.wait_for(asyncio.gather(*a.tokens._writers), 30)
        assert (await b.keeper.run_once()).dead_leases == 0

    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] is ConnectionStatus.ACTIVE
    assert stored["refresh"] == "pinr_0_1"
    assert endpoint.calls == 1
    assert endpoint.reused == []
    assert await outbox_types(settings) == []


_REFUSE_EVENTS = {
    "sqlite": [
        "CREATE TRIGGER refuse_events BEFORE INSERT ON webhook_events "
        "BEGIN SELECT RAISE(ABORT, 'the database refused the event'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_events() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the database refused the event'; END $$",
        "CREATE TRIGGER refuse_events BEFORE INSERT ON webhook_events FOR EACH ROW "
        "EXECUTE FUNCTION refuse_events()",
    ],
}


async def test_a_mark_the_database_refuses_lets_the_lease_go(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards the release on a failed mark: Pinterest rejects the refresh token, and the
    database refuses the reauthorization_required event (so the mark rolls back). The
    lease must not stay behind: without the release another caller waits for it to run
    out and gets 503; with it, the next refresh claims it at once, meets the rejection
    again and marks the connection, with its event."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    spent_by_the_dead_process(endpoint, 0)
    quick = settings.model_copy(update={"refresh_lock_timeout_seconds": 0.05})
    async with replica(quick, pinterest, clock) as one:
        await _run_sql(settings.database_url, _REFUSE_EVENTS)
        with pytest.raises((DBAPIError, DatabaseUnavailable)):
            await one.tokens.refresh(await row(one, public_id))
        assert (await stored_connections(settings))[public_id]["refresh_lease_owner"] is None
        await _run_sql(settings.database_url, _ALLOW_EVENTS)
        with pytest.raises(ReauthorizationRequired):
            await one.tokens.refresh(await row(one, public_id))

    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] is ConnectionStatus.REAUTHORIZATION_REQUIRED
    assert stored["refresh_lease_owner"] is None
    assert endpoint.reused == ["pinr_0_0", "pinr_0_0"]
    assert await outbox_types(settings) == [(EventType.REAUTHORIZATION_REQUIRED.value, public_id)]


_ALLOW_EVENTS = {
    "sqlite": ["DROP TRIGGER refuse_events"],
    "postgresql": ["DROP TRIGGER refuse_events ON webhook_events", "DROP FUNCTION refuse_events()"],
}


async def mark(one: Replica, public_id: str) -> None:
    """Marked reauthorization_required by mistake: its refresh token still works."""
    async with one.sessionmaker() as db, db.begin():
        repository = ConnectionRepository(db)
        current = await repository.get(public_id)
        assert current is not None
        assert await repository.replace_version(
            public_id, current.version, {"status": ConnectionStatus.REAUTHORIZATION_REQUIRED}
        )


async def test_two_rechecks_at_once_spend_the_refresh_token_once(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """Guards recheck's lease: `pinauth connections recheck` run twice at once (two
    processes, here two replicas on one database) for one marked connection whose token
    still works. The first holds its token call; the second finds the lease held and says
    busy, without calling Pinterest; in-process a second recheck joins the first. The token
    endpoint is called once, the connection ends active with one connection.recovered, and
    no recheck says "still rejected". Without the lease both spend the token, and the
    second reports "still rejected" for a connection that ended active."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    endpoint.gate = asyncio.Event()
    async with (
        replica(settings, pinterest, clock) as a,
        replica(settings, pinterest, clock, seed=1) as b,
    ):
        await mark(a, public_id)
        first = asyncio.create_task(a.tokens.recheck(public_id))
        joined = asyncio.create_task(a.tokens.recheck(public_id))
        await asyncio.wait_for(endpoint.asked.wait(), 10)
        other = await asyncio.wait_for(b.tokens.recheck(public_id), 10)  # no token call
        endpoint.gate.set()
        outcomes = await asyncio.gather(first, joined)
        after = await b.tokens.recheck(public_id)

    assert other is RecheckOutcome.BUSY
    assert sorted(outcomes) == sorted([RecheckOutcome.RECOVERED, RecheckOutcome.CHANGED])
    assert after is RecheckOutcome.NOT_MARKED
    assert endpoint.calls == 1
    assert endpoint.reused == []
    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] is ConnectionStatus.ACTIVE
    assert stored["refresh"] == "pinr_0_1"
    assert stored["refresh_lease_owner"] is None
    assert await outbox_types(settings) == [(EventType.RECOVERED.value, public_id)]


async def test_a_recheck_whose_token_is_refused_lets_the_lease_go(
    settings: Settings, pinterest: respx.MockRouter, endpoint: RotatingTokenEndpoint
) -> None:
    """A recheck that meets a refused grant changes nothing and leaves no lease behind:
    the next recheck tries again at once (and is refused again)."""
    clock = SimClock()
    [public_id] = await seed_connections(settings, endpoint, 1, refresh_expires_in=NOT_DUE)
    spent_by_the_dead_process(endpoint, 0)
    async with replica(settings, pinterest, clock) as one:
        await mark(one, public_id)
        first = await one.tokens.recheck(public_id)
        second = await one.tokens.recheck(public_id)

    assert (first, second) == (RecheckOutcome.STILL_REJECTED, RecheckOutcome.STILL_REJECTED)
    assert endpoint.reused == ["pinr_0_0", "pinr_0_0"]
    stored = (await stored_connections(settings))[public_id]
    assert stored["status"] is ConnectionStatus.REAUTHORIZATION_REQUIRED
    assert stored["refresh_lease_owner"] is None
    assert await outbox_types(settings) == []
