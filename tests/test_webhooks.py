"""Lifecycle webhooks (issue 13): the outbox, its events, signing and delivery."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import itertools
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
import uvicorn
from asgi_lifespan import LifespanManager
from cryptography.fernet import Fernet
from pydantic import SecretStr, ValidationError
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from pinauth.app import create_app
from pinauth.cache import ConnectionCache
from pinauth.cli import main
from pinauth.connections import ConnectionService
from pinauth.crypto import CursorCodec, TokenCipher
from pinauth.db import create_engine, create_sessionmaker
from pinauth.demo import demo_settings
from pinauth.errors import ConfigurationError
from pinauth.housekeeping import ExpiredRowPurger
from pinauth.models import Connection, WebhookAttempt, WebhookEvent, WebhookEventStatus
from pinauth.observability import Metrics
from pinauth.repository import WebhookEventRepository
from pinauth.settings import Settings
from pinauth.webhooks import (
    WebhookDispatcher,
    create_webhook_client,
    record_event,
    retry_after_seconds,
    sign,
    verify,
)
from tests.helpers import (
    ACCESS_1,
    ACCESS_2,
    ALL_TOKENS,
    API,
    POSTGRES_ADMIN_URL,
    REFRESH_1,
    REFRESH_2,
    SERVICE,
    TOKEN_URL,
    USER_ACCOUNT,
    allow_token_writes,
    browsers,
    captured_logs,
    connect_end_user,
    count_rows,
    create_api_key,
    events,
    expire_refresh_leases,
    free_port,
    log_in,
    log_in_as,
    make_settings,
    refuse_token_writes,
    run_client,
    stored_connections,
    token_json,
)

KEYS = [Fernet.generate_key().decode()]
SECRET_A = "whsec-" + "a" * 40
SECRET_B = "whsec-" + "b" * 40
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def a_connection(**overrides: object) -> Connection:
    values: dict[str, object] = {
        "pinterest_user_id": "549755885175",
        "username": "ada_pins",
        "scopes": "boards:read,pins:read",
        "access_token_encrypted": "encrypted-" + ALL_TOKENS[0],
        "refresh_token_encrypted": "encrypted-" + ALL_TOKENS[1],
        "access_token_expires_at": NOW + timedelta(days=30),
        "refresh_token_expires_at": NOW + timedelta(days=60),
        "end_user_id": "user_42",
    } | overrides
    return Connection(**values)


async def outbox(settings: Settings) -> list[WebhookEvent]:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            stmt = select(WebhookEvent).order_by(WebhookEvent.id)
            return list((await db.execute(stmt)).scalars())
    finally:
        await engine.dispose()


# --- the outbox API ---------------------------------------------------------------


async def test_record_event_commits_with_the_callers_transaction(settings: Settings) -> None:
    """The row exists when the caller commits, and not when it rolls back."""
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as db, db.begin():
            connection = a_connection()
            db.add(connection)
            await db.flush()
            await record_event(db, "connection.created", connection, now=NOW)
        async with sessionmaker() as db:
            db.add(a_connection(end_user_id="user_43"))
            await db.flush()
            await record_event(db, "connection.created", connection, now=NOW)
            await db.rollback()
    finally:
        await engine.dispose()

    [event] = await outbox(settings)
    body = json.loads(event.body)
    assert event.status is WebhookEventStatus.PENDING
    assert event.connection_id == connection.public_id
    assert body["id"] == event.public_id
    assert body["id"].startswith("evt_")
    assert body["type"] == "connection.created"
    assert body["created_at"] == "2026-11-29T12:00:00Z"
    shown = body["data"]["connection"]
    assert shown["id"] == connection.public_id
    assert shown["end_user_id"] == "user_42"
    assert shown["status"] == "active"
    assert shown["created_at"] is not None  # a server default, read back in the transaction
    for token in ALL_TOKENS:
        assert token not in event.body
    assert "encrypted" not in event.body


async def test_each_connections_events_are_numbered_1_2_3(settings: Settings) -> None:
    """`sequence`: the connection's count of events, in the payload and the row; each
    connection counts its own; a deletion takes the next number; counting changes
    neither the connection's version nor its updated_at (issue 19, item 4)."""
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        ada = await add_events(
            sessionmaker,
            NOW,
            "connection.created",
            "connection.reauthorization_required",
            end_user_id="ada",
        )
        grace = await add_events(sessionmaker, NOW, "connection.created", end_user_id="grace")
        async with sessionmaker() as db:
            before = await db.get(Connection, ada.id)
        await add_events_to(sessionmaker, ada, "connection.recovered")
        async with sessionmaker() as db:
            after = await db.get(Connection, ada.id)
        cache = ConnectionCache(0)
        await ConnectionService(sessionmaker, cache, CursorCodec(TokenCipher(KEYS))).delete(
            ada.public_id
        )
    finally:
        await engine.dispose()

    assert before is not None
    assert after is not None
    assert (after.version, after.updated_at) == (before.version, before.updated_at)
    numbered = [
        (e.connection_id, e.type, e.sequence, json.loads(e.body)["sequence"])
        for e in await outbox(settings)
    ]
    assert numbered == [
        (ada.public_id, "connection.created", 1, 1),
        (ada.public_id, "connection.reauthorization_required", 2, 2),
        (grace.public_id, "connection.created", 1, 1),
        (ada.public_id, "connection.recovered", 3, 3),
        (ada.public_id, "connection.deleted", 4, 4),
    ]


@pytest.mark.skipif(not POSTGRES_ADMIN_URL, reason="two writers at once need PostgreSQL")
async def test_two_replicas_recording_for_one_connection_get_consecutive_numbers(
    settings: Settings,
) -> None:
    """Two engines (two replicas) record 40 events for one connection at once, each
    transaction holding its row lock across yields: the numbers are 1..40 without a
    duplicate, and the event ids (the dispatcher's order) follow them."""
    engines = [create_engine(settings), create_engine(settings)]
    try:
        makers = [create_sessionmaker(engine) for engine in engines]
        connection = await add_events(makers[0], NOW)

        async def record(index: int) -> None:
            async with makers[index % 2]() as db, db.begin():
                attached = await db.get(Connection, connection.id)
                assert attached is not None
                await record_event(db, "connection.updated", attached, now=NOW)
                for _ in range(3):
                    await asyncio.sleep(0)  # let the others' transactions run meanwhile

        await asyncio.gather(*(record(i) for i in range(40)))
    finally:
        for engine in engines:
            await engine.dispose()

    sequences = [e.sequence for e in await outbox(settings)]  # in id order
    assert sequences == list(range(1, 41))


async def test_record_event_refuses_unknown_types(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            with pytest.raises(ValueError, match=r"connection\.exploded"):
                await record_event(db, "connection.exploded", a_connection())
    finally:
        await engine.dispose()


# --- settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"webhook_url": "ftp://example.com/hook"}, r"not an http\(s\) URL"),
        ({"webhook_url": "example.com/hook"}, r"not an http\(s\) URL"),
        ({"webhook_secrets": f"{SECRET_A},short"}, "secret #2 is shorter than 32"),
        ({"webhook_concurrency": "0"}, "greater than or equal to 1"),
        ({"webhook_concurrency": "101"}, "less than or equal to 100"),
    ],
)
def test_bad_webhook_settings_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings("sqlite+aiosqlite://", **overrides)


def test_a_webhook_url_without_secrets_is_refused() -> None:
    settings = make_settings("sqlite+aiosqlite://", webhook_url="https://app.example/hooks")
    with pytest.raises(ConfigurationError, match="PINAUTH_WEBHOOK_SECRETS is not"):
        settings.validate_for_serving()


