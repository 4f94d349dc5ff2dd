"""Upgrades keep every connection, token and session of a database at an older head."""

from __future__ import annotations

import asyncio
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
