"""Proxy tokens (issue 11): one connection, the proxy routes only, until expiry or delete."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import event, text, update
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.app import create_app
from pinauth.cache import ConnectionCache
from pinauth.connections import ConnectionService
from pinauth.crypto import CursorCodec, TokenCipher, digest
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import ConnectionNotFound, InvalidProxyToken
from pinauth.housekeeping import ExpiredRowPurger
from pinauth.models import ProxyToken
from pinauth.proxytokens import PROXY_TOKEN_LENGTH, PROXY_TOKEN_PREFIX, ProxyTokenService
from pinauth.settings import Settings
from tests.helpers import (
    API,
    SERVICE,
    TOKEN_URL,
    ManualClock,
    bearers,
    browsers,
    connect_end_user,
    create_api_key,
    log_in_as,
    make_settings,
)

ADA = {"id": "549755885175", "username": "ada_pins", "account_type": "PINNER"}
GRACE = {"id": "549755885999", "username": "grace_pins", "account_type": "BUSINESS"}
ADA_ACCESS, GRACE_ACCESS = "pina_ACCESS-ADA-PT-1f", "pina_ACCESS-GRACE-PT-2e"


@asynccontextmanager
async def two_connections(
    settings: Settings, pinterest: respx.MockRouter
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, str, str]]:
    """(backend with an API key, a client without credentials, Ada's id, Grace's id)."""
    key = await create_api_key(settings)
    async with browsers(settings, pinterest, 4) as [backend, caller, ada, grace]:
        backend.headers["Authorization"] = f"Bearer {key}"
        ada_id = await connect_end_user(
            backend, ada, pinterest, "u-ada", ADA, ADA_ACCESS, "pinr_REFRESH-ADA-PT"
        )
        grace_id = await connect_end_user(
            backend, grace, pinterest, "u-grace", GRACE, GRACE_ACCESS, "pinr_REFRESH-GRACE-PT"
        )
        yield backend, caller, ada_id, grace_id


async def mint(backend: httpx.AsyncClient, connection_id: str, **body: object) -> str:
    response = await backend.post(f"/v1/connections/{connection_id}/proxy-tokens", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def warm_then_delete_elsewhere(
    settings: Settings,
    pinterest: respx.MockRouter,
    backend: httpx.AsyncClient,
    caller: httpx.AsyncClient,
    connection_id: str,
) -> tuple[str, httpx.Response]:
    """A token for the connection, used once (its answer), then the connection deleted
    through another replica (another app on the same database)."""
    token = await mint(backend, connection_id)
    pinterest.get(f"{API}/user_account").respond(200, json=ADA)
    warm = await caller.get("/pinterest/user_account", headers=bearer(token))
    async with browsers(settings, pinterest, 1) as [other_replica]:
        other_replica.headers.update(backend.headers)
        deleted = await other_replica.delete(f"/v1/connections/{connection_id}")
        assert deleted.status_code == 204
    return token, warm


async def test_mint_answers_a_token_and_its_expiry(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with two_connections(settings, pinterest) as (backend, _, ada_id, _grace):
        before = datetime.now(UTC)
        default = await backend.post(f"/v1/connections/{ada_id}/proxy-tokens")
        short = await backend.post(
            f"/v1/connections/{ada_id}/proxy-tokens", json={"ttl_seconds": 60}
        )
        longest = await backend.post(
            f"/v1/connections/{ada_id}/proxy-tokens", json={"ttl_seconds": 86400}
        )

    assert default.status_code == short.status_code == longest.status_code == 201
    body = default.json()
    assert set(body) == {"id", "token", "expires_at"}
    assert re.fullmatch(r"pt_[a-z2-7]{26}", body["id"])  # 128 random bits, like conn_ ids
    assert len({body["id"], short.json()["id"], longest.json()["id"]}) == 3
    assert body["id"] not in body["token"]
    assert body["token"].startswith(PROXY_TOKEN_PREFIX)
    assert len(body["token"]) == PROXY_TOKEN_LENGTH  # 256 random bits
    assert body["token"] != short.json()["token"]
    expires = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(seconds=3590) < expires < before + timedelta(seconds=3660)
    short_expiry = datetime.fromisoformat(short.json()["expires_at"])
    assert before + timedelta(seconds=50) < short_expiry < before + timedelta(seconds=120)
    assert datetime.fromisoformat(longest.json()["expires_at"]) > before + timedelta(hours=23)


@pytest.mark.parametrize(
    "body",
    [
        {"ttl_seconds": 0},
        {"ttl_seconds": -5},
        {"ttl_seconds": 86401},
        {"ttl_seconds": "3600"},
        {"ttl_seconds": 1.5},
        {"ttl_seconds": None},
        {"ttl": 60},
        [],
    ],
)
async def test_mint_refuses_a_bad_ttl_with_422(
    settings: Settings, pinterest: respx.MockRouter, body: object
) -> None:
    async with two_connections(settings, pinterest) as (backend, _, ada_id, _grace):
        response = await backend.post(f"/v1/connections/{ada_id}/proxy-tokens", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert "message" in response.json()


async def test_mint_for_an_unknown_connection_is_404(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    async with two_connections(settings, pinterest) as (backend, _, _ada, _grace):
        response = await backend.post("/v1/connections/conn_nope/proxy-tokens", json={})
    assert response.status_code == 404
    assert response.json()["error"] == "connection_not_found"


async def test_a_proxy_token_acts_for_its_connection_on_the_proxy_routes(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """The proxy and /boards call Pinterest with the token's connection's token; the
    same token naming its own connection in Pinauth-Connection-Id is fine."""
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, _grace):
        token = await mint(backend, ada_id)
        account = pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": [], "bookmark": None})
        created = pinterest.post(f"{API}/pins").respond(201, json={"id": "p1"})
        proxied = await caller.get("/pinterest/user_account", headers=bearer(token))
        own_id = await caller.get(
            "/pinterest/user_account",
            headers=bearer(token) | {"Pinauth-Connection-Id": ada_id},
        )
        listed = await caller.get("/boards", headers=bearer(token))
        pin = await caller.post("/pinterest/pins", headers=bearer(token), json={"board_id": "b"})

    assert proxied.status_code == own_id.status_code == 200, proxied.text
    assert proxied.json() == ADA
    assert listed.status_code == 200, listed.text
    assert pin.status_code == 201, pin.text
    assert bearers(account) == [f"Bearer {ADA_ACCESS}"] * 2
    assert bearers(boards) == bearers(created) == [f"Bearer {ADA_ACCESS}"]


async def test_a_proxy_token_never_switches_connection(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards connection pinning: Pinauth-Connection-Id naming another connection (or
    none that exists) is refused with 403, and Pinterest is never called."""
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, grace_id):
        token = await mint(backend, ada_id)
        upstream = pinterest.route().respond(200, json={})
        answers = [
            await caller.request(
                method, path, headers=bearer(token) | {"Pinauth-Connection-Id": other}
            )
            for method, path in [("GET", "/pinterest/user_account"), ("GET", "/boards")]
            for other in (grace_id, "conn_nope")
        ]
        answers.append(
            await caller.post(
                "/pinterest/pins",
                headers=bearer(token) | {"Pinauth-Connection-Id": grace_id},
                json={},
            )
        )
        # Its own id first and another's in a second header: still another connection.
        answers.append(
            await caller.get(
                "/pinterest/user_account",
                headers=[
                    ("Authorization", f"Bearer {token}"),
                    ("Pinauth-Connection-Id", ada_id),
                    ("Pinauth-Connection-Id", grace_id),
                ],
            )
        )

    for answer in answers:
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"] == "proxy_token_connection_mismatch"
    assert upstream.calls.call_count == 0


