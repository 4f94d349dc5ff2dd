"""Cache revalidation: entries in use are confirmed in batches instead of re-read one by
one, and confirmation never keeps alive what the database or this process dropped."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import delete, event, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pinauth.app import create_app
from pinauth.cache import ConnectionCache
from pinauth.connections import ConnectionService
from pinauth.crypto import CursorCodec, TokenCipher, digest
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import InvalidProxyToken
from pinauth.models import AuthSession, Connection, ProxyToken
from pinauth.proxytokens import ProxyTokenService
from pinauth.repository import SessionRepository
from pinauth.revalidation import BATCH_SIZE, CacheRevalidator
from pinauth.settings import Settings
from tests.helpers import (
    ManualClock,
    RotatingTokenEndpoint,
    captured_logs,
    events,
    make_settings,
    seed_connections,
    serve_app,
)

TTL = 10.0


@dataclass
class Stage:
    """Real rows in the database, a cache on a manual clock, and a revalidator."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    cache: ConnectionCache
    clock: ManualClock
    revalidator: CacheRevalidator
    queries: list[str]

    async def session_for(self, public_id: str) -> str:
        """A live session row for the connection, loaded into the cache; its hash."""
        session_hash = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
        async with self.sessionmaker() as db, db.begin():
            connection_id = (await db.execute(_id_of(public_id))).scalar_one()
            await db.execute(
                insert(AuthSession).values(
                    id_hash=session_hash,
                    connection_id=connection_id,
                    expires_at=datetime.now(UTC) + timedelta(days=1),
                )
            )
        async with self.sessionmaker() as db:
            loaded = await SessionRepository(db).get_active(session_hash, datetime.now(UTC))
        assert loaded is not None
        self.cache.remember_session(session_hash, loaded.connection, self.cache.generation())
        return session_hash

    async def connection(self, public_id: str) -> Connection:
        async with self.sessionmaker() as db:
            row: Connection = (await db.execute(_row_of(public_id))).scalar_one()
            return row

    async def run(self, statement: Any) -> None:
        async with self.sessionmaker() as db, db.begin():
            await db.execute(statement)


def _id_of(public_id: str) -> Any:
    return select(Connection.id).where(Connection.public_id == public_id)


def _row_of(public_id: str) -> Any:
    return select(Connection).where(Connection.public_id == public_id)


@asynccontextmanager
async def stage(settings: Settings) -> AsyncIterator[Stage]:
    engine = create_engine(settings)
    queries: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        queries.append(statement)

    clock = ManualClock()
    cache = ConnectionCache(TTL, timer=clock)
    sessionmaker = create_sessionmaker(engine)
    try:
        yield Stage(
            engine,
            sessionmaker,
            cache,
            clock,
            CacheRevalidator(sessionmaker, cache, TTL, monotonic=clock),
            queries,
        )
    finally:
        await engine.dispose()


async def seeded(settings: Settings, count: int) -> list[str]:
    return await seed_connections(
        settings, RotatingTokenEndpoint(), count, refresh_expires_in=timedelta(days=50)
    )


def on_query(engine: AsyncEngine, action: Callable[[], object]) -> None:
    """Run `action` once, right after the next query: a change that lands mid-pass."""
    done = False

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def fire(*_args: Any) -> None:
        nonlocal done
        if not done:
            done = True
            action()


async def test_sessions_in_use_outlive_the_ttl_on_one_query_per_pass(
    settings: Settings,
) -> None:
    """Guards the point of revalidation: three sessions served all along are confirmed by
    one query a pass and never run out, while one left unused runs out as before."""
    ids = await seeded(settings, 4)
    async with stage(settings) as s:
        hashes = [await s.session_for(public_id) for public_id in ids]
        for _ in range(4):  # 4 passes: twice the TTL
            for session_hash in hashes[:3]:
                assert s.cache.connection_for_session(session_hash) is not None
            s.clock.advance(TTL / 2)
            s.queries.clear()
            done = await s.revalidator.run_once()
            assert done.confirmed == 3
            assert len(s.queries) == 1  # one query for the three, none for the idle one
        for public_id, session_hash in zip(ids[:3], hashes[:3], strict=True):
            served = s.cache.connection_for_session(session_hash)
            assert served is not None
            assert served.public_id == public_id
        assert s.cache.connection_for_session(hashes[3]) is None  # unused: ran out


