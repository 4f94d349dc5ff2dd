"""The app's backend as a client (issue 10): API keys, connect sessions, the connections
API and the proxy for servers."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
import respx
from sqlalchemy import update

from pinauth.api.deps import CONNECTION_ID_HEADER
from pinauth.apikeys import ApiKeyService
from pinauth.auth import SESSION_COOKIE
from pinauth.cli import main
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import InvalidApiKey
from pinauth.models import ConnectSession
from pinauth.settings import Settings
from tests.helpers import (
    API,
    TOKEN_URL,
    ManualClock,
    bearers,
    browsers,
    connect_end_user,
    create_api_key,
    log_in_as,
    make_settings,
    start_login,
    token_json,
)

ADA = {"id": "549755885175", "username": "ada_pins", "account_type": "PINNER"}
GRACE = {"id": "549755885999", "username": "grace_pins", "account_type": "BUSINESS"}


@asynccontextmanager
async def backend_and_browsers(
    settings: Settings, pinterest: respx.MockRouter, count: int = 2, key_name: str = "backend"
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """The app's backend (holding an API key) and `count` browsers, on one app."""
    key = await create_api_key(settings, key_name)
    async with browsers(settings, pinterest, count + 1) as clients:
        clients[0].headers["Authorization"] = f"Bearer {key}"
        yield clients


async def set_expiry(settings: Settings, when: datetime) -> None:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            await db.execute(update(ConnectSession).values(expires_at=when))
    finally:
        await engine.dispose()


# --- API keys ---------------------------------------------------------------------