async def test_a_proxy_token_is_refused_outside_the_proxy_routes(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the scope: on every /v1 route (minting another token included) and the
    browser's /me and /auth routes a proxy token gets 403 proxy_token_not_allowed, and
    changes nothing."""
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, _grace):
        token = await mint(backend, ada_id)
        caller.headers.update(bearer(token))
        routes = [
            ("GET", "/v1/connections"),
            ("GET", f"/v1/connections/{ada_id}"),
            ("DELETE", f"/v1/connections/{ada_id}"),
            ("POST", f"/v1/connections/{ada_id}/proxy-tokens"),
            ("POST", "/v1/connect-sessions"),
            ("GET", "/me"),
            ("POST", "/auth/refresh"),
            ("DELETE", "/auth/connection"),
            ("POST", "/auth/logout"),
        ]
        answers = [
            await caller.request(method, path, json={"end_user_id": "u"}) for method, path in routes
        ]
        still_there = await backend.get(f"/v1/connections/{ada_id}")

    for (method, path), answer in zip(routes, answers, strict=True):
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["error"] == "proxy_token_not_allowed", (method, path)
    assert still_there.status_code == 200


async def test_a_proxy_token_alongside_a_session_cookie_is_still_refused_on_me(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """A browser that also sends a proxy token is told so, not served by its cookie."""
    key = await create_api_key(settings)
    async with browsers(settings, pinterest, 2) as [backend, ada]:
        backend.headers["Authorization"] = f"Bearer {key}"
        # A browser's own login: connect-session logins give the browser no session.
        await log_in_as(ada, pinterest, ADA, ADA_ACCESS, "pinr_REFRESH-ADA-PT")
        ada_id = (await ada.get("/me")).json()["connection_id"]
        token = await mint(backend, ada_id)
        with_cookie_only = await ada.get("/me")
        with_both = await ada.get("/me", headers=bearer(token))
    assert with_cookie_only.status_code == 200
    assert with_both.status_code == 403
    assert with_both.json()["error"] == "proxy_token_not_allowed"


@pytest.mark.parametrize(
    "token",
    [
        PROXY_TOKEN_PREFIX + "A" * 43,  # well-formed, never minted
        PROXY_TOKEN_PREFIX + "short",
        PROXY_TOKEN_PREFIX + "A" * 200,
    ],
)
async def test_an_unknown_proxy_token_is_401(
    settings: Settings, pinterest: respx.MockRouter, token: str
) -> None:
    async with two_connections(settings, pinterest) as (_backend, caller, _ada, _grace):
        upstream = pinterest.route().respond(200, json={})
        proxied = await caller.get("/pinterest/user_account", headers=bearer(token))
        listed = await caller.get("/boards", headers=bearer(token))
    for answer in (proxied, listed):
        assert answer.status_code == 401
        assert answer.json()["error"] == "invalid_proxy_token"
        assert answer.headers["www-authenticate"] == "Bearer"
    assert upstream.calls.call_count == 0


async def set_proxy_token_expiry(database_url: str, when: datetime) -> None:
    engine = create_async_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            await db.execute(update(ProxyToken).values(expires_at=when))
    finally:
        await engine.dispose()


async def count_proxy_tokens(database_url: str) -> int:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            query = text("SELECT count(*) FROM proxy_tokens")
            return int((await connection.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def test_an_expired_proxy_token_is_refused(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards expiry in the database query: a token past its expires_at is 401."""
    settings = make_settings(database_url)
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, _grace):
        token = await mint(backend, ada_id, ttl_seconds=60)
        await set_proxy_token_expiry(database_url, datetime.now(UTC) - timedelta(seconds=1))
        upstream = pinterest.route().respond(200, json={})
        answer = await caller.get("/pinterest/user_account", headers=bearer(token))
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_proxy_token"
    assert upstream.calls.call_count == 0


