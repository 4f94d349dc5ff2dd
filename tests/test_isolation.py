"""One user's connection, session or token is never served for another (issue 8)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx
from sqlalchemy import select

from pinauth.cache import ConnectionCache
from pinauth.db import create_engine, create_sessionmaker
from pinauth.models import Connection
from pinauth.settings import Settings
from tests.helpers import (
    API,
    TOKEN_URL,
    bearers,
    browsers,
    log_in_as,
    make_settings,
    run_client,
    token_json,
)

ALICE = {"id": "1000000000001", "username": "alice", "account_type": "PINNER"}
BOB = {"id": "2000000000002", "username": "bob", "account_type": "PINNER"}
ALICE_ACCESS, ALICE_REFRESH = "pina_ALICE-ACCESS-71c0", "pinr_ALICE-REFRESH-71c0"
BOB_ACCESS, BOB_REFRESH = "pina_BOB-ACCESS-93d4", "pinr_BOB-REFRESH-93d4"
EVIL = "https://evil.example"


async def stored_connections(settings: Settings) -> list[Connection]:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            return list((await db.execute(select(Connection).order_by(Connection.id))).scalars())
    finally:
        await engine.dispose()


async def test_a_new_user_never_gets_a_disconnected_users_token(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the cross-user token leak: Alice's cached token served for Bob's new row.

    On SQLite without AUTOINCREMENT Bob's row got Alice's old id, and the token cache was
    keyed by (id, version) and kept after disconnect.
    """
    async with browsers(settings, pinterest, 2) as (alice, bob):
        await log_in_as(alice, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        assert (await alice.get("/pinterest/boards")).status_code == 200  # token cached
        assert (await alice.delete("/auth/connection")).status_code == 204

        await log_in_as(bob, pinterest, BOB, BOB_ACCESS, BOB_REFRESH)
        boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        assert (await bob.get("/me")).json()["username"] == "bob"
        assert (await bob.get("/pinterest/boards")).status_code == 200

    assert bearers(boards) == [f"Bearer {BOB_ACCESS}"]


async def test_another_browser_of_a_disconnected_user_never_sees_the_next_user(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards session → connection cache entries outliving a disconnect.

    Alice's second browser had its session cached by connection id; once Bob's row took
    that id, it showed Bob's account.
    """
    async with browsers(settings, pinterest, 3) as (alice_phone, alice_laptop, bob):
        await log_in_as(alice_phone, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        await log_in_as(alice_laptop, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        assert (await alice_laptop.get("/me")).json()["username"] == "alice"  # cached
        assert (await alice_phone.delete("/auth/connection")).status_code == 204
        await log_in_as(bob, pinterest, BOB, BOB_ACCESS, BOB_REFRESH)
        assert (await bob.get("/me")).json()["username"] == "bob"

        response = await alice_laptop.get("/me")

    assert response.status_code == 401


async def test_connection_ids_are_never_reused(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards SQLite's AUTOINCREMENT and the random public id: a deleted connection's
    identifiers never name another connection."""
    async with run_client(settings, pinterest) as client:
        await log_in_as(client, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        [alice] = await stored_connections(settings)
        assert (await client.delete("/auth/connection")).status_code == 204
        await log_in_as(client, pinterest, BOB, BOB_ACCESS, BOB_REFRESH)
        [bob] = await stored_connections(settings)

    assert bob.id > alice.id
    assert alice.public_id.startswith("conn_")
    assert bob.public_id.startswith("conn_")
    assert bob.public_id != alice.public_id
    assert len(alice.public_id) == len("conn_") + 26  # 128 random bits, base32


async def test_logout_cannot_be_undone_by_a_concurrent_reload(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the generation check: a session load that read the row before a logout
    committed must not cache it, or a copied cookie works on for the cache's lifetime.

    The reload and the logout race for real, many times (the review saw 13 of 25 trials
    leak); each trial's copied cookie must be dead right after.
    """
    settings = make_settings(database_url, cache_ttl_seconds=60)
    survived = 0
    async with browsers(settings, pinterest, 2) as (owner, thief):
        for _ in range(30):
            await log_in_as(owner, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
            thief.cookies.set("pinauth_session", owner.cookies["pinauth_session"])
            # The new session is not cached yet: the thief's request loads it while the
            # owner logs out.
            await asyncio.gather(thief.get("/me"), owner.post("/auth/logout"))
            if (await thief.get("/me")).status_code != 401:
                survived += 1
    assert survived == 0


def cached_row(public_id: str, version: int = 1) -> Connection:
    return Connection(public_id=public_id, version=version, access_token_encrypted="ct")


def test_a_deleted_connection_cannot_be_cached_again() -> None:
    """Guards the tombstone: a refresh or load that read the row before the disconnect
    finishes after it, and must not put the deleted connection back."""
    cache = ConnectionCache(ttl=60)
    generation = cache.generation()
    cache.forget_connection("conn_alice")

    assert not cache.remember_connection(cached_row("conn_alice", version=2))
    cache.remember_session("session-hash", cached_row("conn_alice"), cache.generation())
    cache.remember_access_token(cached_row("conn_alice"), "pina_ALICE")

    assert cache.cached_connection("conn_alice") is None
    assert cache.connection_for_session("session-hash") is None
    assert cache.access_token(cached_row("conn_alice")) is None
    # Only that connection: others are cached as before.
    cache.remember_session("other-hash", cached_row("conn_bob"), generation + 1)
    assert cache.connection_for_session("other-hash") is not None


def test_a_session_load_older_than_a_logout_is_not_cached() -> None:
    """Guards the generation check at the cache's own level (see the race test above)."""
    cache = ConnectionCache(ttl=60)
    generation = cache.generation()  # a load starts...
    cache.forget_session("session-hash")  # ...a logout commits...
    cache.remember_session("session-hash", cached_row("conn_alice"), generation)  # ...it ends

    assert cache.connection_for_session("session-hash") is None


def test_a_cached_token_is_served_only_for_the_ciphertext_it_came_from() -> None:
    """A token is used only for the row it was decrypted from, whatever the ids say."""
    cache = ConnectionCache(ttl=60)
    cache.remember_access_token(cached_row("conn_alice"), "pina_ALICE")
    other_row = Connection(public_id="conn_alice", version=1, access_token_encrypted="other")

    assert cache.access_token(cached_row("conn_alice")) == "pina_ALICE"
    assert cache.access_token(other_row) is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("origin", [EVIL, "null", "https://app.example.com.evil.example"])
async def test_proxy_writes_refuse_untrusted_origins(
    settings: Settings, pinterest: respx.MockRouter, method: str, origin: str
) -> None:
    """Guards the Origin check in the one function every cookie request goes through,
    which the proxy's fast path skipped: a same-site page posted boards as the user."""
    async with run_client(settings, pinterest) as client:
        await log_in_as(client, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        upstream = pinterest.route(url__startswith=API).respond(201, json={})
        response = await client.request(
            method,
            "/pinterest/boards",
            content=b'{"name": "pwned"}',
            headers={"Origin": origin, "Content-Type": "text/plain"},
        )
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden_origin"
    assert upstream.call_count == 0


@pytest.mark.parametrize("origin", [None, "http://localhost:8000"])
async def test_proxy_writes_from_trusted_or_non_browser_clients_work(
    settings: Settings, pinterest: respx.MockRouter, origin: str | None
) -> None:
    """The Origin check refuses nothing it should not: own origin, and no Origin at all."""
    async with run_client(settings, pinterest) as client:
        await log_in_as(client, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        pinterest.post(f"{API}/boards").respond(201, json={"id": "1"})
        headers = {"Origin": origin} if origin else {}
        response = await client.post("/pinterest/boards", json={"name": "x"}, headers=headers)
    assert response.status_code == 201


async def test_proxy_reads_need_no_origin_check(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """GET cannot change anything, so a foreign Origin (CORS decides who reads) passes."""
    async with run_client(settings, pinterest) as client:
        await log_in_as(client, pinterest, ALICE, ALICE_ACCESS, ALICE_REFRESH)
        pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        response = await client.get("/pinterest/boards", headers={"Origin": EVIL})
    assert response.status_code == 200


async def test_a_401_after_another_login_replaced_the_tokens_still_refreshes(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards refresh on 401 when the row changed for another reason.

    A second login, on another replica, replaced the tokens after this replica cached
    them, and Pinterest rejects the new token too: one refresh fixes it, so the caller
    must not get the 401. (A login on the same replica replaces its cached row at once.)
    """
    settings = make_settings(database_url)
    async with (
        browsers(settings, pinterest, 1) as [laptop],
        browsers(settings, pinterest, 1) as [phone],
    ):
        await log_in_as(laptop, pinterest, ALICE, "pina_FIRST", "pinr_FIRST")
        assert (await laptop.get("/me")).status_code == 200  # the laptop caches this row
        await log_in_as(phone, pinterest, ALICE, "pina_SECOND", "pinr_SECOND")
        token = pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_THIRD", "pinr_THIRD"))
        boards = pinterest.get(f"{API}/boards").mock(
            side_effect=lambda request: httpx.Response(
                200 if request.headers["authorization"] == "Bearer pina_THIRD" else 401,
                json={"items": []} if "THIRD" in request.headers["authorization"] else {"code": 2},
            )
        )

        response = await laptop.get("/pinterest/boards")

    assert response.status_code == 200
    assert bearers(boards) == ["Bearer pina_FIRST", "Bearer pina_SECOND", "Bearer pina_THIRD"]
    assert token.call_count == 1
    assert "refresh_token=pinr_SECOND" in token.calls.last.request.content.decode()