async def test_connections_in_use_outlive_the_ttl(settings: Settings) -> None:
    """The API-key and proxy-token paths read connections by id: kept alive the same way."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        assert s.cache.remember_connection(await s.connection(public_id))
        for _ in range(4):
            assert s.cache.cached_connection(public_id) is not None
            s.clock.advance(TTL / 2)
            assert (await s.revalidator.run_once()).confirmed == 1
        assert s.cache.cached_connection(public_id) is not None


async def test_a_logout_elsewhere_is_dropped_at_the_next_pass(settings: Settings) -> None:
    """Guards dropping: another replica deleted the session row; this process stops
    serving it at the next pass, before its TTL."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        session_hash = await s.session_for(public_id)
        assert s.cache.connection_for_session(session_hash) is not None
        await s.run(delete(AuthSession).where(AuthSession.id_hash == session_hash))
        assert (await s.revalidator.run_once()).dropped == 1
        assert s.cache.connection_for_session(session_hash) is None


async def test_a_delete_elsewhere_forgets_the_connection_for_good(settings: Settings) -> None:
    """Guards forgetting: a connection deleted by another replica is dropped at the next
    pass and may not be cached again."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        row = await s.connection(public_id)
        assert s.cache.remember_connection(row)
        assert s.cache.cached_connection(public_id) is not None
        await s.run(delete(Connection).where(Connection.public_id == public_id))
        assert (await s.revalidator.run_once()).dropped == 1
        assert s.cache.cached_connection(public_id) is None
        assert s.cache.is_deleted(public_id)
        assert not s.cache.remember_connection(row)


async def test_a_refresh_elsewhere_is_not_renewed(settings: Settings) -> None:
    """Guards the version check: a row refreshed on another replica (new version, new
    tokens) is not kept alive; its entries run out at their TTL and are re-read."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        session_hash = await s.session_for(public_id)
        assert s.cache.remember_connection(await s.connection(public_id))
        assert s.cache.connection_for_session(session_hash) is not None
        assert s.cache.cached_connection(public_id) is not None
        await s.run(update(Connection).where(Connection.public_id == public_id).values(version=2))
        s.clock.advance(TTL / 2)
        done = await s.revalidator.run_once()
        assert (done.confirmed, done.changed) == (0, 2)
        s.clock.advance(TTL / 2)
        assert s.cache.connection_for_session(session_hash) is None
        assert s.cache.cached_connection(public_id) is None


async def test_a_logout_during_the_query_is_not_undone(settings: Settings) -> None:
    """Guards 'renew, never re-add': this process logs the session out while the pass's
    query (which still saw the row) runs; the pass must not bring the entry back."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        session_hash = await s.session_for(public_id)
        assert s.cache.connection_for_session(session_hash) is not None
        on_query(s.engine, lambda: s.cache.forget_session(session_hash))
        assert (await s.revalidator.run_once()).confirmed == 1  # the row was there
        assert s.cache.connection_for_session(session_hash) is None


async def test_a_delete_during_the_query_is_not_undone(settings: Settings) -> None:
    """The same for a connection deleted in this process while the query runs."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        assert s.cache.remember_connection(await s.connection(public_id))
        assert s.cache.cached_connection(public_id) is not None
        on_query(s.engine, lambda: s.cache.forget_connection(public_id))
        await s.revalidator.run_once()
        assert s.cache.cached_connection(public_id) is None