async def test_a_cached_proxy_token_still_dies_at_its_expiry(database_url: str) -> None:
    """Guards expiry on the cached path: a token verified a moment ago is refused once
    its expiry passes, even while its cache entry lives."""
    settings = make_settings(database_url, cache_ttl_seconds=3600)
    clock = ManualClock(start=datetime.now(UTC).timestamp())
    key = await create_api_key(settings)
    pinterest = respx.MockRouter(assert_all_mocked=True)
    async with browsers(settings, pinterest, 2) as [backend, ada]:
        backend.headers["Authorization"] = f"Bearer {key}"
        ada_id = await connect_end_user(
            backend, ada, pinterest, "u-ada", ADA, ADA_ACCESS, "pinr_REFRESH-ADA-PT"
        )
    engine = create_engine(settings)
    try:
        sessionmaker = create_sessionmaker(engine)
        cache = ConnectionCache(3600)
        cipher = TokenCipher([k.get_secret_value() for k in settings.encryption_keys])
        connections = ConnectionService(sessionmaker, cache, CursorCodec(cipher))
        service = ProxyTokenService(sessionmaker, cache, connections, clock=clock)
        minted = await service.mint(ada_id, 60)
        assert (await service.connection_for(minted.token)).public_id == ada_id  # loaded
        clock.advance(59)
        assert (await service.connection_for(minted.token)).public_id == ada_id  # cached
        clock.advance(1)
        with pytest.raises(InvalidProxyToken, match="expired"):
            await service.connection_for(minted.token)
    finally:
        await engine.dispose()


