"""A connect session's login counts only once the app's backend confirms it (issue 18.1).

A `connect_url` is a bearer link: whoever completes it picks the Pinterest account. The
attack: an attacker presses the app's own "Connect Pinterest" button, sends the link to a
victim, the victim approves, and the attacker's end user would hold the victim's
Pinterest. Now the login only makes a pending connection and a one-time result, which the
app's backend confirms for the end user logged in to it (POST /v1/connections/confirm).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from pydantic import ValidationError
from sqlalchemy import select, update

from pinauth.db import create_engine, create_sessionmaker
from pinauth.housekeeping import ExpiredRowPurger
from pinauth.models import ConnectionStatus, ConnectResult
from pinauth.repository import KeeperRepository
from pinauth.settings import Settings
from tests.helpers import (
    API,
    TOKEN_URL,
    bearers,
    browsers,
    complete_connect_link,
    connect_end_user,
    count_rows,
    create_api_key,
    log_in_as,
    make_settings,
    outbox_types,
    stored_connections,
    token_json,
)

ATTACKER_ACCOUNT = {"id": "549755800001", "username": "mallory_pins"}
VICTIM_ACCOUNT = {"id": "549755800002", "username": "victim_pins"}
CONFIRM = "/v1/connections/confirm"


@asynccontextmanager
async def backend_and_browsers(
    settings: Settings, pinterest: respx.MockRouter, count: int
) -> AsyncIterator[list[httpx.AsyncClient]]:
    key = await create_api_key(settings)
    async with browsers(settings, pinterest, count + 1) as clients:
        clients[0].headers["Authorization"] = f"Bearer {key}"
        yield clients


async def confirm(backend: httpx.AsyncClient, result: str, end_user_id: str) -> httpx.Response:
    return await backend.post(CONFIRM, json={"result": result, "end_user_id": end_user_id})


async def expire_results(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            await db.execute(
                update(ConnectResult).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
    finally:
        await engine.dispose()


async def test_the_attack_is_refused_and_nothing_is_kept(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """The link is minted for the attacker's end user and completed in the victim's
    browser with the victim's Pinterest account; the app confirms for the end user logged
    in there (the victim's): 403, and neither end user holds anything. The victim's own
    pinauth session (a browser-only login from before) is untouched throughout.

    Guards: the pending status (listed, proxied, minted for, sent as webhook before
    confirmation), no session on a connect login, and the mismatch's delete."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, victim]:
        await log_in_as(victim, pinterest, VICTIM_ACCOUNT, "pina_VICTIM_OWN", "pinr_V")
        own_cookie = victim.cookies["pinauth_session"]
        own_connection = (await victim.get("/me")).json()["connection_id"]
        events_before = await outbox_types(settings)

        result = await complete_connect_link(
            backend, victim, pinterest, "attacker", VICTIM_ACCOUNT, "pina_STOLEN", "pinr_STOLEN"
        )

        # Between the callback and any confirmation: nothing anyone can use.
        pending = (await backend.get("/v1/connections", params={"status": "pending"})).json()
        (pending_id,) = [c["id"] for c in pending["items"]]
        listed = (await backend.get("/v1/connections")).json()
        of_attacker = (await backend.get("/v1/connections?end_user_id=attacker")).json()
        upstream = pinterest.route(host="api.pinterest.com").respond(200, json={"items": []})
        proxied = await backend.get(
            "/pinterest/boards", headers={"Pinauth-Connection-Id": pending_id}
        )
        proxy_token = await backend.post(f"/v1/connections/{pending_id}/proxy-tokens", json={})
        events_pending = await outbox_types(settings)
        me_between = (await victim.get("/me")).json()
        cookie_between = victim.cookies["pinauth_session"]

        # The victim's browser lands on the app, where the victim is logged in.
        refused = await confirm(backend, result, "victim_user")
        replayed = await confirm(backend, result, "attacker")
        after_pending = (await backend.get("/v1/connections?status=pending")).json()
        after_attacker = (await backend.get("/v1/connections?end_user_id=attacker")).json()
        me_after = (await victim.get("/me")).json()
        stored = await stored_connections(settings)
        results_left = await count_rows(settings.database_url, "connect_results")

    assert pending["items"][0]["status"] == "pending"
    assert pending["items"][0]["end_user_id"] == "attacker"
    assert [c["id"] for c in listed["items"]] == [own_connection]
    assert of_attacker["items"] == []
    assert proxied.status_code == 404
    assert proxied.json()["error"] == "connection_not_found"
    assert proxy_token.status_code == 404
    assert upstream.call_count == 0
    assert events_pending == events_before  # no webhook for a pending connection
    assert me_between["connection_id"] == own_connection
    assert cookie_between == own_cookie  # no new session, the old one not replaced

    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "connect_result_mismatch"
    assert replayed.status_code == 400
    assert replayed.json()["error"] == "invalid_connect_result"
    assert after_pending["items"] == []
    assert after_attacker["items"] == []
    assert set(stored) == {own_connection}  # the pending row and its tokens are gone
    assert stored[own_connection]["access"] == "pina_VICTIM_OWN"
    assert results_left == 0
    assert me_after["connection_id"] == own_connection
    assert await outbox_types(settings) == events_before


async def test_the_honest_path_confirms_and_then_serves(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Confirmed for its own end user: 200 with the connection, now active, listed,
    proxied, given proxy tokens, and `connection.created` recorded with the change."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        result = await complete_connect_link(
            backend, browser, pinterest, "u42", VICTIM_ACCOUNT, "pina_MINE", "pinr_MINE"
        )
        cookie_jar = dict(browser.cookies)
        confirmed = await confirm(backend, result, "u42")
        again = await confirm(backend, result, "u42")
        connection_id = confirmed.json()["id"]
        listed = (await backend.get("/v1/connections?end_user_id=u42")).json()
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        proxied = await backend.get(
            "/pinterest/boards", headers={"Pinauth-Connection-Id": connection_id}
        )
        token = await backend.post(f"/v1/connections/{connection_id}/proxy-tokens", json={})

    assert "pinauth_session" not in cookie_jar  # a connect login gives the browser no session
    assert confirmed.status_code == 200, confirmed.text
    body = confirmed.json()
    assert body["status"] == "active"
    assert body["end_user_id"] == "u42"
    assert body["pinterest_user_id"] == VICTIM_ACCOUNT["id"]
    assert "pina_MINE" not in confirmed.text
    assert "pinr_MINE" not in confirmed.text
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_connect_result"
    assert [c["id"] for c in listed["items"]] == [connection_id]
    assert proxied.status_code == 200
    assert bearers(boards) == ["Bearer pina_MINE"]
    assert token.status_code == 201
    assert await outbox_types(settings) == [("connection.created", connection_id)]


@pytest.mark.parametrize("problem", ["unknown", "malformed", "used", "expired", "empty_prefix"])
async def test_unusable_results_are_400_invalid_connect_result(
    settings: Settings, pinterest: respx.MockRouter, problem: str
) -> None:
    """Guards single use and expiry. An unusable result changes nothing: the pending
    connection stays pending (for housekeeping), and a mismatch can still be reported."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        result = await complete_connect_link(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_X", "pinr_X"
        )
        sent = result
        if problem == "unknown":
            sent = "pinauth_cr_" + "A" * 43
        elif problem == "malformed":
            sent = "../" + result
        elif problem == "empty_prefix":
            sent = "pinauth_cr_"
        elif problem == "used":
            assert (await confirm(backend, result, "u")).status_code == 200
        elif problem == "expired":
            await expire_results(settings)
        response = await confirm(backend, sent, "u")

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_connect_result"


async def test_the_result_carries_at_least_128_random_bits_and_is_stored_hashed(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 2) as [backend, one, two]:
        first = await complete_connect_link(
            backend, one, pinterest, "u", VICTIM_ACCOUNT, "pina_1", "pinr_1"
        )
        second = await complete_connect_link(
            backend, two, pinterest, "u", ATTACKER_ACCOUNT, "pina_2", "pinr_2"
        )
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            rows = (await db.execute(ConnectResult.__table__.select())).mappings().all()
    finally:
        await engine.dispose()

    assert first != second
    for result in (first, second):
        assert result.startswith("pinauth_cr_")
        assert len(result) - len("pinauth_cr_") >= 22  # base64url: 6 bits a character
    stored = " ".join(str(value) for row in rows for value in row.values())
    assert first not in stored
    assert second not in stored
    assert first.removeprefix("pinauth_cr_") not in stored


async def test_a_reconnect_changes_nothing_until_confirmed(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """The existing connection keeps serving its old tokens while a reconnect waits;
    confirmed, the new ones replace them in place (same id, `connection.updated`).
    Guards: tokens staged in the result instead of written onto the row."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        conn = await connect_end_user(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_OLD", "pinr_OLD"
        )
        before = (await stored_connections(settings))[conn]
        result = await complete_connect_link(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_NEW", "pinr_NEW"
        )
        between = (await stored_connections(settings))[conn]
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": conn})
        confirmed = await confirm(backend, result, "u")
        await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": conn})
        after = (await stored_connections(settings))[conn]

    assert between["access"] == "pina_OLD"
    assert between["refresh"] == "pinr_OLD"
    assert between["version"] == before["version"]
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["id"] == conn
    assert (after["access"], after["refresh"]) == ("pina_NEW", "pinr_NEW")
    assert bearers(boards) == ["Bearer pina_OLD", "Bearer pina_NEW"]
    assert await outbox_types(settings) == [
        ("connection.created", conn),
        ("connection.updated", conn),
    ]