def test_webhook_secrets_are_comma_separated() -> None:
    settings = make_settings(
        "sqlite+aiosqlite://",
        webhook_url="https://app.example/hooks",
        webhook_secrets=f" {SECRET_A} , {SECRET_B} ",
    )
    settings.validate_for_serving()
    assert [s.get_secret_value() for s in settings.webhook_secrets] == [SECRET_A, SECRET_B]


# --- every change commits its event -----------------------------------------------


def types_of(events: list[WebhookEvent]) -> list[str]:
    return [event.type for event in events]


async def test_login_events_created_then_updated(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    await log_in(client, pinterest)
    await log_in(client, pinterest)

    events = await outbox(settings)
    assert types_of(events) == ["connection.created", "connection.updated"]
    me = (await client.get("/me")).json()
    assert {event.connection_id for event in events} == {me["connection_id"]}
    for event in events:
        assert all(token not in event.body for token in ALL_TOKENS)
    # The body's connection is the API's connection object, next_refresh_at included.
    key = await create_api_key(settings)
    shown = await client.get(
        f"/v1/connections/{me['connection_id']}", headers={"Authorization": f"Bearer {key}"}
    )
    sent = json.loads(events[-1].body)["data"]["connection"]
    assert sent["next_refresh_at"] is not None
    assert sent == shown.json()


async def test_rejected_refresh_reports_once_across_replicas_then_recovered(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Two replicas meet the same dead refresh token: one event; a new login: recovered."""
    pinterest.post(TOKEN_URL).respond(400, json={"code": 2, "message": "Authentication failed."})
    async with run_client(settings, pinterest) as one, run_client(settings, pinterest) as two:
        await log_in(one, pinterest)
        pinterest.post(TOKEN_URL).respond(400, json={"code": 2, "message": "dead"})
        two.cookies = one.cookies
        answers = await asyncio.gather(
            *(replica.post("/auth/refresh") for replica in (one, two, one, two))
        )
        again = await two.post("/auth/refresh")
        await log_in(one, pinterest)

    assert {a.json()["error"] for a in [*answers, again]} == {"reauthorization_required"}
    assert types_of(await outbox(settings)) == [
        "connection.created",
        "connection.reauthorization_required",
        "connection.recovered",
    ]
    body = json.loads((await outbox(settings))[1].body)
    assert body["data"]["connection"]["status"] == "reauthorization_required"


async def test_deletes_report_deleted(settings: Settings, pinterest: respx.MockRouter) -> None:
    """Through the API (an API key) and the browser's disconnect alike."""
    key = await create_api_key(settings)
    async with browsers(settings, pinterest, 3) as (backend, ada, grace):
        backend.headers["Authorization"] = f"Bearer {key}"
        first = await connect_end_user(
            backend, ada, pinterest, "user_1", USER_ACCOUNT, ACCESS_1, REFRESH_1
        )
        # A browser's own login, which the browser then disconnects.
        await log_in_as(grace, pinterest, USER_ACCOUNT, ACCESS_2, REFRESH_2)
        second = (await grace.get("/me")).json()["connection_id"]
        assert (await backend.delete(f"/v1/connections/{first}")).status_code == 204
        disconnect = await grace.delete("/auth/connection", headers={"Origin": SERVICE})
        assert disconnect.status_code == 204, disconnect.text

    events = await outbox(settings)
    deleted = [e for e in events if e.type == "connection.deleted"]
    assert [e.connection_id for e in deleted] == [first, second]
    assert json.loads(deleted[0].body)["data"]["connection"]["end_user_id"] == "user_1"
    assert json.loads(deleted[1].body)["data"]["connection"]["end_user_id"] is None


# An outbox that refuses every event: a real error from the real database, raised by the
# event's INSERT, so a state change written in the same transaction must roll back with it.
_REFUSE_EVENTS = {
    "sqlite": [
        "CREATE TRIGGER refuse_events BEFORE INSERT ON webhook_events "
        "BEGIN SELECT RAISE(ABORT, 'the outbox refuses events'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_events() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the outbox refuses events'; END $$",
        "CREATE TRIGGER refuse_events BEFORE INSERT ON webhook_events FOR EACH ROW "
        "EXECUTE FUNCTION refuse_events()",
    ],
}
_ALLOW_EVENTS = {
    "sqlite": ["DROP TRIGGER IF EXISTS refuse_events"],
    "postgresql": [
        "DROP TRIGGER IF EXISTS refuse_events ON webhook_events",
        "DROP FUNCTION IF EXISTS refuse_events()",
    ],
}


async def run_sql(database_url: str, statements: dict[str, list[str]]) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            for statement in statements[engine.dialect.name]:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def refused_events(database_url: str) -> AsyncIterator[Callable[[bool], Awaitable[None]]]:
    """`await refuse(True)` makes the outbox refuse inserts, `refuse(False)` undoes it;
    undone in any case at the end (PostgreSQL's test database outlives the test)."""

    async def refuse(on: bool) -> None:
        await run_sql(database_url, _REFUSE_EVENTS if on else _ALLOW_EVENTS)

    try:
        yield refuse
    finally:
        await refuse(False)


@asynccontextmanager
async def answering(
    settings: Settings, pinterest: respx.MockRouter, count: int
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` browsers on one running app that get its 500 answers as a server sends
    them (in-process transports re-raise the error by default)."""
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with LifespanManager(app) as manager, AsyncExitStack() as stack:
        asgi = httpx.ASGITransport(manager.app, raise_app_exceptions=False)
        yield [
            await stack.enter_async_context(httpx.AsyncClient(transport=asgi, base_url=SERVICE))
            for _ in range(count)
        ]


def a_clear_500(response: httpx.Response) -> bool:
    """pinauth's answer to a database error that is no outage: JSON, nothing leaked."""
    return (
        response.status_code == 500
        and response.json()["error"] == "internal_error"
        and "refuses" not in response.text
        and "Traceback" not in response.text
    )


async def test_a_delete_whose_event_cannot_be_written_is_not_done(
    settings: Settings,
    pinterest: respx.MockRouter,
    refused_events: Callable[[bool], Awaitable[None]],
) -> None:
    """Guards the deletion and its event in one transaction: when the outbox refuses
    the event, DELETE /v1/connections/{id} and the browser's disconnect fail and the
    connection and its session are still there; once it takes events again, both work
    and each reports connection.deleted."""
    key = await create_api_key(settings)
    async with answering(settings, pinterest, 3) as (backend, ada, grace):
        backend.headers["Authorization"] = f"Bearer {key}"
        first = await connect_end_user(
            backend, ada, pinterest, "user_1", USER_ACCOUNT, ACCESS_1, REFRESH_1
        )
        # The browser's disconnect needs a browser session: a browser-only login.
        await log_in_as(grace, pinterest, USER_ACCOUNT, ACCESS_2, REFRESH_2)
        second = (await grace.get("/me")).json()["connection_id"]
        before = await stored_connections(settings)
        await refused_events(True)
        refused_api = await backend.delete(f"/v1/connections/{first}")
        refused_browser = await grace.delete("/auth/connection", headers={"Origin": SERVICE})
        during = await stored_connections(settings)
        sessions_during = await count_rows(settings.database_url, "sessions")
        await refused_events(False)
        still = await backend.get(f"/v1/connections/{first}")
        grace_me = await grace.get("/me")
        deleted_api = await backend.delete(f"/v1/connections/{first}")
        deleted_browser = await grace.delete("/auth/connection", headers={"Origin": SERVICE})

    assert a_clear_500(refused_api), refused_api.text
    assert a_clear_500(refused_browser), refused_browser.text
    assert during == before
    assert sessions_during == 1  # grace's (a connect-session login gives ada none)
    assert still.status_code == 200
    assert grace_me.status_code == 200
    assert (deleted_api.status_code, deleted_browser.status_code) == (204, 204)
    deleted = [e.connection_id for e in await outbox(settings) if e.type == "connection.deleted"]
    assert deleted == [first, second]
    assert await stored_connections(settings) == {}


async def test_a_rejected_refresh_whose_event_cannot_be_written_changes_nothing(
    settings: Settings,
    pinterest: respx.MockRouter,
    refused_events: Callable[[bool], Awaitable[None]],
) -> None:
    """Guards the state change and its reauthorization_required in one transaction:
    Pinterest refuses the refresh token, the outbox refuses the event, and the
    connection stays active; once the outbox takes events, the next refresh marks it
    and reports it, once."""
    async with answering(settings, pinterest, 1) as [client]:
        await log_in(client, pinterest)
        [before] = (await stored_connections(settings)).values()
        token = pinterest.post(TOKEN_URL).respond(400, json={"code": 2, "message": "dead"})
        await refused_events(True)
        refused = await client.post("/auth/refresh")
        [during] = (await stored_connections(settings)).values()
        await refused_events(False)
        # The failed attempt's refresh lease is still on the row until it runs out.
        await expire_refresh_leases(settings.database_url)
        marked = await client.post("/auth/refresh")

    assert a_clear_500(refused), refused.text
    assert token.call_count == 2
    assert during["status"] == before["status"] == "active"
    assert during["version"] == before["version"]
    assert (during["access"], during["refresh"]) == (before["access"], before["refresh"])
    assert marked.status_code == 401
    assert marked.json()["error"] == "reauthorization_required"
    assert types_of(await outbox(settings)) == [
        "connection.created",
        "connection.reauthorization_required",
    ]


# --- delivery ---------------------------------------------------------------------


class Clock:
    """The dispatcher's wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def hooked(settings: Settings, url: str = "https://app.example/hooks") -> Settings:
    return settings.model_copy(
        update={
            "webhook_url": url,
            "webhook_secrets": [SecretStr(SECRET_A), SecretStr(SECRET_B)],
            "webhook_timeout_seconds": 2.0,
        }
    )


@asynccontextmanager
async def dispatching(
    settings: Settings,
    receiver: Callable[[httpx.Request], httpx.Response] | None = None,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    jitter: Callable[[], float] = lambda: 0.0,
) -> AsyncIterator[tuple[WebhookDispatcher, async_sessionmaker[AsyncSession]]]:
    """A dispatcher over the test database; `receiver` answers its POSTs in-process."""
    engine = create_engine(settings)
    transport = httpx.MockTransport(receiver) if receiver is not None else None
    http = (
        httpx.AsyncClient(transport=transport)
        if transport is not None
        else create_webhook_client(settings)
    )
    sessionmaker = create_sessionmaker(engine)
    try:
        yield (
            WebhookDispatcher(
                settings,
                sessionmaker,
                http,
                clock=clock or Clock(),
                jitter=jitter,
                metrics=metrics,
            ),
            sessionmaker,
        )
    finally:
        await http.aclose()
        await engine.dispose()


async def add_events(
    sessionmaker: async_sessionmaker[AsyncSession],
    when: datetime,
    *kinds: str,
    end_user_id: str = "user_42",
) -> Connection:
    """A connection and its events, each committed in its own transaction."""
    async with sessionmaker() as db, db.begin():
        connection = a_connection(end_user_id=end_user_id)
        db.add(connection)
        await db.flush()
    for kind in kinds:
        async with sessionmaker() as db, db.begin():
            attached = await db.get(Connection, connection.id)
            assert attached is not None
            await record_event(db, kind, attached, now=when)
    return connection


async def add_events_to(
    sessionmaker: async_sessionmaker[AsyncSession], connection: Connection, *kinds: str
) -> None:
    """More events of an existing connection, each in its own transaction."""
    for kind in kinds:
        async with sessionmaker() as db, db.begin():
            attached = await db.get(Connection, connection.id)
            assert attached is not None
            await record_event(db, kind, attached, now=NOW)


def independent_signature_check(body: bytes, header: str, secret: str) -> bool:
    """Written from the documented format alone, not from pinauth's code."""
    fields = [field.split("=", 1) for field in header.split(",")]
    timestamp = next(value for name, value in fields if name == "t")
    expected = hmac.new(
        secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256
    ).hexdigest()
    return any(name == "v1" and value == expected for name, value in fields)


async def test_a_delivery_is_signed_with_every_secret(settings: Settings) -> None:
    settings = hooked(settings)
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    clock = Clock()
    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):
        connection = await add_events(sessionmaker, clock.now, "connection.created")
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0  # delivered once, not again

    [request] = received
    body = request.content
    header = request.headers["pinauth-signature"]
    event = json.loads(body)
    assert str(request.url) == "https://app.example/hooks"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["pinauth-event-id"] == event["id"]
    assert event["type"] == "connection.created"
    assert event["data"]["connection"]["id"] == connection.public_id
    assert header.startswith(f"t={int(clock.now.timestamp())},v1=")
    assert header.count("v1=") == 2
    assert independent_signature_check(body, header, SECRET_A)
    assert independent_signature_check(body, header, SECRET_B)
    assert not independent_signature_check(body, header, "whsec-" + "c" * 40)
    now = clock.now.timestamp()
    assert verify(body, header, [SECRET_B], now=now)  # a receiver mid-rotation
    assert verify(body.decode(), header, SECRET_A, now=now)
    assert not verify(body + b" ", header, SECRET_A, now=now)
    assert not verify(body, header, "whsec-" + "c" * 40, now=now)
    assert not verify(body, header, SECRET_A, now=now + 301)  # a replay, too late
    assert verify(body, header, SECRET_A, tolerance=600, now=now + 301)
    assert not verify(body, header.replace("t=", "t=1"), SECRET_A, now=now)
    assert not verify(body, "", SECRET_A, now=now)
    assert not verify(body, "t=abc,v1=00", SECRET_A, now=now)
    # An empty secret (what "a,b,".split(",") leaves) signs for anyone: never accepted.
    forged = hmac.new(b"", f"{int(now)}.".encode() + body, hashlib.sha256).hexdigest()
    assert not verify(body, f"t={int(now)},v1={forged}", [SECRET_A, ""], now=now)
    assert not verify(body, f"t={int(now)},v1={forged}", "", now=now)
    # A timestamp too large for a float is too far off, not an exception.
    assert not verify(body, "t=1" + "0" * 400 + ",v1=00", SECRET_A, now=now)
    [stored] = await outbox(settings)
    assert stored.status is WebhookEventStatus.DELIVERED
    assert stored.delivered_at == clock.now


def test_verify_is_false_for_non_ascii_signatures_and_takes_bytes_secrets() -> None:
    """A v1 holding non-ASCII characters is no match, not a TypeError from
    hmac.compare_digest; a valid v1 beside it still verifies. Secrets may be bytes."""
    body = b'{"id":"evt_x"}'
    now = 1_800_000_000
    good = sign(body, [SECRET_A], now)  # "t=<now>,v1=<mac>"
    mac = good.split("v1=")[1]
    for bad in ("\u00e9", "\u00b2" * 64, mac[:-1] + "\u00e9", "\udc80"):
        assert not verify(body, f"t={now},v1={bad}", SECRET_A, now=now)
        assert verify(body, f"t={now},v1={bad},v1={mac}", SECRET_A, now=now)
    assert verify(body, good, SECRET_A.encode(), now=now)
    assert verify(body, good, [SECRET_B.encode(), SECRET_A.encode()], now=now)
    assert not verify(body, good, SECRET_B.encode(), now=now)
    assert not verify(body, good, b"", now=now)  # an empty secret signs for anyone
    with pytest.raises(TypeError, match=r"a webhook secret is a str \(or bytes\), not int"):
        verify(body, good, [SECRET_A, 42], now=now)  # type: ignore[list-item]


def test_verify_refuses_a_signature_without_the_timestamp_and_one_from_the_future() -> None:
    """Guards what the HMAC covers and the two-sided tolerance: a v1 over the body alone
    (no `<t>.`) is no signature, and a `t` beyond the tolerance ahead of now is refused
    like one behind it (a signature made for later would be replayable until then)."""
    body = b'{"id":"evt_x"}'
    now = 1_800_000_000
    body_only = hmac.new(SECRET_A.encode(), body, hashlib.sha256).hexdigest()
    assert not verify(body, f"t={now},v1={body_only}", SECRET_A, now=now)
    for skew in (-301, 301, 10**9):
        header = sign(body, [SECRET_A], now + skew)
        assert not verify(body, header, SECRET_A, now=now), skew
    for skew in (-300, 300):
        assert verify(body, sign(body, [SECRET_A], now + skew), SECRET_A, now=now), skew


@pytest.mark.parametrize("matching", ["none", "first", "last"])
def test_verify_compares_every_candidate_with_every_secret(
    monkeypatch: pytest.MonkeyPatch, matching: str
) -> None:
    """Guards the constant-time check: `hmac.compare_digest` for each (v1, secret) pair,
    as many calls whether no pair, the first or the last one matches, so neither `==`
    nor stopping at the first match (which times out which secret matched) passes."""
    body = b'{"id":"evt_x"}'
    now = 1_800_000_000
    secrets = [SECRET_A, SECRET_B, "whsec-" + "c" * 40]
    mac = sign(body, [SECRET_A], now).split("v1=")[1]
    others = [hashlib.sha256(bytes([n])).hexdigest() for n in range(3)]
    candidates = {"none": others, "first": [mac, *others[1:]], "last": [*others[:2], mac]}
    header = ",".join([f"t={now}", *(f"v1={c}" for c in candidates[matching])])
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting_compare)
    verified = verify(body, header, secrets, now=now)

    assert verified is (matching != "none")
    assert len(calls) == 3 * 3  # candidates x secrets, whatever matched
    assert len(set(calls)) == 9


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(500), "HTTP 500"),
        (httpx.Response(503), "HTTP 503"),
        (httpx.Response(408), "HTTP 408"),
        (httpx.Response(429), "HTTP 429"),
        (httpx.ConnectError("refused"), "ConnectError: refused"),
        (httpx.ReadTimeout("slow"), "no answer within 2 s"),
        (httpx.Response(400), "HTTP 400"),
        (httpx.Response(401), "HTTP 401"),
        (httpx.Response(404), "HTTP 404"),
        (httpx.Response(410), "HTTP 410"),
        (
            httpx.Response(301, headers={"Location": "https://elsewhere.example/"}),
            "HTTP 301 to https://elsewhere.example/ (redirects are not followed)",
        ),
        (httpx.Response(308), "HTTP 308"),
    ],
)
async def test_every_answer_but_a_2xx_is_retried(
    settings: Settings, answer: httpx.Response | Exception, error: str
) -> None:
    """A receiver that moved (3xx) or is mid-deploy (404, 410) is down, not a verdict:
    the event backs off and goes again, like after a 5xx (issue 19, item 4)."""
    settings = hooked(settings)
    requests: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    metrics = Metrics()
    async with dispatching(settings, receiver, clock, metrics) as (dispatcher, sessionmaker):
        await add_events(sessionmaker, clock.now, "connection.created")
        await dispatcher.run_once()
        async with sessionmaker() as db:
            [event] = (await db.execute(select(WebhookEvent))).scalars()
            [attempt] = await WebhookEventRepository(db).attempts(event.id)

    code = None if isinstance(answer, Exception) else answer.status_code
    assert [str(r.url) for r in requests] == ["https://app.example/hooks"]  # never followed
    assert attempt.response_code == code
    assert attempt.duration_ms >= 0
    assert event.attempts == 1
    counted = metrics.registry.get_sample_value(
        "pinauth_webhook_deliveries_total", {"outcome": attempt.outcome}
    )
    assert counted == 1
    assert attempt.outcome == "retry"
    assert event.status is WebhookEventStatus.PENDING
    assert event.last_error == error
    assert event.next_attempt_at == clock.now + timedelta(seconds=5)  # 10 s, jitter 0


@pytest.mark.parametrize("retry_after", ["120", "HTTP-DATE"])
async def test_retry_after_is_honoured(settings: Settings, retry_after: str) -> None:
    settings = hooked(settings)
    clock = Clock()
    if retry_after == "HTTP-DATE":
        retry_after = email.utils.format_datetime(clock.now + timedelta(seconds=120), usegmt=True)
    answers = iter([httpx.Response(429, headers={"Retry-After": retry_after})])

    def receiver(_request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(200))

    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):
        await add_events(sessionmaker, clock.now, "connection.created")
        assert await dispatcher.run_once() == 1
        clock.advance(119)
        assert await dispatcher.run_once() == 0  # not before the receiver asked
        clock.advance(1)
        assert await dispatcher.run_once() == 1

    [event] = await outbox(settings)
    assert event.status is WebhookEventStatus.DELIVERED


async def test_retries_back_off_for_24_hours_then_fail(settings: Settings) -> None:
    settings = hooked(settings)
    calls: list[datetime] = []
    clock = Clock()
    start = clock.now

    def receiver(_request: httpx.Request) -> httpx.Response:
        calls.append(clock.now)
        return httpx.Response(502)

    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):
        await add_events(sessionmaker, clock.now, "connection.created")
        for _ in range(200):
            await dispatcher.run_once()
            [event] = await outbox(settings)
            if event.status is not WebhookEventStatus.PENDING:
                break
            clock.now = event.next_attempt_at

    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(calls)]
    assert event.status is WebhookEventStatus.FAILED
    assert event.last_error == "HTTP 502"
    assert gaps[:4] == [5, 10, 20, 40]  # doubling (jitter 0 takes half)
    assert max(gaps) == 1800  # capped at an hour, halved
    assert calls[-1] - start <= timedelta(hours=24)
    assert calls[-1] - start > timedelta(hours=23)
    assert len(calls) == event.attempts < 60  # about two an hour at most: no storm


async def test_one_connections_events_go_in_order(settings: Settings) -> None:
    """A later event waits while an earlier one of the same connection is retried;
    other connections' events do not wait for it."""
    settings = hooked(settings)
    delivered: list[str] = []
    failing = {"first": True}

    def receiver(request: httpx.Request) -> httpx.Response:
        event = json.loads(request.content)
        key = f"{event['data']['connection']['end_user_id']}:{event['type']}"
        if key == "ada:connection.created" and failing["first"]:
            failing["first"] = False
            return httpx.Response(503)
        delivered.append(key)
        return httpx.Response(200)

    clock = Clock()
    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):
        await add_events(
            sessionmaker,
            clock.now,
            "connection.created",
            "connection.reauthorization_required",
            "connection.recovered",
            end_user_id="ada",
        )
        await add_events(sessionmaker, clock.now, "connection.created", end_user_id="grace")
        await dispatcher.run_once()
        await dispatcher.run_once()
        assert delivered == ["grace:connection.created"]
        clock.advance(5)
        for _ in range(4):
            await dispatcher.run_once()

    assert delivered == [
        "grace:connection.created",
        "ada:connection.created",
        "ada:connection.reauthorization_required",
        "ada:connection.recovered",
    ]


async def test_two_dispatchers_deliver_each_event_once(settings: Settings) -> None:
    """Two replicas' dispatchers over one database, passes interleaved at every await."""
    settings = hooked(settings)
    seen: list[str] = []

    async def receiver(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)  # let the other dispatcher run mid-delivery
        seen.append(request.headers["pinauth-event-id"])
        return httpx.Response(200)

    clock = Clock()
    async with (
        dispatching(settings, receiver, clock) as (one, sessionmaker),  # type: ignore[arg-type]
        dispatching(settings, receiver, clock) as (two, _),  # type: ignore[arg-type]
    ):
        for user in range(30):
            await add_events(
                sessionmaker, clock.now, "connection.created", end_user_id=f"user_{user}"
            )
        while True:
            done = await asyncio.gather(one.run_once(), two.run_once(), one.run_once())
            if not any(done):
                break

    assert len(seen) == 30
    assert len(set(seen)) == 30
    assert {e.status for e in await outbox(settings)} == {WebhookEventStatus.DELIVERED}


# --- independent deliveries (issue 19, item 3) -------------------------------------


def connection_of(request: httpx.Request) -> str:
    end_user_id: str = json.loads(request.content)["data"]["connection"]["end_user_id"]
    return end_user_id


async def test_a_receiver_slow_for_one_connection_holds_nobody_elses_events(
    settings: Settings,
) -> None:
    """The running dispatcher; the receiver holds every delivery for "slow" until the
    end. Meanwhile 20 other connections' events (more than PINAUTH_WEBHOOK_CONCURRENCY)
    all arrive: each ended delivery frees its slot for the next. "slow"'s second event
    waits behind its first (order), and arrives once the receiver answers."""
    settings = hooked(settings)
    assert settings.webhook_concurrency == 8  # the default
    release = asyncio.Event()
    others_arrived = asyncio.Event()
    slow_done = asyncio.Event()
    arrived: list[str] = []
    slow_started: list[int] = []

    async def receiver(request: httpx.Request) -> httpx.Response:
        who = connection_of(request)
        if who == "slow":
            slow_started.append(json.loads(request.content)["sequence"])
            await release.wait()
        arrived.append(f"{who}:{json.loads(request.content)['sequence']}")
        if sum(not a.startswith("slow") for a in arrived) == 20:
            others_arrived.set()
        if arrived.count("slow:2"):
            slow_done.set()
        return httpx.Response(204)

    clock = Clock()
    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):  # type: ignore[arg-type]
        await add_events(
            sessionmaker, clock.now, "connection.created", "connection.deleted", end_user_id="slow"
        )
        for n in range(20):
            await add_events(sessionmaker, clock.now, "connection.created", end_user_id=f"u{n}")
        dispatcher.start()
        try:
            async with asyncio.timeout(20):  # a deadlock guard, not a measurement
                await others_arrived.wait()
            held = list(arrived)
            slow_held = list(slow_started)
            release.set()
            async with asyncio.timeout(20):
                await slow_done.wait()
        finally:
            release.set()
            await dispatcher.stop()

    assert len(held) == 20
    assert not any(a.startswith("slow") for a in held)  # all while "slow" was held
    assert slow_held == [1]  # its second event waited behind the held first
    assert arrived[20:] == ["slow:1", "slow:2"]
    assert {e.status for e in await outbox(settings)} == {WebhookEventStatus.DELIVERED}


async def test_a_freed_slot_and_a_commit_wake_the_dispatcher_at_once(settings: Settings) -> None:
    """One slot and a poll interval of an hour: three queued events go one after the
    other (each ended delivery wakes the next claim), and an event committed afterwards
    by this process goes at once (the commit wakes it), without a poll."""
    settings = hooked(settings).model_copy(update={"webhook_concurrency": 1})
    arrived: list[str] = []
    count = {"wanted": 3}
    enough = asyncio.Event()

    def receiver(request: httpx.Request) -> httpx.Response:
        arrived.append(connection_of(request))
        if len(arrived) == count["wanted"]:
            enough.set()
        return httpx.Response(204)

    clock = Clock()
    engine = create_engine(settings)
    http = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    sessionmaker = create_sessionmaker(engine)
    dispatcher = WebhookDispatcher(
        settings, sessionmaker, http, clock=clock, jitter=lambda: 0.0, poll_interval=3600
    )
    try:
        for user in ("a", "b", "c"):
            await add_events(sessionmaker, clock.now, "connection.created", end_user_id=user)
        dispatcher.start()
        async with asyncio.timeout(20):  # a deadlock guard: the poll would take an hour
            await enough.wait()
        passes = dispatcher.passes
        enough.clear()
        count["wanted"] = 4
        await add_events(sessionmaker, clock.now, "connection.created", end_user_id="d")
        async with asyncio.timeout(20):
            await enough.wait()
    finally:
        await dispatcher.stop()
        await http.aclose()
        await engine.dispose()

    assert arrived == ["a", "b", "c", "d"]
    assert passes >= 3  # one claim per freed slot


# --- a moved receiver loses nothing (issue 19, item 4) ------------------------------


async def drain(
    dispatcher: WebhookDispatcher, clock: Clock, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    """Run the dispatcher on the fake clock until no event is pending: whenever nothing
    is due, jump to the next retry."""
    for _ in range(1000):
        if await dispatcher.run_once():
            continue
        async with sessionmaker() as db:
            pending = WebhookEvent.status == WebhookEventStatus.PENDING
            later = select(func.min(WebhookEvent.next_attempt_at)).where(
                pending, WebhookEvent.next_attempt_at > clock.now
            )
            due = (await db.execute(later)).scalar_one()
            left = (await db.execute(select(func.count()).where(pending))).scalar_one()
        if not left:
            return
        assert due is not None, "pending events, none due later, none claimable"
        clock.now = due
    raise AssertionError("the outbox never drained")


async def test_a_moved_receiver_gets_every_event_in_order(settings: Settings) -> None:
    """For two hours the receiver answers 301, then 404, then 410 (a move and a deploy),
    then 200: both of ada's events arrive, created before deleted, and deleted was not
    even tried while created was being retried; grace's went at once."""
    settings = hooked(settings)
    clock = Clock()
    start = clock.now
    tried: list[tuple[str, int]] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        event = json.loads(request.content)
        tried.append((connection_of(request), event["sequence"]))
        if connection_of(request) == "grace":
            return httpx.Response(204)
        elapsed = clock.now - start
        if elapsed < timedelta(minutes=40):
            return httpx.Response(301, headers={"Location": "https://new.example/hooks"})
        if elapsed < timedelta(minutes=80):
            return httpx.Response(404)
        if elapsed < timedelta(hours=2):
            return httpx.Response(410)
        return httpx.Response(204)

    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):
        await add_events(
            sessionmaker, clock.now, "connection.created", "connection.deleted", end_user_id="ada"
        )
        await add_events(sessionmaker, clock.now, "connection.created", end_user_id="grace")
        await drain(dispatcher, clock, sessionmaker)
        async with sessionmaker() as db:
            first = (await db.execute(select(WebhookEvent).order_by(WebhookEvent.id))).scalars()
            created = next(iter(first))
            codes = [a.response_code for a in await WebhookEventRepository(db).attempts(created.id)]

    ada = [sequence for who, sequence in tried if who == "ada"]
    assert tried[1] == ("grace", 1)  # not held behind ada's retries
    assert ada[-2:] == [1, 2]
    assert set(ada[:-1]) == {1}  # deleted waited while created was retried
    assert {301, 404, 410} <= set(codes)
    assert codes[-1] == 204
    assert {e.status for e in await outbox(settings)} == {WebhookEventStatus.DELIVERED}


async def test_a_later_event_goes_when_the_earlier_ones_24_hours_end_and_the_gap_shows(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ada's connection.created is refused (410) for its whole 24 hours; only then does
    connection.deleted go, and the receiver sees sequence 2 without 1. `pinauth webhooks
    redeliver --failed` sends the failed one again (the receiver is fixed by then);
    --since leaves out what failed before TIME."""
    settings = hooked(settings)
    clock = Clock()
    start = clock.now
    fixed = {"now": False}
    arrived: list[tuple[str, str, int]] = []
    refused_at: list[datetime] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        event = json.loads(request.content)
        if event["type"] == "connection.created" and not fixed["now"]:
            refused_at.append(clock.now)
            return httpx.Response(410)
        arrived.append((connection_of(request), event["type"], event["sequence"]))
        return httpx.Response(204)

    async with dispatching(settings, receiver, clock) as (dispatcher, sessionmaker):
        old = await add_events(
            sessionmaker, start - timedelta(days=3), "connection.created", end_user_id="old"
        )
        await add_events(
            sessionmaker, clock.now, "connection.created", "connection.deleted", end_user_id="ada"
        )
        await drain(dispatcher, clock, sessionmaker)
        gap = list(arrived)
        fixed["now"] = True
        monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)

        def run(*args: str) -> tuple[int, str, str]:
            code = main(list(args))
            out, err = capsys.readouterr()
            return code, out, err

        since = (start - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        queued = await asyncio.to_thread(run, "webhooks", "redeliver", "--failed", "--since", since)
        again = await asyncio.to_thread(run, "webhooks", "redeliver", "--failed", "--since", since)
        await drain(dispatcher, clock, sessionmaker)
        everything = await asyncio.to_thread(run, "webhooks", "redeliver", "--failed")
        await drain(dispatcher, clock, sessionmaker)

    assert refused_at[-1] - start > timedelta(hours=23)  # retried for its 24 hours
    assert gap == [("ada", "connection.deleted", 2)]  # a gap the receiver can see
    assert queued[0] == 0
    assert queued[1].startswith("1 failed webhook event of 1 connection created since ")
    assert again[0] == 0
    assert again[1].startswith("No failed webhook events created since ")
    assert everything[1].startswith("1 failed webhook event of 1 connection queued")
    assert arrived == [
        ("ada", "connection.deleted", 2),
        ("ada", "connection.created", 1),
        (old.end_user_id, "connection.created", 1),
    ]


async def test_a_failed_event_sent_again_waits_for_its_connections_delivery_in_flight(
    settings: Settings,
) -> None:
    """ada's first event failed; her second is in flight (leased) when the first is
    redelivered: the first is not claimed beside it, only once it has been recorded."""
    clock = Clock()
    async with dispatching(hooked(settings), lambda _: httpx.Response(204), clock) as (
        _,
        sessionmaker,
    ):
        await add_events(
            sessionmaker, clock.now, "connection.created", "connection.deleted", end_user_id="ada"
        )
        async with sessionmaker() as db, db.begin():
            await db.execute(
                update(WebhookEvent)
                .where(WebhookEvent.type == "connection.created")
                .values(status=WebhookEventStatus.FAILED)
            )
        lease = clock.now + timedelta(seconds=30)
        async with sessionmaker() as db, db.begin():
            [second] = await WebhookEventRepository(db).claim_due(clock.now, "one", lease, 8)
        async with sessionmaker() as db, db.begin():
            assert await WebhookEventRepository(db).redeliver_failed(
                None, clock.now, clock.now + timedelta(hours=24)
            ) == (1, 1)
        async with sessionmaker() as db, db.begin():
            beside = await WebhookEventRepository(db).claim_due(clock.now, "two", lease, 8)
        async with sessionmaker() as db, db.begin():
            await WebhookEventRepository(db).finish_attempt(
                second.id,
                "one",
                {"status": WebhookEventStatus.DELIVERED},
                WebhookAttempt(
                    event_id=second.id,
                    attempted_at=clock.now,
                    duration_ms=1,
                    response_code=204,
                    outcome="delivered",
                ),
            )
        async with sessionmaker() as db, db.begin():
            after = await WebhookEventRepository(db).claim_due(clock.now, "two", lease, 8)

    assert second.type == "connection.deleted"
    assert beside == []
    assert [e.type for e in after] == ["connection.created"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give the EVENT_ID to send again, or --failed [--since TIME] for every failed"),
        (("evt_abc", "--failed"), "give an EVENT_ID or --failed, not both."),
        (("evt_abc", "--since", "2026-12-01"), "--since goes with --failed"),
        (("--failed", "--since", "yesterday"), "--since 'yesterday' is not a time; write it"),
        (("--failed", "--since", "2026-13-01"), "--since '2026-13-01' is not a time"),
        (("--failed", "--since", "\udcff"), "--since '\\udcff' is not a time"),
        (
            ("--failed", "--since", "0001-01-01T00:00:00+01:00"),
            "--since '0001-01-01T00:00:00+01:00' is out of range",
        ),
        (
            ("--failed", "--since", "9999-12-31T23:00:00-05:00"),
            "--since '9999-12-31T23:00:00-05:00' is out of range",
        ),
    ],
)
def test_webhooks_redeliver_refuses_bad_input_in_one_line(
    args: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PINAUTH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'never.db'}")

    assert main(["webhooks", "redeliver", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pinauth: " + message), err
    assert err.count("\n") == 1
    assert not (tmp_path / "never.db").exists()  # refused before touching anything


# --- receivers that misbehave -----------------------------------------------------


@asynccontextmanager
async def tcp_receiver(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A loopback TCP server running `handle` for each connection; yields its URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_receiver_that_never_answers_does_not_hold_requests(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """The dispatcher started by `pinauth serve`'s lifespan POSTs into a receiver that
    holds the request; the service answers its own clients meanwhile."""
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        holding.set()
        await release.wait()

    async with tcp_receiver(hold) as url:
        settings = hooked(settings, url).model_copy(update={"webhook_timeout_seconds": 60.0})
        async with run_client(settings, pinterest) as client:
            await log_in(client, pinterest)  # commits connection.created
            async with asyncio.timeout(30):
                await holding.wait()
            answers = [await client.get("/me") for _ in range(20)]
            assert not release.is_set()  # all of them while the receiver held on
            release.set()

    assert [a.status_code for a in answers] == [200] * 20


async def test_a_receiver_trickling_its_answer_is_cut_off_and_retried(settings: Settings) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:  # a header byte now and then: each read is quick, the whole is not
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with tcp_receiver(trickle) as url:
        settings = hooked(settings, url).model_copy(update={"webhook_timeout_seconds": 0.5})
        clock = Clock()
        async with dispatching(settings, clock=clock) as (dispatcher, sessionmaker):
            await add_events(sessionmaker, clock.now, "connection.created")
            await dispatcher.run_once()

    [event] = await outbox(settings)
    assert event.status is WebhookEventStatus.PENDING
    assert event.last_error == "no answer within 0.5 s"


async def test_a_huge_answer_is_never_read(settings: Settings) -> None:
    offered = {"bytes": 0}

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
        chunk = b"x" * 65536
        while offered["bytes"] < 200_000_000:
            writer.write(chunk)
            offered["bytes"] += len(chunk)
            await writer.drain()

    async with tcp_receiver(flood) as url:
        settings = hooked(settings, url)
        clock = Clock()
        async with dispatching(settings, clock=clock) as (dispatcher, sessionmaker):
            await add_events(sessionmaker, clock.now, "connection.created")
            tracemalloc.start()
            try:
                await dispatcher.run_once()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()

    [event] = await outbox(settings)
    assert event.status is WebhookEventStatus.DELIVERED
    assert peak < 4_000_000
    assert offered["bytes"] < 50_000_000  # the connection was closed, not drained


@pytest.mark.parametrize(
    "value",
    [
        b"\xb2",  # "²" in Latin-1: str.isdigit() says yes, float() says no
        b"1" * 5000,  # beyond int()'s digit limit
        b"Mon, 01 Jan 99999999999999999999999 00:00:00 GMT",  # overflows
    ],
)
async def test_an_unusable_retry_after_is_ignored_and_the_attempt_recorded(
    settings: Settings, value: bytes
) -> None:
    """A real receiver answers 503 with a Retry-After no one can read: the attempt is
    recorded and the event backs off as usual, instead of going again unrecorded."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: "
            + value
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()

    async with tcp_receiver(answer) as url:
        clock = Clock()
        async with dispatching(hooked(settings, url), clock=clock) as (dispatcher, sessionmaker):
            await add_events(sessionmaker, clock.now, "connection.created")
            assert await dispatcher.run_once() == 1
            assert await dispatcher.run_once() == 0  # backing off, not looping
            async with sessionmaker() as db:
                [event] = (await db.execute(select(WebhookEvent))).scalars()
                [attempt] = await WebhookEventRepository(db).attempts(event.id)

    assert retry_after_seconds(value.decode("latin-1"), clock.now) is None
    assert event.status is WebhookEventStatus.PENDING
    assert event.attempts == 1
    assert event.last_error == "HTTP 503"
    assert event.next_attempt_at == clock.now + timedelta(seconds=5)  # 10 s, jitter 0
    assert (attempt.response_code, attempt.outcome) == (503, "retry")


async def test_an_attempt_is_recorded_whatever_goes_wrong_deciding_its_outcome(
    settings: Settings,
) -> None:
    """Deciding the outcome fails (here the jitter source): the attempt is still
    recorded, and the event waits the longest backoff rather than going again at once."""

    def broken_jitter() -> float:
        raise RuntimeError("no randomness today")

    clock = Clock()
    async with dispatching(
        hooked(settings), lambda _: httpx.Response(503), clock, jitter=broken_jitter
    ) as (dispatcher, sessionmaker):
        await add_events(sessionmaker, clock.now, "connection.created")
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0

    [event] = await outbox(settings)
    assert event.status is WebhookEventStatus.PENDING
    assert event.attempts == 1
    assert event.last_error == "HTTP 503"
    assert event.next_attempt_at == clock.now + timedelta(hours=1)


# --- listing and redelivery: the CLI and /v1/webhook-events -----------------------


async def failed_and_delivered(settings: Settings) -> tuple[str, str]:
    """Two events of two connections: the first failed (410 at the end of its 24 hours),
    the second delivered."""
    answers = iter([httpx.Response(410), httpx.Response(200)])
    clock = Clock()
    async with dispatching(hooked(settings), lambda _: next(answers), clock) as (
        dispatcher,
        sessionmaker,
    ):
        day_ago = clock.now - timedelta(hours=24)
        await add_events(sessionmaker, day_ago, "connection.created", end_user_id="ada")
        await add_events(sessionmaker, clock.now, "connection.deleted", end_user_id="grace")
        await dispatcher.run_once()
    failed, delivered = await outbox(settings)
    assert failed.status is WebhookEventStatus.FAILED
    assert delivered.status is WebhookEventStatus.DELIVERED
    return failed.public_id, delivered.public_id


async def test_webhooks_cli_lists_and_redelivers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed, delivered = await failed_and_delivered(settings)
    monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, everything, _ = await asyncio.to_thread(run, "webhooks", "list")
    assert code == 0
    assert failed in everything
    assert delivered in everything
    assert "HTTP 410" in everything
    code, only_failed, _ = await asyncio.to_thread(run, "webhooks", "list", "--failed")
    assert failed in only_failed
    assert delivered not in only_failed
    code, said, _ = await asyncio.to_thread(run, "webhooks", "redeliver", failed)
    assert code == 0
    assert failed in said
    code, _, err = await asyncio.to_thread(run, "webhooks", "redeliver", "evt_nope")
    assert code == 2
    assert "No webhook event has that id" in err
    assert "Traceback" not in err

    [redelivered, _] = await outbox(settings)
    assert redelivered.status is WebhookEventStatus.PENDING
    assert redelivered.last_error is None
    assert redelivered.retry_until > datetime.now(UTC) + timedelta(hours=23)


async def test_webhooks_cli_list_shows_no_stale_error_for_a_delivered_event(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failed once (503), then delivered: LAST ERROR is empty; a pending event's shows."""
    answers = iter([httpx.Response(503), httpx.Response(200), httpx.Response(502)])
    clock = Clock()
    async with dispatching(hooked(settings), lambda _: next(answers), clock) as (
        dispatcher,
        sessionmaker,
    ):
        await add_events(sessionmaker, clock.now, "connection.created", end_user_id="ada")
        await dispatcher.run_once()
        clock.advance(5)
        await dispatcher.run_once()
        await add_events(sessionmaker, clock.now, "connection.deleted", end_user_id="grace")
        await dispatcher.run_once()
    delivered, pending = await outbox(settings)
    assert delivered.status is WebhookEventStatus.DELIVERED
    assert delivered.last_error == "HTTP 503"  # kept in the row; the listing hides it
    assert pending.status is WebhookEventStatus.PENDING
    monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)

    def run() -> tuple[int, str]:
        code = main(["webhooks", "list"])
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(run)

    assert code == 0
    [line] = [line for line in out.splitlines() if delivered.public_id in line]
    assert line.rstrip().endswith(" 2 " + delivered.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    assert "HTTP 503" not in out
    [line] = [line for line in out.splitlines() if pending.public_id in line]
    assert line.rstrip().endswith("HTTP 502")


async def test_webhook_events_api(settings: Settings, pinterest: respx.MockRouter) -> None:
    failed, delivered = await failed_and_delivered(settings)
    key = await create_api_key(settings)
    async with run_client(settings, pinterest) as client:
        assert (await client.get("/v1/webhook-events")).status_code == 401
        client.headers["Authorization"] = f"Bearer {key}"
        listing = (await client.get("/v1/webhook-events")).json()
        only_failed = (await client.get("/v1/webhook-events", params={"status": "failed"})).json()
        first = (await client.get("/v1/webhook-events", params={"limit": 1})).json()
        rest = (
            await client.get(
                "/v1/webhook-events", params={"limit": 1, "cursor": first["next_cursor"]}
            )
        ).json()
        bad_cursor = await client.get("/v1/webhook-events", params={"cursor": "nope"})
        detail = (await client.get(f"/v1/webhook-events/{failed}")).json()
        missing = await client.get("/v1/webhook-events/evt_nope")
        redelivered = await client.post(f"/v1/webhook-events/{failed}/redeliver")
        missing_redelivery = await client.post("/v1/webhook-events/evt_nope/redeliver")

    assert [e["id"] for e in listing["items"]] == [delivered, failed]  # newest first
    assert listing["next_cursor"] is None
    assert [e["id"] for e in only_failed["items"]] == [failed]
    assert [e["id"] for e in first["items"] + rest["items"]] == [delivered, failed]
    assert bad_cursor.status_code == 400
    assert bad_cursor.json()["error"] == "invalid_cursor"
    assert detail["status"] == "failed"
    assert detail["next_attempt_at"] is None
    assert detail["payload"]["id"] == failed
    assert detail["payload"]["data"]["connection"]["end_user_id"] == "ada"
    assert [(a["response_code"], a["outcome"]) for a in detail["delivery_attempts"]] == [
        (410, "failed")
    ]
    assert missing.status_code == 404
    assert missing.json()["error"] == "webhook_event_not_found"
    assert redelivered.status_code == 202
    assert redelivered.json()["status"] == "pending"
    assert redelivered.json()["next_attempt_at"] is not None
    assert missing_redelivery.status_code == 404


# --- demo mode --------------------------------------------------------------------


async def test_demo_mode_shows_delivered_events(database_url: str) -> None:
    """`pinauth serve --demo`: events go, signed, to the built-in receiver, which the
    demo page reads; nothing to set up."""
    port = free_port()
    settings, sandbox = demo_settings(make_settings(database_url), "127.0.0.1", port)
    app = create_app(settings, sandbox=sandbox)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    base = f"http://localhost:{port}"
    try:
        while not server.started:
            assert not serving.done()
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=base, timeout=30) as browser:
            login = await browser.get("/auth/login")
            params = parse_qs(urlsplit(login.headers["location"]).query)
            fields = {k: v[0] for k, v in params.items() if k != "response_type"}
            decision = await browser.post("/sandbox/oauth/", data=fields | {"decision": "allow"})
            callback = await browser.get(decision.headers["location"])
            assert callback.status_code == 303, callback.text
            dispatcher: WebhookDispatcher = app.state.webhook_dispatcher
            async with asyncio.timeout(30):
                while not (await browser.get("/demo/webhook-events")).json()["items"]:
                    dispatcher.pass_done.clear()
                    await dispatcher.pass_done.wait()
            [received] = (await browser.get("/demo/webhook-events")).json()["items"]
            forged = await browser.post(
                "/demo/webhooks", content=b"{}", headers={"Pinauth-Signature": "t=1,v1=00"}
            )
            page = await browser.get("/")
    finally:
        server.should_exit = True
        await serving

    assert received["type"] == "connection.created"
    assert received["connection"]["status"] == "active"
    assert forged.status_code == 400
    assert 'id="webhook-events"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text  # the page's one script is a file: CSP holds
    [event] = await outbox(settings)
    assert event.status is WebhookEventStatus.DELIVERED


def test_no_receiver_outside_demo_mode(settings: Settings) -> None:
    paths = {getattr(route, "path", None) for route in create_app(settings).routes}
    assert "/demo/webhooks" not in paths
    assert "/demo/webhook-events" not in paths


# --- crash safety: every way a connection becomes unusable reports once -----------


async def test_a_key_that_no_longer_decrypts_reports_once(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Tokens encrypted under a key that was then removed: the proxy answers 401 and the
    connection is marked and reported once, however many calls and replicas meet it."""
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        cookies = client.cookies
    other_key = make_settings(settings.database_url).encryption_keys
    rotated = settings.model_copy(update={"encryption_keys": other_key})
    boards = pinterest.get(f"{API}/boards").respond(200, json={"items": [], "bookmark": None})
    async with run_client(rotated, pinterest) as one, run_client(rotated, pinterest) as two:
        one.cookies = two.cookies = cookies
        answers = await asyncio.gather(
            *(replica.get("/pinterest/boards") for replica in (one, two, one, two))
        )
        me = (await one.get("/me")).json()

    assert {a.status_code for a in answers} == {401}
    assert {a.json()["error"] for a in answers} == {"reauthorization_required"}
    assert boards.call_count == 0
    assert me["status"] == "reauthorization_required"
    assert types_of(await outbox(settings)) == [
        "connection.created",
        "connection.reauthorization_required",
    ]


async def test_an_expired_refresh_token_reports_once_without_calling_pinterest(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        engine = create_engine(settings)
        try:
            async with create_sessionmaker(engine)() as db, db.begin():
                await db.execute(
                    update(Connection).values(
                        refresh_token_expires_at=datetime.now(UTC) - timedelta(seconds=1)
                    )
                )
        finally:
            await engine.dispose()
        token = pinterest.post(TOKEN_URL).respond(200, json={})
        first = await client.post("/auth/refresh")
        second = await client.post("/auth/refresh")

    assert first.json()["error"] == second.json()["error"] == "reauthorization_required"
    assert token.call_count == 0
    assert types_of(await outbox(settings)) == [
        "connection.created",
        "connection.reauthorization_required",
    ]


async def test_connections_cli_delete_reports_deleted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = create_engine(settings)
    try:
        connection = await add_events(create_sessionmaker(engine), NOW)
    finally:
        await engine.dispose()
    monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PINAUTH_ENCRYPTION_KEYS", settings.encryption_keys[0].get_secret_value())

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    deleted = await asyncio.to_thread(run, "connections", "delete", connection.public_id)
    again = await asyncio.to_thread(run, "connections", "delete", connection.public_id)

    assert deleted[0] == 0
    assert connection.public_id in deleted[1]
    assert again[0] == 2
    assert again[2] == f"pinauth: No connection has that id: '{connection.public_id}'.\n"
    [event] = await outbox(settings)
    assert event.type == "connection.deleted"
    assert event.connection_id == connection.public_id


async def test_a_late_write_over_a_rejection_reports_recovered(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """The scenario of `over_rejection` (test_durable_refresh): B reports the connection
    unusable; A's late write of the live pair makes it usable again, and says so."""
    settings_a = make_settings(database_url)
    settings_b = make_settings(database_url, encryption_keys=settings_a.encryption_keys[0])
    spent: list[str] = []

    async def token_endpoint(request: httpx.Request) -> httpx.Response:
        if REFRESH_1 in request.content.decode() and not spent:
            spent.append(REFRESH_1)
            await refuse_token_writes(database_url)
            return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))
        return httpx.Response(400, json={"code": 1, "message": "Invalid refresh token."})

    async with run_client(settings_b, pinterest) as b:
        async with run_client(settings_a, pinterest) as a:
            await log_in(a, pinterest)
            b.cookies.update(a.cookies)
            pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
            assert (await a.post("/auth/refresh")).status_code == 200
            await expire_refresh_leases(database_url)
            assert (await b.post("/auth/refresh")).status_code == 401
            await allow_token_writes(database_url)

    events = await outbox(settings_a)
    assert types_of(events) == [
        "connection.created",
        "connection.reauthorization_required",
        "connection.recovered",
    ]
    assert json.loads(events[-1].body)["data"]["connection"]["status"] == "active"


async def test_events_are_purged_30_days_after_their_last_possible_retry(
    settings: Settings,
) -> None:
    settings = hooked(settings)
    clock = Clock()
    async with dispatching(settings, lambda _: httpx.Response(200), clock) as (
        dispatcher,
        sessionmaker,
    ):
        await add_events(sessionmaker, clock.now, "connection.created", end_user_id="old")
        await dispatcher.run_once()
        await add_events(
            sessionmaker, clock.now + timedelta(days=2), "connection.created", end_user_id="new"
        )
        month_later = clock.now + timedelta(days=31, seconds=1)
        purged = await ExpiredRowPurger(sessionmaker, 60, clock=lambda: month_later).purge_once()

    assert purged.webhook_events == 1
    [kept] = await outbox(settings)
    assert json.loads(kept.body)["data"]["connection"]["end_user_id"] == "new"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PINAUTH_WEBHOOK_URL": "ftp://app.example/hooks"}, "is not an http(s) URL"),
        (
            {"PINAUTH_WEBHOOK_URL": "https://app.example/hooks", "PINAUTH_WEBHOOK_SECRETS": "x"},
            "secret #1 is shorter than 32 characters",
        ),
        (
            {"PINAUTH_WEBHOOK_URL": "https://app.example/hooks"},
            "PINAUTH_WEBHOOK_SECRETS is not",
        ),
    ],
)
def test_serve_refuses_bad_webhook_settings_in_one_line(
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name, value in {
        "PINTEREST_CLIENT_ID": "1234567",
        "PINTEREST_CLIENT_SECRET": "client-secret",
        "PINAUTH_SECRET_KEY": "s" * 40,
        "PINAUTH_ENCRYPTION_KEYS": make_settings("sqlite://").encryption_keys[0].get_secret_value(),
        "PINAUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'never.db'}",
        **env,
    }.items():
        monkeypatch.setenv(name, value)

    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "never.db").exists()  # refused before anything started


async def test_a_delivery_log_line_names_its_connection(settings: Settings) -> None:
    """Guards F7: a delivery's log line names the event's connection by its public id, in
    the message (the text format) and as the JSON format's connection_id field."""
    settings = hooked(settings)
    clock = Clock()
    async with dispatching(settings, lambda _: httpx.Response(500), clock) as (
        dispatcher,
        sessionmaker,
    ):
        connection = await add_events(sessionmaker, clock.now, "connection.created")
        with captured_logs(logging.WARNING) as logs:
            await dispatcher.run_once()

    [line] = events(logs, " retry (connection.created")
    assert line["connection_id"] == connection.public_id
    assert f"of connection {connection.public_id}" in line["event"]