async def test_a_proxy_token_dies_with_its_connection(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards death with the connection: right after DELETE /v1/connections/{id} the
    token is 401 on this process although it was just resolved and cached (cache TTL an
    hour), and its row is gone from the database (ON DELETE CASCADE); the other
    connection's token keeps working."""
    settings = make_settings(database_url, cache_ttl_seconds=3600)
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, grace_id):
        ada_token = await mint(backend, ada_id)
        grace_token = await mint(backend, grace_id)
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        warm = await caller.get("/pinterest/user_account", headers=bearer(ada_token))
        deleted = await backend.delete(f"/v1/connections/{ada_id}")
        pinterest.routes.clear()
        upstream = pinterest.route().respond(200, json=GRACE)
        after = await caller.get("/pinterest/user_account", headers=bearer(ada_token))
        boards = await caller.get("/boards", headers=bearer(ada_token))
        other = await caller.get("/pinterest/user_account", headers=bearer(grace_token))
        remaining = await count_proxy_tokens(database_url)

    assert warm.status_code == 200
    assert deleted.status_code == 204
    for answer in (after, boards):
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "invalid_proxy_token"
    assert other.status_code == 200
    assert bearers(upstream) == [f"Bearer {GRACE_ACCESS}"]
    assert remaining == 1  # Grace's


async def test_a_proxy_token_dies_with_a_connection_deleted_by_another_replica(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Another process deleted the connection: once this one's caches expire (TTL 0
    here) the token is refused, not answered with another row or a 500."""
    settings = make_settings(database_url, cache_ttl_seconds=0)
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, _grace):
        token, warm = await warm_then_delete_elsewhere(settings, pinterest, backend, caller, ada_id)
        after = await caller.get("/pinterest/user_account", headers=bearer(token))
    assert warm.status_code == 200
    assert after.status_code == 401
    assert after.json()["error"] == "invalid_proxy_token"


async def test_a_proxy_token_is_stored_only_as_its_hash(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards hash-only storage: the row holds sha256(token), never the token."""
    settings = make_settings(database_url)
    async with two_connections(settings, pinterest) as (backend, _, ada_id, _grace):
        token = await mint(backend, ada_id)
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT * FROM proxy_tokens"))).all()
    finally:
        await engine.dispose()
    assert len(rows) == 1
    assert rows[0].token_hash == digest(token)
    assert token not in repr(rows)