async def test_a_refused_reconnect_keeps_the_connection_as_it_was(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """A reconnect link of end user `u` completed by someone else's Pinterest session is
    the same account only if it is; here the result is confirmed for another end user:
    403, the waiting tokens are dropped, the connection is exactly as it was."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        conn = await connect_end_user(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_OLD", "pinr_OLD"
        )
        before = (await stored_connections(settings))[conn]
        result = await complete_connect_link(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_NEW", "pinr_NEW"
        )
        refused = await confirm(backend, result, "someone_else")
        after = (await stored_connections(settings))[conn]
        results_left = await count_rows(settings.database_url, "connect_results")

    assert refused.status_code == 403
    assert refused.json()["error"] == "connect_result_mismatch"
    assert after == before
    assert results_left == 0
    assert await outbox_types(settings) == [("connection.created", conn)]


async def test_two_pending_attempts_for_one_pair_do_not_fail(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the unique (end_user_id, pinterest_user_id) index: two links of one end user
    completed with one account, one after the other and then both at once, each come
    back with a result; confirming them makes one connection, created once."""
    async with backend_and_browsers(settings, pinterest, 3) as [backend, *clients]:
        results = [
            await complete_connect_link(
                backend, clients[0], pinterest, "u", VICTIM_ACCOUNT, "pina_1", "pinr_1"
            )
        ]
        # Two callbacks at once, each past its token exchange before either stores.
        states = []
        for browser in clients[1:]:
            minted = await backend.post("/v1/connect-sessions", json={"end_user_id": "u"})
            login = await browser.get(minted.json()["connect_url"])
            states.append(parse_qs(urlsplit(login.headers["location"]).query)["state"][0])
        both_asked = asyncio.Barrier(2)

        async def token_endpoint(request: httpx.Request) -> httpx.Response:
            await both_asked.wait()
            return httpx.Response(200, json=token_json("pina_2", "pinr_2"))

        pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        pinterest.get(f"{API}/user_account").respond(200, json=VICTIM_ACCOUNT)
        callbacks = await asyncio.gather(
            *(
                browser.get("/auth/callback", params={"code": "c", "state": state})
                for browser, state in zip(clients[1:], states, strict=True)
            )
        )
        for callback in callbacks:
            assert callback.status_code == 303, callback.text
            location = parse_qs(urlsplit(callback.headers["location"]).query)
            results.append(location["pinauth_connect_result"][0])
        pending = (await backend.get("/v1/connections?status=pending")).json()["items"]
        answers = [await confirm(backend, result, "u") for result in results]

    assert len(pending) == 1
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert {a.json()["id"] for a in answers} == {pending[0]["id"]}
    assert await outbox_types(settings) == [("connection.created", pending[0]["id"])]


async def test_housekeeping_deletes_unconfirmed_connections_with_their_tokens(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the purge: past PINAUTH_CONNECT_RESULT_TTL a pending connection nobody
    confirmed goes (tokens and all), and so does a reconnect's waiting token set; a
    confirmed connection, and a pending one whose result is still live, stay."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        kept = await connect_end_user(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_K", "pinr_K"
        )
        await complete_connect_link(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_R", "pinr_R"
        )
        await complete_connect_link(
            backend, browser, pinterest, "v", ATTACKER_ACCOUNT, "pina_P", "pinr_P"
        )
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as db:
            expiries = list((await db.execute(select(ConnectResult.expires_at))).scalars())
        early = min(expiries) - timedelta(seconds=1)
        late = max(expiries)  # expired at that very moment
        purged_early = await ExpiredRowPurger(sessionmaker, 60, clock=lambda: early).purge_once()
        pending_early = await count_rows(settings.database_url, "connections", "status='pending'")
        purged_late = await ExpiredRowPurger(sessionmaker, 60, clock=lambda: late).purge_once()
    finally:
        await engine.dispose()
    stored = await stored_connections(settings)

    assert (purged_early.pending_connections, purged_early.connect_results) == (0, 0)
    assert pending_early == 1
    # The pending connection's result went with it; the reconnect's expired on its own.
    assert (purged_late.pending_connections, purged_late.connect_results) == (1, 1)
    assert set(stored) == {kept}
    assert stored[kept]["access"] == "pina_K"
    assert await count_rows(settings.database_url, "connect_results") == 0


async def test_the_keeper_never_takes_a_pending_connection(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Whatever its refresh token's expiry, a pending connection is nobody's to keep."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        await complete_connect_link(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_P", "pinr_P"
        )
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            now = datetime.now(UTC)
            horizon = now + timedelta(days=3650)
            claimed = await KeeperRepository(db).claim_due(
                now, horizon, now + timedelta(minutes=5), 100
            )
            soonest = await KeeperRepository(db).soonest(100)
    finally:
        await engine.dispose()
    (stored,) = (await stored_connections(settings)).values()
    assert stored["status"] == ConnectionStatus.PENDING
    assert claimed == []
    assert soonest == []


async def test_completing_a_link_leaves_the_browser_s_own_session_and_connection(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the old behaviour that moved the browser's session onto the link's
    connection and ended its previous session: neither happens now, and the browser's
    own connection keeps its tokens."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        await log_in_as(browser, pinterest, VICTIM_ACCOUNT, "pina_OWN", "pinr_OWN")
        cookie = browser.cookies["pinauth_session"]
        before = (await browser.get("/me")).json()
        await complete_connect_link(
            backend, browser, pinterest, "attacker", ATTACKER_ACCOUNT, "pina_A", "pinr_A"
        )
        # The old cookie, presented explicitly: still this browser's own session.
        browser.cookies.clear()
        browser.cookies.set("pinauth_session", cookie)
        after = await browser.get("/me")
        sessions = await count_rows(settings.database_url, "sessions")
        stored = await stored_connections(settings)

    assert after.status_code == 200
    assert after.json() == before
    assert sessions == 1
    assert stored[before["connection_id"]]["access"] == "pina_OWN"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"end_user_id": "u"}, "result"),
        ({"result": "pinauth_cr_x"}, "end_user_id"),
        ({"result": "pinauth_cr_x", "end_user_id": ""}, "end_user_id"),
        ({"result": "x" * 257, "end_user_id": "u"}, "result"),
        ({"result": "pinauth_cr_x", "end_user_id": "u", "extra": 1}, "extra"),
    ],
)
async def test_bad_confirm_requests_name_the_field(
    settings: Settings, pinterest: respx.MockRouter, body: dict[str, Any], field: str
) -> None:
    async with backend_and_browsers(settings, pinterest, 0) as [backend]:
        response = await backend.post(CONFIRM, json=body)
        no_key = await backend.post(
            CONFIRM,
            json={"result": "pinauth_cr_x", "end_user_id": "u"},
            headers={"Authorization": ""},
        )
    assert response.status_code == 422
    assert field in response.json()["message"]
    assert no_key.status_code == 401