def test_api_keys_cli_create_list_revoke(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key is printed once, alone on the last line; listings never show it."""
    monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PINAUTH_SECRET_KEY", settings.secret_key.get_secret_value())
    monkeypatch.setenv("PINAUTH_ENCRYPTION_KEYS", settings.encryption_keys[0].get_secret_value())

    assert main(["api-keys", "create", "--name", "nightly-job"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert main(["api-keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert main(["api-keys", "create", "--name", "nightly-job"]) == 2  # names are unique
    assert "exists already" in capsys.readouterr().err
    assert main(["api-keys", "revoke", "nightly-job"]) == 0
    assert main(["api-keys", "revoke", "nightly-job"]) == 2

    assert key.startswith("pinauth_sk_")
    assert len(key) == len("pinauth_sk_") + 43  # 256 random bits
    assert "nightly-job" in listing
    assert key[:17] in listing
    assert key not in listing
    assert "never" in listing  # not used yet


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer pinauth_sk_tooshort",
        "Bearer pinauth_sk_" + "A" * 43,  # well-formed, unknown
        "Bearer not-a-pinauth-key-at-all-but-the-right-length-0000000000",
    ],
)
async def test_v1_refuses_anything_but_a_valid_api_key(
    settings: Settings, pinterest: respx.MockRouter, authorization: str | None
) -> None:
    """Guards the API-key check on every /v1 route: 401 invalid_api_key. A real key
    exists, so a lookup that stopped comparing hashes would accept the unknown one."""
    await create_api_key(settings)
    async with browsers(settings, pinterest, 1) as [client]:
        if authorization:
            client.headers["Authorization"] = authorization
        for method, path in [
            ("GET", "/v1/connections"),
            ("GET", "/v1/connections/conn_x"),
            ("DELETE", "/v1/connections/conn_x"),
            ("POST", "/v1/connect-sessions"),
        ]:
            response = await client.request(method, path, json={"end_user_id": "u"})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"] == "invalid_api_key"


async def test_a_valid_key_counts_only_as_a_bearer_header(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the `Bearer` scheme check and that there is no other way to present a key:
    a valid key sent as `Basic`, as `?api_key=` or as a cookie is 401, on /v1 and on the
    proxy, while the same key as `Bearer` works."""
    key = await create_api_key(settings)
    as_basic = base64.b64encode(f"{key}:".encode()).decode()
    wrong_ways: dict[str, dict[str, dict[str, str]]] = {
        "basic": {"headers": {"Authorization": f"Basic {key}"}},
        "basic, base64": {"headers": {"Authorization": f"Basic {as_basic}"}},
        "query": {"params": {"api_key": key}},
        "cookie": {"headers": {"Cookie": f"api_key={key}"}},
        "session cookie": {"headers": {"Cookie": f"{SESSION_COOKIE}={key}"}},
    }
    named = {CONNECTION_ID_HEADER: "conn_x"}
    async with browsers(settings, pinterest, 1) as [client]:
        listed = await client.get("/v1/connections", headers={"Authorization": f"Bearer {key}"})
        proxied = await client.get(
            "/pinterest/user_account", headers={"Authorization": f"Bearer {key}"} | named
        )
        refused = {}
        for how, sent in wrong_ways.items():
            headers = sent.get("headers", {})
            params = sent.get("params", {})
            refused[how, "v1"] = await client.get("/v1/connections", headers=headers, params=params)
            refused[how, "proxy"] = await client.get(
                "/pinterest/user_account", headers=headers | named, params=params
            )

    assert listed.status_code == 200
    assert proxied.status_code == 404  # the key was accepted; the connection is unknown
    assert proxied.json()["error"] == "connection_not_found"
    for (how, where), response in refused.items():
        assert response.status_code == 401, (how, where, response.text)
        expected = "invalid_api_key" if where == "v1" or how.startswith("basic") else None
        assert expected is None or response.json()["error"] == expected, (how, where)


async def test_a_key_revoked_elsewhere_is_refused_once_the_cache_ttl_has_passed(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the expiry of the verified-key cache: `pinauth api-keys revoke` (another
    process) ends the key here within PINAUTH_CACHE_TTL, on a clock the test moves."""
    settings = make_settings(database_url, cache_ttl_seconds=30)
    monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PINAUTH_SECRET_KEY", settings.secret_key.get_secret_value())
    monkeypatch.setenv("PINAUTH_ENCRYPTION_KEYS", settings.encryption_keys[0].get_secret_value())
    key = await create_api_key(settings)
    clock = ManualClock()
    engine = create_engine(settings)
    try:
        service = ApiKeyService(
            create_sessionmaker(engine), settings.cache_ttl_seconds, clock=clock
        )
        await service.authenticate(key)  # verified, and cached
        assert await asyncio.to_thread(main, ["api-keys", "revoke", "backend"]) == 0
        clock.advance(settings.cache_ttl_seconds - 1)
        await service.authenticate(key)  # still cached: within the TTL
        clock.advance(2)
        with pytest.raises(InvalidApiKey) as refused:
            await service.authenticate(key)
        await service.aclose()
    finally:
        await engine.dispose()
    assert refused.value.status_code == 401


async def test_a_revoked_key_stops_working(
    database_url: str, pinterest: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards revocation: `pinauth api-keys revoke` (another process) ends the key once
    the service's cache of verified keys expires (here at once: PINAUTH_CACHE_TTL=0)."""
    settings = make_settings(database_url, cache_ttl_seconds=0)
    monkeypatch.setenv("PINAUTH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PINAUTH_SECRET_KEY", settings.secret_key.get_secret_value())
    monkeypatch.setenv("PINAUTH_ENCRYPTION_KEYS", settings.encryption_keys[0].get_secret_value())
    async with backend_and_browsers(settings, pinterest, 0) as [backend]:
        before = await backend.get("/v1/connections")
        assert await asyncio.to_thread(main, ["api-keys", "revoke", "backend"]) == 0
        after = await backend.get("/v1/connections")
    assert before.status_code == 200
    assert after.status_code == 401
    assert after.json()["error"] == "invalid_api_key"


async def test_a_session_cookie_is_never_accepted_on_v1(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the credential split: browsers cannot use the backend's API."""
    async with browsers(settings, pinterest, 1) as [browser]:
        await log_in_as(browser, pinterest, ADA, "pina_ADA", "pinr_ADA")
        response = await browser.get("/v1/connections")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_api_key"


async def test_an_api_key_is_never_accepted_in_place_of_a_cookie(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the other half: /me and /auth/* know browsers only."""
    async with backend_and_browsers(settings, pinterest, 0) as [backend]:
        for method, path in [
            ("GET", "/me"),
            ("POST", "/auth/refresh"),
            ("DELETE", "/auth/connection"),
        ]:
            response = await backend.request(method, path)
            assert response.status_code == 401, path
            assert response.json()["error"] == "not_authenticated"


# --- connect sessions and ownership -----------------------------------------------


async def test_connect_session_links_an_account_to_an_end_user(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        connection_id = await connect_end_user(
            backend, browser, pinterest, "user_42", ADA, "pina_ADA", "pinr_ADA"
        )
        found = await backend.get("/v1/connections", params={"end_user_id": "user_42"})
        one = await backend.get(f"/v1/connections/{connection_id}")

    assert connection_id.startswith("conn_")
    assert found.status_code == 200
    [item] = found.json()["items"]
    assert found.json()["next_cursor"] is None
    assert item == one.json()
    assert item["id"] == connection_id
    assert item["end_user_id"] == "user_42"
    assert item["pinterest_user_id"] == ADA["id"]
    assert item["username"] == "ada_pins"
    assert item["status"] == "active"
    assert item["last_refreshed_at"] is not None
    assert set(item) == {
        "id",
        "end_user_id",
        "pinterest_user_id",
        "username",
        "scopes",
        "status",
        "created_at",
        "updated_at",
        "last_refreshed_at",
        "access_token_expires_at",
        "refresh_token_expires_at",
        "next_refresh_at",
    }
    # The keeper's schedule: before the refresh token enters PINAUTH_KEEPALIVE_DAYS (14).
    next_refresh = datetime.fromisoformat(item["next_refresh_at"])
    refresh_expires = datetime.fromisoformat(item["refresh_token_expires_at"])
    assert timedelta(days=14) <= refresh_expires - next_refresh <= timedelta(days=15)


async def test_two_end_users_with_one_pinterest_account_get_two_connections(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards ownership: deleting one end user's connection never touches the other's."""
    async with backend_and_browsers(settings, pinterest, 2) as [backend, alice, bob]:
        alice_id = await connect_end_user(
            backend, alice, pinterest, "alice", ADA, "pina_ALICE", "pinr_ALICE"
        )
        bob_id = await connect_end_user(backend, bob, pinterest, "bob", ADA, "pina_BOB", "pinr_BOB")
        assert alice_id != bob_id
        assert (await backend.delete(f"/v1/connections/{alice_id}")).status_code == 204
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        proxied = await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": bob_id})
        bob_row = await backend.get(f"/v1/connections/{bob_id}")
        alice_row = await backend.get(f"/v1/connections/{alice_id}")

    assert proxied.status_code == 200
    assert bearers(boards) == ["Bearer pina_BOB"]
    assert bob_row.status_code == 200
    assert alice_row.status_code == 404


async def test_one_end_user_links_two_accounts_and_reconnects_in_place(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ada = await connect_end_user(backend, browser, pinterest, "u1", ADA, "pina_A1", "pinr_A1")
        grace = await connect_end_user(
            backend, browser, pinterest, "u1", GRACE, "pina_G1", "pinr_G1"
        )
        again = await connect_end_user(backend, browser, pinterest, "u1", ADA, "pina_A2", "pinr_A2")
        listed = (await backend.get("/v1/connections", params={"end_user_id": "u1"})).json()
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": ada})
        await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": grace})

    assert again == ada  # updated in place, same id
    assert [c["id"] for c in listed["items"]] == [ada, grace]
    assert bearers(boards) == ["Bearer pina_A2", "Bearer pina_G1"]


async def test_browser_logins_without_a_connect_session_work_as_before(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        await log_in_as(browser, pinterest, ADA, "pina_ADA", "pinr_ADA")
        me = (await browser.get("/me")).json()
        listed = (await backend.get("/v1/connections")).json()
    assert [c["id"] for c in listed["items"]] == [me["connection_id"]]
    assert listed["items"][0]["end_user_id"] is None


@pytest.mark.parametrize(
    "problem", ["unknown", "malformed", "expired", "used", "tampered", "empty"]
)
async def test_unusable_connect_sessions_are_refused_before_pinterest(
    settings: Settings, pinterest: respx.MockRouter, problem: str
) -> None:
    """Guards single use and expiry: 400 invalid_connect_session, no redirect."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        minted = (await backend.post("/v1/connect-sessions", json={"end_user_id": "u"})).json()
        token = minted["token"]
        if problem == "unknown":
            token = "pinauth_cs_" + "x" * 43
        elif problem == "malformed":
            token = "../../etc"
        elif problem == "tampered":
            token = token[:-1] + ("A" if token[-1] != "A" else "B")
        elif problem == "empty":
            token = ""
        elif problem == "expired":
            await set_expiry(settings, datetime.now(UTC) - timedelta(seconds=1))
        elif problem == "used":
            assert (await browser.get(minted["connect_url"])).status_code == 302
        response = await browser.get("/auth/login", params={"connect_session": token})

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_connect_session"
    assert "location" not in response.headers


async def test_connect_session_response_and_return_to(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        minted = await backend.post(
            "/v1/connect-sessions",
            json={"end_user_id": "u", "return_to": "/settings?tab=pinterest&x=1#top"},
        )
        body = minted.json()
        login = await browser.get(body["connect_url"])
        state = login.headers["location"].split("state=")[1].split("&")[0]
        pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_X", "pinr_X"))
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        callback = await browser.get("/auth/callback", params={"code": "c", "state": state})

    assert set(body) == {"token", "connect_url", "expires_at"}
    assert body["token"].startswith("pinauth_cs_")
    assert body["connect_url"] == (
        f"http://localhost:8000/auth/login?connect_session={body['token']}"
    )
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(minutes=29) < expires - datetime.now(UTC) <= timedelta(minutes=30)
    # return_to keeps its own query and fragment, and gains the one-time result.
    location = urlsplit(callback.headers["location"])
    query = parse_qsl(location.query)
    assert (location.path, location.fragment) == ("/settings", "top")
    assert query[:2] == [("tab", "pinterest"), ("x", "1")]
    assert [name for name, _ in query[2:]] == ["pinauth_connect_result"]
    assert query[2][1].startswith("pinauth_cr_")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"end_user_id": ""}, "end_user_id"),
        ({"end_user_id": "x" * 256}, "end_user_id"),
        ({"end_user_id": "bad\nid"}, "end_user_id"),
        ({"end_user_id": "tab\there"}, "end_user_id"),
        ({}, "end_user_id"),
        ({"end_user_id": "u", "extra": 1}, "extra"),
        ({"end_user_id": "u", "return_to": "https://evil.example/"}, "return_to"),
        ({"end_user_id": 42}, "end_user_id"),
    ],
)
async def test_bad_connect_session_requests_name_the_field(
    settings: Settings, pinterest: respx.MockRouter, body: dict[str, object], field: str
) -> None:
    async with backend_and_browsers(settings, pinterest, 0) as [backend]:
        response = await backend.post("/v1/connect-sessions", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["message"]


async def test_a_body_that_is_not_json_is_a_clear_422(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 0) as [backend]:
        response = await backend.post(
            "/v1/connect-sessions",
            content=b"end_user_id=u",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        broken = await backend.post(
            "/v1/connect-sessions",
            content=b'{"end_user_id": ',
            headers={"Content-Type": "application/json"},
        )
    for r in (response, broken):
        assert r.status_code == 422
        assert r.json()["error"] == "invalid_request"


# --- the connections API ----------------------------------------------------------


async def test_listing_pages_filters_and_404s(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ids = [
            await connect_end_user(
                backend,
                browser,
                pinterest,
                f"user_{i % 2}",
                {"id": f"10{i}", "username": f"u{i}"},
                f"pina_{i}",
                f"pinr_{i}",
            )
            for i in range(5)
        ]
        pages: list[list[str]] = []
        cursor = None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await backend.get("/v1/connections", params=params)).json()
            pages.append([c["id"] for c in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        evens = (await backend.get("/v1/connections", params={"end_user_id": "user_0"})).json()
        active = (await backend.get("/v1/connections", params={"status": "active"})).json()
        stale = (
            await backend.get("/v1/connections", params={"status": "reauthorization_required"})
        ).json()
        unknown = await backend.get("/v1/connections/conn_doesnotexist")
        # Not ids at all: a NUL reached PostgreSQL, which refuses it in text (a 500).
        not_ids = [
            await backend.request(method, f"/v1/connections/conn_%00x{suffix}")
            for method, suffix in [("GET", ""), ("DELETE", ""), ("POST", "/proxy-tokens")]
        ] + [await backend.get("/v1/webhook-events/evt_%00x")]
        bad_status = await backend.get("/v1/connections", params={"status": "nope"})
        bad_limit = await backend.get("/v1/connections", params={"limit": 0})
        bad_cursor = await backend.get("/v1/connections", params={"cursor": "conn_gone"})
        deleted = await backend.delete(f"/v1/connections/{ids[0]}")
        deleted_again = await backend.delete(f"/v1/connections/{ids[0]}")

    assert pages == [ids[0:2], ids[2:4], ids[4:5]]
    assert [c["id"] for c in evens["items"]] == [ids[0], ids[2], ids[4]]
    assert len(active["items"]) == 5
    assert stale["items"] == []
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "connection_not_found"
    assert [(r.status_code, r.json()["error"]) for r in not_ids] == [(422, "invalid_request")] * 4
    assert bad_status.status_code == 422
    assert bad_limit.status_code == 422
    assert bad_cursor.status_code == 400
    assert bad_cursor.json()["error"] == "invalid_cursor"
    assert deleted.status_code == 204
    assert deleted_again.status_code == 404


# --- the proxy for servers --------------------------------------------------------


async def test_backend_proxy_acts_for_the_named_connection_only(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the server-side proxy: the named connection's token, nothing of the
    backend's credentials upstream, and clear errors without a usable connection id."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ada = await connect_end_user(backend, browser, pinterest, "u", ADA, "pina_ADA", "pinr_A")
        boards = pinterest.post(f"{API}/boards").respond(201, json={"id": "1"})
        created = await backend.post(
            "/pinterest/boards", json={"name": "x"}, headers={"Pinauth-Connection-Id": ada}
        )
        missing = await backend.get("/pinterest/boards")
        unknown = await backend.get(
            "/pinterest/boards", headers={"Pinauth-Connection-Id": "conn_nope"}
        )
        listed = pinterest.get(f"{API}/boards").respond(200, json={"items": [], "bookmark": None})
        via_boards = await backend.get("/boards", headers={"Pinauth-Connection-Id": ada})

    assert created.status_code == 201
    sent = boards.calls.last.request.headers
    assert sent["authorization"] == "Bearer pina_ADA"
    assert "pinauth-connection-id" not in sent
    assert missing.status_code == 400
    assert missing.json()["error"] == "connection_id_required"
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "connection_not_found"
    assert via_boards.status_code == 200
    assert bearers(listed) == ["Bearer pina_ADA"]


async def test_backend_proxy_refreshes_on_401_and_reports_reauthorization(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ada = await connect_end_user(backend, browser, pinterest, "u7", ADA, "pina_OLD", "pinr_O")
        token = pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_NEW", "pinr_NEW"))
        boards = pinterest.get(f"{API}/boards").mock(
            side_effect=[httpx.Response(401, json={"code": 2}), httpx.Response(200, json={})]
        )
        refreshed = await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": ada})
        assert token.call_count == 1
        assert bearers(boards) == ["Bearer pina_OLD", "Bearer pina_NEW"]
        pinterest.post(TOKEN_URL).respond(400, json={"code": 1, "message": "revoked"})
        pinterest.get(f"{API}/boards").respond(401, json={"code": 2})
        stale = await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": ada})
        shown = (await backend.get(f"/v1/connections/{ada}")).json()

    assert refreshed.status_code == 200
    assert stale.status_code == 401
    assert stale.json()["error"] == "reauthorization_required"
    assert stale.json()["connect_session_url"] == "/v1/connect-sessions"
    assert stale.json()["end_user_id"] == "u7"
    assert shown["status"] == "reauthorization_required"


async def test_an_api_key_with_a_cookie_acts_for_the_named_connection_not_the_cookie(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """With an Authorization header the cookie is ignored entirely."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ada = await connect_end_user(backend, browser, pinterest, "u", ADA, "pina_ADA", "pinr_A")
        await log_in_as(browser, pinterest, GRACE, "pina_GRACE", "pinr_G")
        boards = pinterest.get(f"{API}/boards").respond(200, json={})
        response = await browser.get(
            "/pinterest/boards",
            headers={"Authorization": "Bearer pinauth_sk_" + "Z" * 43},
        )
        backend.cookies.update(browser.cookies)
        with_key = await backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": ada})

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_api_key"
    assert with_key.status_code == 200
    assert bearers(boards) == ["Bearer pina_ADA"]


# --- findings of the black-box review ----------------------------------------------


async def test_a_cursor_survives_the_deletion_of_the_row_it_came_from(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the position cursor: "list, delete each, follow next_cursor" (a cleanup
    job) must not lose its place when it deletes the row the cursor came from."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ids = [
            await connect_end_user(
                backend, browser, pinterest, "u", {"id": f"7{i}", "username": f"u{i}"}, "a", "r"
            )
            for i in range(5)
        ]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = await backend.get("/v1/connections", params=params)
            assert page.status_code == 200, page.text
            for item in page.json()["items"]:
                seen.append(item["id"])
                assert (await backend.delete(f"/v1/connections/{item['id']}")).status_code == 204
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        tampered = await backend.get("/v1/connections", params={"cursor": "gAAAAA" + "x" * 90})

    assert seen == ids
    assert "7" not in str(cursor)
    assert tampered.status_code == 400
    assert tampered.json()["error"] == "invalid_cursor"


async def test_logins_of_one_account_finishing_together_all_succeed(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the retry on a lost update race: six callbacks of the same account at once
    (two tabs, a double click) each end 303 with a session, never a 500."""
    async with browsers(settings, pinterest, 6) as tabs:
        states = [await start_login(tab) for tab in tabs]
        pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_SAME", "pinr_SAME"))
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        callbacks = await asyncio.gather(
            *(
                tab.get("/auth/callback", params={"code": "c", "state": state})
                for tab, state in zip(tabs, states, strict=True)
            )
        )
        mes = [await tab.get("/me") for tab in tabs]

    assert [c.status_code for c in callbacks] == [303] * 6
    assert [m.status_code for m in mes] == [200] * 6
    assert len({m.json()["connection_id"] for m in mes}) == 1


async def test_a_non_ascii_request_header_is_dropped_not_a_500(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the request-header filter: a value httpx cannot send upstream."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ada = await connect_end_user(backend, browser, pinterest, "u", ADA, "pina_ADA", "pinr_A")
        boards = pinterest.get(f"{API}/boards").respond(200, json={})
        response = await backend.get(
            "/pinterest/boards",
            headers=[
                (b"Pinauth-Connection-Id", ada.encode()),
                (b"Accept-Language", "fr-\xe9".encode("latin-1")),
                (b"Accept", b"application/json"),
            ],
        )
    assert response.status_code == 200
    sent = boards.calls.last.request.headers
    assert "accept-language" not in sent
    assert sent["accept"] == "application/json"


async def test_a_connection_deleted_elsewhere_is_404_for_a_backend(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the backend's error contract: a connection deleted on another replica, which
    this one still caches, is 404 connection_not_found once it needs the row, not 401
    not_authenticated (which a backend would read as "my key is bad")."""
    settings_a = make_settings(database_url)
    settings_b = make_settings(
        database_url, encryption_keys=settings_a.encryption_keys[0].get_secret_value()
    )
    async with (
        backend_and_browsers(settings_a, pinterest, 1) as [backend_a, browser],
        backend_and_browsers(settings_b, pinterest, 0, key_name="b") as [backend_b],
    ):
        ada = await connect_end_user(backend_a, browser, pinterest, "u", ADA, "pina_A", "pinr_A")
        named = {"Pinauth-Connection-Id": ada}
        pinterest.get(f"{API}/boards").respond(200, json={})
        assert (await backend_b.get("/pinterest/boards", headers=named)).status_code == 200
        assert (await backend_a.delete(f"/v1/connections/{ada}")).status_code == 204
        # Pinterest now refuses the token, so B must go to the database for the row.
        pinterest.get(f"{API}/boards").respond(401, json={"code": 2, "message": "revoked"})
        response = await backend_b.get("/pinterest/boards", headers=named)

    assert response.status_code == 404, response.text
    assert response.json()["error"] == "connection_not_found"


async def test_a_reconnect_during_a_refresh_hands_callers_the_new_login(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the refresh's lost write: a reconnect confirmed (so the tokens replaced)
    while the refresh waited for Pinterest wins, and the waiting call proceeds with the
    login's token (it answered 503 "changed during the refresh")."""
    async with backend_and_browsers(settings, pinterest, 1) as [backend, browser]:
        ada = await connect_end_user(backend, browser, pinterest, "u", ADA, "pina_OLD", "pinr_O")
        refresh_arrived, release = asyncio.Event(), asyncio.Event()

        async def token_endpoint(request: httpx.Request) -> httpx.Response:
            if b"grant_type=refresh_token" in request.content:
                refresh_arrived.set()
                await release.wait()
                return httpx.Response(200, json=token_json("pina_REFRESHED", "pinr_R"))
            return httpx.Response(200, json=token_json("pina_LOGIN", "pinr_L"))

        pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        boards = pinterest.get(f"{API}/boards").mock(
            side_effect=lambda request: httpx.Response(
                401 if request.headers["authorization"] == "Bearer pina_OLD" else 200, json={}
            )
        )
        call = asyncio.create_task(
            backend.get("/pinterest/boards", headers={"Pinauth-Connection-Id": ada})
        )
        await refresh_arrived.wait()
        minted = await backend.post("/v1/connect-sessions", json={"end_user_id": "u"})
        login = await browser.get(minted.json()["connect_url"])
        state = login.headers["location"].split("state=")[1].split("&")[0]
        callback = await browser.get("/auth/callback", params={"code": "c", "state": state})
        result = parse_qs(urlsplit(callback.headers["location"]).query)
        confirmed = await backend.post(
            "/v1/connections/confirm",
            json={"result": result["pinauth_connect_result"][0], "end_user_id": "u"},
        )
        release.set()
        response = await call

    assert callback.status_code == 303
    assert confirmed.status_code == 200, confirmed.text
    assert response.status_code == 200, response.text
    assert bearers(boards)[-1] == "Bearer pina_LOGIN"  # the stored pair, not the dropped one


async def test_the_backend_must_name_one_connection_and_send_one_credential(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards against the order of headers deciding who is acted for: two different
    Pinauth-Connection-Id values (any case, any order) are refused, as are two
    Authorization headers (an API key beside a proxy token, in either order); the same
    id twice is harmless. Pinterest is never called."""
    async with backend_and_browsers(settings, pinterest, 2) as [backend, ada_b, grace_b]:
        ada = await connect_end_user(backend, ada_b, pinterest, "u1", ADA, "pina_A", "pinr_A")
        grace = await connect_end_user(backend, grace_b, pinterest, "u2", GRACE, "pina_G", "pinr_G")
        token = (await backend.post(f"/v1/connections/{grace}/proxy-tokens", json={})).json()[
            "token"
        ]
        key = backend.headers["authorization"]
        upstream = pinterest.route(host="api.pinterest.com").respond(200, json={})
        answers = []
        for first, second in ((ada, grace), (grace, ada)):
            answers.append(
                await backend.get(
                    "/pinterest/user_account",
                    headers=[("Pinauth-Connection-Id", first), ("pinauth-connection-id", second)],
                )
            )
        same_twice = await backend.get(
            "/pinterest/user_account",
            headers=[("Pinauth-Connection-Id", ada), ("Pinauth-Connection-Id", ada)],
        )
        two_credentials = []
        for credentials in ((key, f"Bearer {token}"), (f"Bearer {token}", key)):
            request = backend.build_request(
                "GET",
                "/pinterest/user_account",
                headers=[("Pinauth-Connection-Id", grace)]
                + [("Authorization", value) for value in credentials],
            )
            two_credentials.append(await backend.send(request))
            request = backend.build_request(
                "GET", "/v1/connections", headers=[("Authorization", v) for v in credentials]
            )
            two_credentials.append(await backend.send(request))

    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "ambiguous_connection_id"
    assert same_twice.status_code == 200
    for answer in two_credentials:
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "invalid_api_key"
    assert upstream.call_count == 1  # same_twice only
