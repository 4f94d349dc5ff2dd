"""Upgrades keep every connection, token and session of a database at an older head."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import respx
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.crypto import CookieSigner, TokenCipher, digest
from pinauth.migrations import alembic_config, upgrade_to_head
from pinauth.settings import Settings
from tests.helpers import (
    API,
    POSTGRES_ADMIN_URL,
    bearers,
    create_api_key,
    make_settings,
    new_postgres_database,
    run_client,
)

OLD_ACCESS, OLD_REFRESH = "pina_FROM-0001-ACCESS", "pinr_FROM-0001-REFRESH"


@contextmanager
def empty_database(tmp_path: Path) -> Iterator[str]:
    if POSTGRES_ADMIN_URL:
        with new_postgres_database("pinauth_migration") as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"


async def execute(url: str, statement: str, **params: object) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(statement), params)
    finally:
        await engine.dispose()


def seed_at_0001(url: str, settings: Settings, session_id: str) -> None:
    """A connection with tokens and a browser session, written as revision 0001 stored them."""
    command.upgrade(alembic_config(url), "0001")
    cipher = TokenCipher([key.get_secret_value() for key in settings.encryption_keys])
    now = datetime.now(UTC)
    asyncio.run(
        execute(
            url,
            "INSERT INTO connections (id, pinterest_user_id, username, scopes,"
            " access_token_encrypted, refresh_token_encrypted, access_token_expires_at,"
            " refresh_token_expires_at, status, version) VALUES (7, '549755885175', 'ada',"
            " 'boards:read', :access, :refresh, :expires, :refresh_expires, 'active', 3)",
            access=cipher.encrypt(OLD_ACCESS),
            refresh=cipher.encrypt(OLD_REFRESH),
            expires=now + timedelta(days=20),
            refresh_expires=now + timedelta(days=50),
        )
    )
    asyncio.run(
        execute(
            url,
            "INSERT INTO sessions (id_hash, connection_id, expires_at) VALUES (:hash, 7, :exp)",
            hash=digest(session_id),
            exp=now + timedelta(days=1),
        )
    )


def test_upgrading_from_0001_keeps_connections_tokens_and_sessions(
    tmp_path: Path, pinterest: respx.MockRouter
) -> None:
    """Guards the public-id migration (a rebuilt table on SQLite): the old session
    still logs in, and the old token still reaches Pinterest."""

    async def use(settings: Settings) -> None:
        signer = CookieSigner(settings.secret_key.get_secret_value(), "session")
        async with run_client(settings, pinterest) as client:
            client.cookies.set("pinauth_session", signer.sign("old-session-id"))
            me = await client.get("/me")
            boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
            proxied = await client.get("/pinterest/boards")
            disconnected = await client.delete("/auth/connection")
        assert me.status_code == 200
        assert me.json()["username"] == "ada"
        assert proxied.status_code == 200
        assert bearers(boards) == [f"Bearer {OLD_ACCESS}"]
        assert disconnected.status_code == 204

    with empty_database(tmp_path) as url:
        settings = make_settings(url)
        seed_at_0001(url, settings, "old-session-id")
        upgrade_to_head(url)
        asyncio.run(use(settings))


@pytest.mark.skipif(bool(POSTGRES_ADMIN_URL), reason="SQLite's rowid reuse only")
def test_after_the_upgrade_sqlite_never_reuses_a_deleted_id(tmp_path: Path) -> None:
    """Guards AUTOINCREMENT on an upgraded (not freshly created) SQLite database."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    seed_at_0001(url, make_settings(url), "s")
    upgrade_to_head(url)

    async def delete_then_insert() -> int:
        await execute(url, "DELETE FROM connections")
        await execute(
            url,
            "INSERT INTO connections (pinterest_user_id, username, scopes,"
            " access_token_encrypted, access_token_expires_at, status, version, public_id)"
            " VALUES ('2', 'bob', '', 'x', '2030-01-01', 'active', 1, 'conn_bob')",
        )
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text("SELECT id FROM connections"))
                return int(result.scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(delete_then_insert()) > 7


def test_upgrading_from_0009_names_every_proxy_token_and_keeps_it_working(
    tmp_path: Path, pinterest: respx.MockRouter
) -> None:
    """Guards 0011: tokens minted before it get a `pt_` id of their own, keep working,
    can be revoked by it, and still die with their connection (the foreign key survives
    SQLite's table rebuild)."""
    tokens = [f"pinauth_pt_{n}" + "x" * 42 for n in range(2)]

    async def use(settings: Settings) -> None:
        found = await rows(settings.database_url, "SELECT token_hash, public_id FROM proxy_tokens")
        ids = {token_hash: public_id for token_hash, public_id in found}
        assert len(ids) == 2
        assert all(re.fullmatch(r"pt_[a-z2-7]{26}", i) for i in ids.values()), ids
        assert len(set(ids.values())) == 2
        key = await create_api_key(settings)
        backend_headers = {"Authorization": f"Bearer {key}"}
        async with run_client(settings, pinterest) as client:
            connection_id = (await client.get("/v1/connections", headers=backend_headers)).json()[
                "items"
            ][0]["id"]
            pinterest.get(f"{API}/boards").respond(200, json={"items": []})
            before = [
                (await client.get("/pinterest/boards", headers={"Authorization": f"Bearer {t}"}))
                for t in tokens
            ]
            revoked = await client.delete(
                f"/v1/connections/{connection_id}/proxy-tokens/{ids[digest(tokens[0])]}",
                headers=backend_headers,
            )
            after = await client.get(
                "/pinterest/boards", headers={"Authorization": f"Bearer {tokens[0]}"}
            )
            deleted = await client.delete(
                f"/v1/connections/{connection_id}", headers=backend_headers
            )
        assert [r.status_code for r in before] == [200, 200]
        assert revoked.status_code == 204
        assert after.status_code == 401
        assert deleted.status_code == 204
        assert await rows(settings.database_url, "SELECT token_hash FROM proxy_tokens") == []

    with empty_database(tmp_path) as url:
        settings = make_settings(url)
        seed_at_0001(url, settings, "s")
        command.upgrade(alembic_config(url), "0009")
        for token in tokens:
            asyncio.run(
                execute(
                    url,
                    "INSERT INTO proxy_tokens (token_hash, connection_id, expires_at)"
                    " VALUES (:hash, 7, :expires)",
                    hash=digest(token),
                    expires=datetime.now(UTC) + timedelta(hours=1),
                )
            )
        upgrade_to_head(url)
        asyncio.run(use(settings))


async def rows(url: str, statement: str) -> list[tuple[str, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return [tuple(row) for row in (await connection.execute(text(statement))).all()]
    finally:
        await engine.dispose()
