"""Pinterest's rate limits, respected across requests: the governor, retries, the token cooldown."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from pinauth.app import create_app
from pinauth.cache import MAX_ENTRIES
from pinauth.governor import DEFAULT_WAIT_SECONDS, RateGovernor
from pinauth.models import Connection
from pinauth.observability import Metrics
from pinauth.pinterest.client import UpstreamRequest, retry_after_seconds
from pinauth.pinterest.endpoints import CATEGORIES, OTHER
from pinauth.settings import Settings
from pinauth.tokens import TRANSIENT_FAILURE_COOLDOWN
from tests.helpers import ManualClock, connect_as

ADA = {"id": "549755885175", "username": "ada_pins", "account_type": "PINNER"}
BOB = {"id": "549755885176", "username": "bob_pins", "account_type": "PINNER"}
# Pinterest's own 429 (its spec's example, code 8).
PINTEREST_429 = {"code": 8, "message": "This request exceeded a rate limit."}
BOARDS: dict[str, object] = {"items": [], "bookmark": None}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def app(settings: Settings, pinterest: respx.MockRouter, clock: ManualClock) -> FastAPI:
    """The app on a clock the test moves (overrides conftest's `app`, so `client` uses it)."""
    return create_app(settings, transport=httpx.MockTransport(pinterest.async_handler), clock=clock)


@pytest.fixture
async def browsers(app: FastAPI) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Three browsers, each with its own cookies, on one running app."""
    async with LifespanManager(app) as manager:
        clients = [
            httpx.AsyncClient(
                transport=httpx.ASGITransport(manager.app), base_url="http://localhost:8000"
            )
            for _ in range(3)
        ]
        try:
            yield clients
        finally:
            for client in clients:
                await client.aclose()


def api(settings: Settings, path: str) -> str:
    return f"{settings.api_url}/{path}"


def assert_pinterest_429(response: httpx.Response) -> int:
    """A 429 exactly as Pinterest words one; returns its Retry-After."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"code", "message"}
    assert body["code"] == 8
    return int(response.headers["retry-after"])


# --- the governor, through the proxy ---------------------------------------------------


async def test_a_persistent_429_holds_that_connection_and_category_for_its_retry_after(
    browsers: list[httpx.AsyncClient],
    pinterest: respx.MockRouter,
    settings: Settings,
    clock: ManualClock,
) -> None:
    """Guards the governor itself: after Pinterest's 429 with Retry-After: 30, no call of
    that connection in that category (org_read: /pinterest/boards, /pinterest/user_account,
    /boards, from any of its browsers) reaches Pinterest for 30 s, each gets Pinterest's 429
    with a decreasing Retry-After, while its other categories and other connections go on;
    at 30 s the next call goes upstream again."""
    ada, ada_phone, bob = browsers
    ada_token = await connect_as(ada, pinterest, ADA)
    await connect_as(ada_phone, pinterest, ADA)
    await connect_as(bob, pinterest, BOB)
    limited = pinterest.get(
        api(settings, "boards"), headers={"Authorization": f"Bearer {ada_token}"}
    ).respond(429, json=PINTEREST_429, headers={"Retry-After": "30"})
    boards = pinterest.get(api(settings, "boards")).respond(200, json=BOARDS)
    account = pinterest.get(api(settings, "user_account")).respond(200, json=ADA)
    pins = pinterest.post(api(settings, "pins")).respond(201, json={"id": "1"})

    first = await ada.get("/pinterest/boards")
    assert first.status_code == 429
    assert first.json() == PINTEREST_429  # Pinterest's own answer, unchanged
    assert first.headers["retry-after"] == "30"

    retry_afters: list[list[int]] = []
    for _ in range(10):  # t = 0, 3, …, 27 s
        held = await asyncio.gather(
            ada.get("/pinterest/boards"),
            ada.get("/pinterest/boards", params={"page_size": "5"}),
            ada.get("/pinterest/user_account"),
            ada.get("/boards"),
            ada_phone.get("/pinterest/boards"),
        )
        retry_afters.append([assert_pinterest_429(response) for response in held])
        assert (await ada.post("/pinterest/pins", json={})).status_code == 201
        assert (await bob.get("/pinterest/boards")).status_code == 200
        clock.advance(3)

    assert limited.call_count == 1
    assert account.call_count == 0
    assert pins.call_count == 10  # org_write is not held
    assert boards.call_count == 10  # nor is another connection
    assert retry_afters == [[30 - 3 * step] * 5 for step in range(10)]

    again = await ada.get("/pinterest/boards")  # t = 30 s: the hold has ended
    assert limited.call_count == 2
    assert again.headers["retry-after"] == "30"


async def test_a_429_without_retry_after_holds_for_the_default_and_is_not_retried(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings, clock: ManualClock
) -> None:
    """Guards the default for Pinterest's frequent 429 without Retry-After: no retry inside
    the call (it would only count against the limit), then DEFAULT_WAIT_SECONDS of hold."""
    await connect_as(client, pinterest, ADA)
    route = pinterest.get(api(settings, "boards")).respond(429, json=PINTEREST_429)

    first = await client.get("/pinterest/boards")
    held = await client.get("/pinterest/boards")

    assert first.status_code == 429
    assert "retry-after" not in first.headers  # Pinterest's answer passes unchanged
    assert assert_pinterest_429(held) == DEFAULT_WAIT_SECONDS == 10
    assert route.call_count == 1
    clock.advance(DEFAULT_WAIT_SECONDS)
    await client.get("/pinterest/boards")
    assert route.call_count == 2


@pytest.mark.parametrize(
    ("headers", "governed"),
    [({"Retry-After": "30"}, True), ({}, False)],
    ids=["with-retry-after", "without-retry-after"],
)
async def test_a_503_is_governed_only_with_retry_after(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    headers: dict[str, str],
    governed: bool,
) -> None:
    """Guards which 503s hold a scope: one with Retry-After asks to wait and is governed
    like a 429; one without says nothing about when, so the next call still goes upstream."""
    await connect_as(client, pinterest, ADA)
    route = pinterest.post(api(settings, "pins")).respond(
        503, json={"code": 0, "message": "busy"}, headers=headers
    )

    first = await client.post("/pinterest/pins", json={})
    second = await client.post("/pinterest/pins", json={})

    assert first.status_code == 503
    if governed:
        assert assert_pinterest_429(second) == 30
        assert route.call_count == 1
    else:
        assert second.status_code == 503
        assert route.call_count == 2


async def test_a_past_retry_after_date_holds_briefly_not_zero(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings, clock: ManualClock
) -> None:
    """Guards the past-date rule: a Retry-After date already gone is a short jittered hold
    (1 to 3 s), not "come back now" for every caller at once."""
    await connect_as(client, pinterest, ADA)
    past = format_datetime(datetime.now(UTC) - timedelta(minutes=5), usegmt=True)
    route = pinterest.post(api(settings, "pins")).respond(
        429, json=PINTEREST_429, headers={"Retry-After": past}
    )

    await client.post("/pinterest/pins", json={})
    held = await client.post("/pinterest/pins", json={})

    assert 1 <= assert_pinterest_429(held) <= 3
    assert route.call_count == 1
    clock.advance(3)
    await client.post("/pinterest/pins", json={})
    assert route.call_count == 2


@pytest.mark.parametrize(
    "value",
    [b"\xb2", b"1" * 5000, b"Mon, 01 Jan 99999999999999999999999 00:00:00 GMT"],
    ids=["superscript-two", "5000-digits", "overflowing-date"],
)
async def test_an_unreadable_retry_after_holds_for_the_default_not_a_500(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    clock: ManualClock,
    value: bytes,
) -> None:
    """Guards the parser against what str.isdigit() lets through ("²", the Latin-1 byte
    0xB2, is a digit to it but not to float()): Pinterest's 429 is relayed, and the hold
    is the default one, as for a 429 without Retry-After."""
    await connect_as(client, pinterest, ADA)
    route = pinterest.get(api(settings, "boards")).respond(
        429, json=PINTEREST_429, headers=[(b"Retry-After", value)]
    )

    first = await client.get("/pinterest/boards")
    held = await client.get("/pinterest/boards")

    assert first.status_code == 429, first.text
    assert first.json() == PINTEREST_429
    assert assert_pinterest_429(held) == DEFAULT_WAIT_SECONDS
    assert route.call_count == 1


def test_retry_after_in_the_past_is_a_short_jittered_delay() -> None:
    """Guards the parser every Retry-After goes through: a past date is 1 to 3 s, jittered."""
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    delays = {
        retry_after_seconds(httpx.Response(429, headers={"Retry-After": past})) for _ in range(20)
    }
    assert all(delay is not None and 1 <= delay <= 3 for delay in delays)
    assert len(delays) > 1


# --- retries inside one call ---------------------------------------------------------


async def test_a_429_is_retried_at_most_once_inside_a_call(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards the retry cap: under a persistent 429 one client call makes at most two
    upstream calls (it made three), even though PINAUTH_MAX_RETRIES is 2."""
    await connect_as(client, pinterest, ADA)
    route = pinterest.get(api(settings, "boards")).respond(
        429, json=PINTEREST_429, headers={"Retry-After": "0"}
    )

    response = await client.get("/pinterest/boards")

    assert response.status_code == 429
    assert route.call_count == 2


async def test_the_hold_starts_when_the_429_arrives_not_after_the_calls_own_retry(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards the order: a call that waits out a short Retry-After before its one retry
    has already put the scope on hold, so calls arriving meanwhile do not reach Pinterest."""
    await connect_as(client, pinterest, ADA)
    first_answered = asyncio.Event()
    answers = iter(
        [
            httpx.Response(429, json=PINTEREST_429, headers={"Retry-After": "1"}),
            httpx.Response(200, json=BOARDS),
        ]
    )

    def pinterest_answers(_request: httpx.Request) -> httpx.Response:
        first_answered.set()
        return next(answers)

    route = pinterest.get(api(settings, "boards")).mock(side_effect=pinterest_answers)

    waiting = asyncio.create_task(client.get("/pinterest/boards"))
    await first_answered.wait()
    meanwhile = await client.get("/pinterest/user_account")  # same category, org_read

    assert assert_pinterest_429(meanwhile) == 1
    assert (await waiting).status_code == 200  # its own retry, after the Retry-After
    assert route.call_count == 2


# --- metrics -----------------------------------------------------------------------------


async def test_metrics_count_upstream_429s_and_governed_calls_by_category_only(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards the metrics: Pinterest's 429s and pinauth's own, counted per rate-limit
    category, with labels from the spec's fixed set (an unknown path is `other`, never
    the path itself)."""
    await connect_as(client, pinterest, ADA)
    pinterest.get(api(settings, "boards")).respond(
        429, json=PINTEREST_429, headers={"Retry-After": "60"}
    )
    pinterest.get(api(settings, "no_such_thing/8123")).respond(
        429, json=PINTEREST_429, headers={"Retry-After": "60"}
    )
    for _ in range(4):
        await client.get("/pinterest/boards")
    for _ in range(2):
        await client.get("/pinterest/no_such_thing/8123")

    text = (await client.get("/metrics")).text

    assert 'pinauth_upstream_rate_limits_total{category="org_read",status="429"} 1.0' in text
    assert 'pinauth_governed_calls_total{category="org_read"} 3.0' in text
    assert 'pinauth_upstream_rate_limits_total{category="other",status="429"} 1.0' in text
    assert 'pinauth_governed_calls_total{category="other"} 1.0' in text
    series = r'^pinauth_(?:governed_calls|upstream_rate_limits)_total\{category="([^"]*)"'
    labels = set(re.findall(series, text, re.MULTILINE))
    assert labels == CATEGORIES | {OTHER}


# --- the governor's memory ---------------------------------------------------------------


def connection(connection_id: int, pinterest_user_id: str) -> Connection:
    return Connection(
        id=connection_id,
        public_id=f"conn_{connection_id}_{pinterest_user_id}",
        pinterest_user_id=pinterest_user_id,
    )


BOARDS_CALL = UpstreamRequest("GET", "boards")


def test_a_hold_is_not_inherited_by_a_new_connection_reusing_an_id() -> None:
    """Guards the key: a new connection that got a deleted row's integer id (as SQLite did
    before AUTOINCREMENT) must not inherit the old one's hold; its public id differs."""
    governor = RateGovernor(Metrics(), clock=ManualClock())
    governor.pinterest_asked_to_wait(connection(7, "ada"), BOARDS_CALL, 429, 30)

    assert governor.held(connection(7, "ada"), BOARDS_CALL) is not None
    assert governor.held(connection(7, "someone-else"), BOARDS_CALL) is None


def test_the_hold_log_line_names_the_connection_by_its_public_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards the log line: it names the connection as the API and every other log line
    do (conn_…), never by the internal row id."""
    governor = RateGovernor(Metrics(), clock=ManualClock())
    with caplog.at_level(logging.INFO, logger="pinauth.governor"):
        governor.pinterest_asked_to_wait(connection(7, "ada"), BOARDS_CALL, 429, 30)

    (record,) = [r for r in caplog.records if r.name == "pinauth.governor"]
    assert "connection conn_7_ada's GET call" in record.getMessage()
    assert isinstance(record.args, tuple)
    assert 7 not in record.args


def test_the_later_end_wins_when_answers_arrive_out_of_order() -> None:
    """Guards concurrent answers: a shorter Retry-After arriving after a longer one (calls
    sent together, answered in any order) does not cut the longer hold short."""
    clock = ManualClock()
    governor = RateGovernor(Metrics(), clock=clock)
    ada = connection(1, "ada")
    governor.pinterest_asked_to_wait(ada, BOARDS_CALL, 429, 30)
    governor.pinterest_asked_to_wait(ada, BOARDS_CALL, 429, 5)

    clock.advance(10)
    held = governor.held(ada, BOARDS_CALL)
    assert held is not None
    assert held.headers["retry-after"] == "20"


def test_a_hold_lasts_at_most_an_hour() -> None:
    """Guards against a mistaken Retry-After: a hold ends after an hour at most, and then
    one call finds out whether the limit still holds."""
    clock = ManualClock()
    governor = RateGovernor(Metrics(), clock=clock)
    ada = connection(1, "ada")
    governor.pinterest_asked_to_wait(ada, BOARDS_CALL, 429, 10**9)

    held = governor.held(ada, BOARDS_CALL)
    assert held is not None
    assert held.headers["retry-after"] == "3600"
    clock.advance(3600)
    assert governor.held(ada, BOARDS_CALL) is None


def test_holds_are_bounded_and_dropped_once_ended() -> None:
    """Guards memory: at most MAX_ENTRIES connections are remembered (the least recently
    used go first), and every entry is released once the last hold has ended."""
    clock = ManualClock()
    governor = RateGovernor(Metrics(), clock=clock)
    for n in range(MAX_ENTRIES + 1):
        governor.pinterest_asked_to_wait(connection(n, str(n)), BOARDS_CALL, 429, 30)

    assert governor.remembered_connections() == MAX_ENTRIES
    assert governor.held(connection(0, "0"), BOARDS_CALL) is None  # evicted
    assert governor.held(connection(MAX_ENTRIES, str(MAX_ENTRIES)), BOARDS_CALL) is not None

    clock.advance(30)
    governor.pinterest_asked_to_wait(connection(1, "1"), BOARDS_CALL, 429, 30)
    assert governor.remembered_connections() == 1


# --- the token endpoint's cooldown -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (503, "30", 30),
        (429, "30", 30),
        (503, "in 30 s", 30),
        (503, "3", TRANSIENT_FAILURE_COOLDOWN),
        (429, "past", TRANSIENT_FAILURE_COOLDOWN),
    ],
)
async def test_the_token_endpoints_cooldown_honours_retry_after_at_least_10_s(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    status: int,
    retry_after: str,
    expected: int,
) -> None:
    """Guards the token endpoint's cooldown: as long as Pinterest's Retry-After asks (in
    seconds or as a date), never under 10 s (a past date included), and no second token
    request meanwhile."""
    await connect_as(client, pinterest, ADA)
    if retry_after == "past":
        retry_after = format_datetime(datetime.now(UTC) - timedelta(minutes=1), usegmt=True)
    elif retry_after == "in 30 s":
        retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    route = pinterest.post(settings.token_url).respond(
        status, json={"code": 0, "message": "busy"}, headers={"Retry-After": retry_after}
    )

    first = await client.post("/auth/refresh")
    second = await client.post("/auth/refresh")

    assert first.status_code == second.status_code == 503
    assert first.headers["retry-after"] == str(expected)
    assert int(second.headers["retry-after"]) in (expected - 1, expected)
    assert route.call_count == 1