async def test_results_live_pinauth_connect_result_ttl_seconds(
    database_url: str, pinterest: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PINAUTH_CONNECT_RESULT_TTL (default 600) is how long a result can be confirmed."""
    assert make_settings(database_url).connect_result_ttl_seconds == 600
    for refused in ("0", "-5", "86401", "ten"):
        monkeypatch.setenv("PINAUTH_CONNECT_RESULT_TTL", refused)
        with pytest.raises(ValidationError, match=r"CONNECT_RESULT_TTL"):
            make_settings(database_url)
    monkeypatch.setenv("PINAUTH_CONNECT_RESULT_TTL", "120")
    settings = make_settings(database_url)
    assert settings.connect_result_ttl_seconds == 120
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        started = datetime.now(UTC)
        await complete_connect_link(backend, browser, pinterest, "u", VICTIM_ACCOUNT, "a", "r")
        finished = datetime.now(UTC)
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            (expires_at,) = (await db.execute(select(ConnectResult.expires_at))).scalars()
    finally:
        await engine.dispose()
    assert started + timedelta(seconds=120) <= expires_at <= finished + timedelta(seconds=120)


async def test_deleting_a_pending_connection_sends_no_webhook(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """The app never heard of it (no connection.created), so no connection.deleted."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        result = await complete_connect_link(
            backend, browser, pinterest, "u", VICTIM_ACCOUNT, "pina_P", "pinr_P"
        )
        (pending,) = (await backend.get("/v1/connections?status=pending")).json()["items"]
        shown = await backend.get(f"/v1/connections/{pending['id']}")
        deleted = await backend.delete(f"/v1/connections/{pending['id']}")
        confirmed = await confirm(backend, result, "u")

    assert shown.json()["status"] == "pending"
    assert deleted.status_code == 204
    assert confirmed.status_code == 400  # its result went with it
    assert await outbox_types(settings) == []


def test_docs_show_the_confirm_route_and_its_answers(settings: Settings) -> None:
    """/docs (the OpenAPI document) shows the route with its 200, 400 and 403."""
    from pinauth.app import create_app

    document = create_app(settings).openapi()
    route = document["paths"]["/v1/connections/confirm"]["post"]
    responses = route["responses"]
    body = route["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    examples = {
        status: set(responses[status]["content"]["application/json"]["examples"])
        for status in ("400", "403")
    }
    assert route["security"] == [{"apiKey": []}]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ConnectionObject"
    )
    assert "invalid_connect_result" in examples["400"]
    assert "connect_result_mismatch" in examples["403"]
    assert set(document["components"]["schemas"][body.rsplit("/", 1)[1]]["required"]) == {
        "result",
        "end_user_id",
    }
    statuses = document["components"]["schemas"]["ConnectionStatus"]["enum"]
    assert "pending" in statuses
