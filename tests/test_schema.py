"""The Alembic migrations produce exactly the schema the models describe."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection as SyncConnection
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.models import Base


def test_migrations_match_the_models(database_url: str) -> None:
    def diff(connection: SyncConnection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    async def run() -> list[Any]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(diff)
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == []


def test_migrations_are_plain_sqlalchemy() -> None:
    # Migrations are history; importing app code would break them when the code moves on.
    for script in (Path(__file__).parents[1] / "alembic" / "versions").glob("*.py"):
        assert "pinauth" not in script.read_text(), script.name