async def test_only_the_version_confirmed_is_renewed(settings: Settings) -> None:
    """Guards renewing exactly what was confirmed: a newer row cached while the query ran
    (this process refreshed it) keeps its own TTL, not one renewed on the old answer."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        row = await s.connection(public_id)
        assert s.cache.remember_connection(row)
        assert s.cache.cached_connection(public_id) is not None
        newer = await s.connection(public_id)
        newer.version = row.version + 1
        s.clock.advance(TTL / 2)

        def refreshed_here() -> None:
            assert s.cache.remember_connection(newer)  # lives until now + TTL
            s.clock.advance(1)  # the query's answer arrives a second later

        on_query(s.engine, refreshed_here)
        assert (await s.revalidator.run_once()).confirmed == 1
        s.clock.advance(TTL - 0.5)  # past the newer entry's own TTL
        assert s.cache.cached_connection(public_id) is None


async def test_a_session_whose_connection_changed_here_is_not_renewed(
    settings: Settings,
) -> None:
    """The session path of the same rule, and entries that ran out before the pass."""
    ids = await seeded(settings, 2)
    async with stage(settings) as s:
        session_hash = await s.session_for(ids[0])
        assert s.cache.connection_for_session(session_hash) is not None
        newer = await s.connection(ids[0])
        newer.version += 1
        on_query(s.engine, lambda: s.cache.remember_connection(newer))
        assert (await s.revalidator.run_once()).confirmed == 1
        s.clock.advance(TTL + 0.1)  # nothing renewed: both entries ran out
        assert s.cache.connection_for_session(session_hash) is None
        expired = await s.session_for(ids[1])
        assert s.cache.connection_for_session(expired) is not None
        assert s.cache.remember_connection(await s.connection(ids[1]))
        assert s.cache.cached_connection(ids[1]) is not None
        s.clock.advance(TTL + 0.1)
        s.queries.clear()
        assert (await s.revalidator.run_once()).confirmed == 0
        assert s.queries == []  # what ran out is not asked about


async def test_a_failing_pass_does_not_end_revalidation(settings: Settings, tmp_path: Path) -> None:
    """A database that fails (here: one that cannot be opened) costs a log line a pass,
    not the task: entries then simply run out, as without revalidation."""
    [public_id] = await seeded(settings, 1)
    unreachable = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'gone' / 'pinauth.db'}")
    broken = create_engine(unreachable)
    async with stage(settings) as s:
        session_hash = await s.session_for(public_id)
        revalidator = CacheRevalidator(create_sessionmaker(broken), s.cache, TTL, interval=0.01)
        revalidator.start()
        try:
            with captured_logs(logging.WARNING) as logs:
                for _ in range(2):
                    assert s.cache.connection_for_session(session_hash) is not None
                    revalidator.pass_done.clear()
                    await revalidator.pass_done.wait()
            assert revalidator.running
        finally:
            await revalidator.stop()
            await broken.dispose()
        assert not revalidator.running
    assert len(events(logs, "cache revalidation failed; entries run out as usual")) >= 2


async def test_an_answer_later_than_half_a_ttl_renews_nothing(settings: Settings) -> None:
    """Guards the TTL's promise: a query that took longer than half a TTL confirms a
    state that old; renewing on it would serve entries longer than the TTL allows."""
    [public_id] = await seeded(settings, 1)
    async with stage(settings) as s:
        session_hash = await s.session_for(public_id)
        assert s.cache.connection_for_session(session_hash) is not None
        on_query(s.engine, lambda: s.clock.advance(TTL / 2 + 0.1))
        done = await s.revalidator.run_once()
        assert (done.confirmed, done.stale) == (0, 1)
        s.clock.advance(TTL / 2)
        assert s.cache.connection_for_session(session_hash) is None


async def test_a_hot_set_larger_than_a_batch_takes_a_query_per_batch(
    settings: Settings,
) -> None:
    ids = await seeded(settings, BATCH_SIZE + 3)
    async with stage(settings) as s:
        for public_id in ids:
            s.cache.remember_connection(await s.connection(public_id))
            assert s.cache.cached_connection(public_id) is not None
        s.queries.clear()
        assert (await s.revalidator.run_once()).confirmed == BATCH_SIZE + 3
        assert len(s.queries) == 2


async def test_serve_runs_revalidation_only_with_a_cache(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    transport = httpx.MockTransport(pinterest.async_handler)
    cached = create_app(make_settings(database_url, cache_ttl_seconds=5), transport=transport)
    async with serve_app(cached):
        assert cached.state.cache_revalidator.running
        assert cached.state.cache_revalidator.interval == 2.5
    assert not cached.state.cache_revalidator.running  # stopped with the app
    uncached = create_app(make_settings(database_url, cache_ttl_seconds=0), transport=transport)
    async with serve_app(uncached):
        assert not hasattr(uncached.state, "cache_revalidator")


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, cache_ttl_seconds=TTL)


async def test_a_proxy_token_dies_with_a_connection_deleted_elsewhere(
    settings: Settings,
) -> None:
    """Guards the proxy-token map living past the TTL: its connection, deleted on another
    replica, is refused once revalidation (or the connection entry's TTL) notices."""
    ids = await seeded(settings, 2)
    cipher = TokenCipher([k.get_secret_value() for k in settings.encryption_keys])
    async with stage(settings) as s:
        connections = ConnectionService(s.sessionmaker, s.cache, CursorCodec(cipher))
        tokens = ProxyTokenService(s.sessionmaker, s.cache, connections)
        minted = [await tokens.mint(public_id, 3600) for public_id in ids]
        for token in minted:
            await tokens.connection_for(token.token)
        s.clock.advance(TTL * 3)  # every entry ran out: each token is read again
        s.queries.clear()
        for token, public_id in zip(minted, ids, strict=True):
            assert (await tokens.connection_for(token.token)).public_id == public_id
        assert len(s.queries) == 2  # one query each: the token with its connection
        for token in minted:  # served from the cache: in use, so revalidated
            await tokens.connection_for(token.token)
        await s.run(delete(Connection).where(Connection.public_id == ids[0]))
        await s.revalidator.run_once()
        with pytest.raises(InvalidProxyToken):
            await tokens.connection_for(minted[0].token)
        assert (await tokens.connection_for(minted[1].token)).public_id == ids[1]
        s.clock.advance(TTL * 3)
        await s.run(delete(Connection).where(Connection.public_id == ids[1]))
        with pytest.raises(InvalidProxyToken):  # no pass ran: the entry's TTL did it
            await tokens.connection_for(minted[1].token)


@asynccontextmanager
async def token_stage(settings: Settings) -> AsyncIterator[tuple[Stage, ProxyTokenService]]:
    cipher = TokenCipher([k.get_secret_value() for k in settings.encryption_keys])
    async with stage(settings) as s:
        connections = ConnectionService(s.sessionmaker, s.cache, CursorCodec(cipher))
        yield s, ProxyTokenService(s.sessionmaker, s.cache, connections)


async def test_proxy_tokens_in_use_outlive_the_ttl_and_a_revoked_one_is_dropped(
    settings: Settings,
) -> None:
    """Guards revalidation of proxy tokens: tokens in use are confirmed each pass (one
    query for them all) and never looked up again; one revoked on another replica (its
    row deleted) is dropped at the next pass, long before its own expiry."""
    [public_id] = await seeded(settings, 1)
    async with token_stage(settings) as (s, tokens):
        minted = [await tokens.mint(public_id, 3600) for _ in range(3)]
        for token in minted:  # looked up: cached, not yet served from the cache
            await tokens.connection_for(token.token)
        for _ in range(4):  # 4 passes: twice the TTL
            for token in minted:
                await tokens.connection_for(token.token)
            s.clock.advance(TTL / 2)
            s.queries.clear()
            done = await s.revalidator.run_once()
            assert done.confirmed == 4  # the connection and the three tokens
            assert len(s.queries) == 2  # one for the connection, one for the tokens
        s.queries.clear()
        for token in minted:
            await tokens.connection_for(token.token)
        assert s.queries == []  # all still cached after twice the TTL

        await s.run(delete(ProxyToken).where(ProxyToken.public_id == minted[0].id))
        assert (await s.revalidator.run_once()).dropped == 1
        with pytest.raises(InvalidProxyToken):
            await tokens.connection_for(minted[0].token)
        assert (await tokens.connection_for(minted[1].token)).public_id == public_id


async def test_a_proxy_token_revoked_elsewhere_is_refused_within_the_ttl_without_a_pass(
    settings: Settings,
) -> None:
    """Guards the bound itself: a cached token entry lives PINAUTH_CACHE_TTL, not until
    the token expires, so a revocation elsewhere is seen within the TTL even if no
    revalidation pass runs (the database down for it, say)."""
    [public_id] = await seeded(settings, 1)
    async with token_stage(settings) as (s, tokens):
        revoked, kept = [await tokens.mint(public_id, 3600) for _ in range(2)]
        for token in (revoked, kept):
            await tokens.connection_for(token.token)
        await s.run(delete(ProxyToken).where(ProxyToken.public_id == revoked.id))
        s.clock.advance(TTL / 2)
        await tokens.connection_for(revoked.token)  # within the TTL: still the cached entry
        s.clock.advance(TTL / 2)
        with pytest.raises(InvalidProxyToken):
            await tokens.connection_for(revoked.token)
        assert (await tokens.connection_for(kept.token)).public_id == public_id


async def test_a_revocation_here_during_a_token_lookup_is_not_undone(
    settings: Settings,
) -> None:
    """Guards the generation check: a lookup whose query read the token just before this
    process revoked it may answer that one request, but must not cache the row."""
    [public_id] = await seeded(settings, 1)
    async with token_stage(settings) as (s, tokens):
        minted = await tokens.mint(public_id, 3600)
        token_hash = digest(minted.token)
        on_query(s.engine, lambda: s.cache.forget_proxy_token(token_hash))
        await tokens.connection_for(minted.token)
        assert s.cache.proxy_token(token_hash) is None
        await tokens.connection_for(minted.token)  # no revocation meanwhile: cached
        assert s.cache.proxy_token(token_hash) is not None


async def test_a_revocation_here_during_the_pass_is_not_undone(settings: Settings) -> None:
    """Guards 'renew, never re-add' for proxy tokens: revoked in this process while the
    pass's query (which still saw the row) runs, the entry stays dropped."""
    [public_id] = await seeded(settings, 1)
    async with token_stage(settings) as (s, tokens):
        minted = await tokens.mint(public_id, 3600)
        token_hash = digest(minted.token)
        await tokens.connection_for(minted.token)
        await s.revalidator.run_once()  # the connection's use is confirmed and done with
        assert s.cache.proxy_token(token_hash) is not None  # in use again, alone
        on_query(s.engine, lambda: s.cache.forget_proxy_token(token_hash))
        assert (await s.revalidator.run_once()).confirmed == 1  # the row was there
        assert s.cache.proxy_token(token_hash) is None