async def test_purge_deletes_expired_proxy_tokens(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    settings = make_settings(database_url)
    async with two_connections(settings, pinterest) as (backend, _, ada_id, _grace):
        await mint(backend, ada_id)
        await mint(backend, ada_id)
    await set_proxy_token_expiry(database_url, datetime.now(UTC) - timedelta(seconds=1))
    engine = create_engine(settings)
    try:
        purged = await ExpiredRowPurger(create_sessionmaker(engine), 3600).purge_once()
    finally:
        await engine.dispose()
    assert purged.proxy_tokens == 2
    assert await count_proxy_tokens(database_url) == 0


async def test_a_connection_deleted_while_its_token_is_minted_is_not_found(
    database_url: str,
) -> None:
    """Guards the mint's read-then-insert: a delete committing between them made the
    insert fail its foreign key, and the API answered 500. The delete is made to land in
    exactly that gap, on the mint's own database connection, just before its INSERT."""
    settings = make_settings(database_url)
    key = await create_api_key(settings)
    pinterest = respx.MockRouter(assert_all_mocked=True)
    async with browsers(settings, pinterest, 2) as [backend, ada]:
        backend.headers["Authorization"] = f"Bearer {key}"
        ada_id = await connect_end_user(
            backend, ada, pinterest, "u-ada", ADA, ADA_ACCESS, "pinr_REFRESH-ADA-PT"
        )
    engine = create_engine(settings)

    def delete_first(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO PROXY_TOKENS"):
            conn.execute(text("DELETE FROM connections WHERE public_id = :id"), {"id": ada_id})

    event.listen(engine.sync_engine, "before_cursor_execute", delete_first)
    try:
        sessionmaker = create_sessionmaker(engine)
        cache = ConnectionCache(0)
        cipher = TokenCipher([k.get_secret_value() for k in settings.encryption_keys])
        connections = ConnectionService(sessionmaker, cache, CursorCodec(cipher))
        service = ProxyTokenService(sessionmaker, cache, connections)
        with pytest.raises(ConnectionNotFound):
            await service.mint(ada_id, 60)
    finally:
        await engine.dispose()


async def test_a_token_whose_connection_was_deleted_elsewhere_mid_refresh_is_a_401(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the caller's terms: this process still holds the connection (cache TTL an
    hour) when another replica deletes it; Pinterest's 401 sends the call to refresh,
    which finds the row gone. The token's holder is told its token died with its
    connection (401 invalid_proxy_token), not a backend's 404 connection_not_found."""
    settings = settings.model_copy(update={"cache_ttl_seconds": 3600})
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, _grace):
        token, warm = await warm_then_delete_elsewhere(settings, pinterest, backend, caller, ada_id)
        pinterest.routes.clear()
        pinterest.get(f"{API}/user_account").respond(401, json={"code": 2, "message": "no"})
        after = await caller.get("/pinterest/user_account", headers=bearer(token))
    assert warm.status_code == 200
    assert after.status_code == 401, after.text
    assert after.json()["error"] == "invalid_proxy_token"


async def test_a_token_holder_is_not_told_how_to_reconnect(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Reauthorization needed: the API key's caller learns the end user and where to mint
    a connect session; a proxy token's holder, which can do neither, learns neither."""
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, _grace):
        token = await mint(backend, ada_id)
        pinterest.routes.clear()
        pinterest.get(f"{API}/user_account").respond(401, json={"code": 2, "message": "no"})
        pinterest.post(TOKEN_URL).respond(400, json={"code": 1, "message": "invalid_grant"})
        via_token = await caller.get("/pinterest/user_account", headers=bearer(token))
        via_key = await backend.get(
            "/pinterest/user_account", headers={"Pinauth-Connection-Id": ada_id}
        )
    for answer in (via_token, via_key):
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "reauthorization_required"
    assert "end_user_id" not in via_token.json()
    assert "connect_session_url" not in via_token.json()
    assert via_key.json()["end_user_id"] == "u-ada"


# --- revocation, one by one or all of a connection's (issue 18.9) --------------------


async def mint_with_id(backend: httpx.AsyncClient, connection_id: str) -> tuple[str, str]:
    """(the token's id, the token)."""
    response = await backend.post(f"/v1/connections/{connection_id}/proxy-tokens")
    assert response.status_code == 201, response.text
    return str(response.json()["id"]), str(response.json()["token"])


async def statuses(caller: httpx.AsyncClient, *tokens: str) -> list[int]:
    return [
        (await caller.get("/pinterest/user_account", headers=bearer(token))).status_code
        for token in tokens
    ]


async def test_revoking_one_token_ends_it_at_once_and_nothing_else(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards `DELETE …/proxy-tokens/{token_id}`: the token, just used and cached (cache
    TTL an hour), is refused by this process right after the 204; the connection's other
    token and another connection's keep working; a token is revoked only through its
    own connection (another's id there is 404 proxy_token_not_found, and stays alive)."""
    settings = make_settings(database_url, cache_ttl_seconds=3600)
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, grace_id):
        first_id, first = await mint_with_id(backend, ada_id)
        _, second = await mint_with_id(backend, ada_id)
        grace_token_id, grace = await mint_with_id(backend, grace_id)
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        warm = await statuses(caller, first, second, grace)
        revoked = await backend.delete(f"/v1/connections/{ada_id}/proxy-tokens/{first_id}")
        after = await statuses(caller, first, second, grace)
        again = await backend.delete(f"/v1/connections/{ada_id}/proxy-tokens/{first_id}")
        crossed = await backend.delete(f"/v1/connections/{ada_id}/proxy-tokens/{grace_token_id}")
        no_connection = await backend.delete(
            f"/v1/connections/conn_doesnotexist/proxy-tokens/{grace_token_id}"
        )
        not_an_id = await backend.delete(f"/v1/connections/{ada_id}/proxy-tokens/pt_%00x")
        by_a_token = await caller.delete(
            f"/v1/connections/{grace_id}/proxy-tokens/{grace_token_id}", headers=bearer(grace)
        )
        finally_ = await statuses(caller, second, grace)
        remaining = await count_proxy_tokens(database_url)

    assert warm == [200, 200, 200]
    assert revoked.status_code == 204, revoked.text
    assert revoked.content == b""
    assert after == [401, 200, 200]
    assert (again.status_code, again.json()["error"]) == (404, "proxy_token_not_found")
    assert (crossed.status_code, crossed.json()["error"]) == (404, "proxy_token_not_found")
    assert (no_connection.status_code, no_connection.json()["error"]) == (
        404,
        "connection_not_found",
    )
    assert (not_an_id.status_code, not_an_id.json()["error"]) == (422, "invalid_request")
    assert (by_a_token.status_code, by_a_token.json()["error"]) == (
        403,
        "proxy_token_not_allowed",
    )
    assert finally_ == [200, 200]
    assert remaining == 2


async def test_revoking_all_ends_every_token_of_the_connection_only(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards `DELETE …/proxy-tokens`: every token of the connection, cached here, is
    refused at once, and only its rows are deleted; the connection itself stays (the API
    key still acts for it, and a new token works); another connection's token is
    untouched."""
    settings = make_settings(database_url, cache_ttl_seconds=3600)
    async with two_connections(settings, pinterest) as (backend, caller, ada_id, grace_id):
        ada_tokens = [await mint(backend, ada_id) for _ in range(3)]
        grace = await mint(backend, grace_id)
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        warm = await statuses(caller, *ada_tokens, grace)
        revoked = await backend.delete(f"/v1/connections/{ada_id}/proxy-tokens")
        after = await statuses(caller, *ada_tokens, grace)
        remaining = await count_proxy_tokens(database_url)
        again = await backend.delete(f"/v1/connections/{ada_id}/proxy-tokens")
        by_key = await backend.get(
            "/pinterest/user_account", headers={"Pinauth-Connection-Id": ada_id}
        )
        fresh = await statuses(caller, await mint(backend, ada_id))
        unknown = await backend.delete("/v1/connections/conn_doesnotexist/proxy-tokens")

    assert warm == [200] * 4
    assert revoked.status_code == 204, revoked.text
    assert after == [401, 401, 401, 200]
    assert remaining == 1  # Grace's (its row, not just this process's cached entry)
    assert again.status_code == 204
    assert by_key.status_code == 200
    assert fresh == [200]
    assert (unknown.status_code, unknown.json()["error"]) == (404, "connection_not_found")


@asynccontextmanager
async def replica(
    settings: Settings, pinterest: respx.MockRouter, key: str, count: int
) -> AsyncIterator[tuple[FastAPI, list[httpx.AsyncClient]]]:
    """One more running app on the same database (a replica), and `count` clients of it:
    the first holds the API key."""
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with LifespanManager(app) as manager, AsyncExitStack() as stack:
        asgi = httpx.ASGITransport(manager.app)
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(transport=asgi, base_url=SERVICE))
            for _ in range(count)
        ]
        clients[0].headers["Authorization"] = f"Bearer {key}"
        yield app, clients


async def test_a_revocation_on_another_replica_is_seen_at_its_next_revalidation(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards revalidation of proxy tokens: replica B revokes one token (then all of the
    connection's) that replica A has cached for an hour; B refuses at once, A at its
    next revalidation pass (every half PINAUTH_CACHE_TTL), run here by hand."""
    settings = make_settings(database_url, cache_ttl_seconds=3600)
    key = await create_api_key(settings)
    async with (
        replica(settings, pinterest, key, 3) as (a, [backend_a, caller_a, ada]),
        replica(settings, pinterest, key, 2) as (_b, [backend_b, caller_b]),
    ):
        ada_id = await connect_end_user(
            backend_a, ada, pinterest, "u-ada", ADA, ADA_ACCESS, "pinr_REFRESH-ADA-PT"
        )
        first_id, first = await mint_with_id(backend_a, ada_id)
        _, second = await mint_with_id(backend_a, ada_id)
        pinterest.get(f"{API}/user_account").respond(200, json=ADA)
        assert await statuses(caller_a, first, second) == [200, 200]
        assert await statuses(caller_b, first, second) == [200, 200]

        revoked = await backend_b.delete(f"/v1/connections/{ada_id}/proxy-tokens/{first_id}")
        assert revoked.status_code == 204
        assert await statuses(caller_b, first, second) == [401, 200]  # B: at once
        assert await statuses(caller_a, first) == [200]  # A: cached, until its next pass
        done = await a.state.cache_revalidator.run_once()
        assert done.dropped == 1
        assert await statuses(caller_a, first, second) == [401, 200]

        assert (await backend_b.delete(f"/v1/connections/{ada_id}/proxy-tokens")).status_code == 204
        assert await statuses(caller_b, second) == [401]
        await a.state.cache_revalidator.run_once()
        assert await statuses(caller_a, second) == [401]
