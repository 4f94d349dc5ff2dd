"""Every filter of the connections list reads an index range in key order.

Plans, not timings (those are `make bench`'s): the repository's own statements, with
EXPLAIN QUERY PLAN on SQLite and EXPLAIN on PostgreSQL after ANALYZE, over enough rows
that PostgreSQL would rather use an index than read the table.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Select, insert, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.models import Connection, ConnectionStatus
from pinauth.repository import ConnectionRepository

ROWS = 4_000
END_USERS = 2_000


def _rows() -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [
        {
            "public_id": f"conn_plan{i}",
            "end_user_id": f"user_{i % END_USERS}",
            "pinterest_user_id": str(i),
            "username": f"pinner_{i}",
            "scopes": "boards:read",
            "access_token_encrypted": "not-a-real-ciphertext",
            "access_token_expires_at": now + timedelta(days=30),
            "status": (
                ConnectionStatus.REAUTHORIZATION_REQUIRED
                if i % 100 == 0
                else ConnectionStatus.ACTIVE
            ),
            "version": 1,
        }
        for i in range(ROWS)
    ]


def _plans(database_url: str, statements: dict[str, Select[Connection]]) -> dict[str, str]:
    async def run() -> dict[str, str]:
        engine = create_async_engine(database_url)
        try:
            async with engine.begin() as db:
                await db.execute(insert(Connection), _rows())
            plans = {}
            async with engine.connect() as db:
                postgres = engine.dialect.name == "postgresql"
                if postgres:
                    await db.exec_driver_sql("ANALYZE connections")
                for name, stmt in statements.items():
                    sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
                    explain = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
                    rows = (await db.exec_driver_sql(explain + sql)).all()
                    plans[name] = "\n".join(str(part) for row in rows for part in row)
            return plans
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _indexes(database_url: str) -> dict[str, list[str | None]]:
    async def run() -> dict[str, list[str | None]]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as db:
                found = await db.run_sync(lambda c: inspect(c).get_indexes("connections"))
        finally:
            await engine.dispose()
        return {str(index["name"]): list(index["column_names"]) for index in found}

    return asyncio.run(run())


def test_the_migrations_create_the_list_indexes(database_url: str) -> None:
    indexes = _indexes(database_url)
    assert indexes["ix_connections_end_user_id_id"] == ["end_user_id", "id"]
    assert indexes["ix_connections_status_id"] == ["status", "id"]
    assert indexes["ix_connections_end_user_id_status_id"] == ["end_user_id", "status", "id"]


def test_every_list_filter_uses_an_index(database_url: str) -> None:
    page = ConnectionRepository.page_query
    rare = ConnectionStatus.REAUTHORIZATION_REQUIRED
    plans = _plans(
        database_url,
        {
            "end_user": page(limit=51, end_user_id="user_7"),
            "end_user_after": page(limit=51, end_user_id="user_7", after=7),
            "end_user_status": page(limit=51, end_user_id="user_7", status=rare),
            "end_user_status_after": page(limit=51, end_user_id="user_7", status=rare, after=7),
            "status": page(limit=101, status=rare, after=ROWS // 2),
            "all": page(limit=101, after=ROWS // 2),
        },
    )
    if database_url.startswith("postgresql"):
        for name, plan in plans.items():
            assert "Seq Scan" not in plan, (name, plan)
        # An end user's few rows may be sorted after a bitmap scan; a page of everyone
        # must come in key order from the index.
        for name in ("status", "all"):
            assert "Sort" not in plans[name], (name, plans[name])
        # With statistics PostgreSQL picks whichever index led by end_user_id is cheapest
        # (for two rows, even the unique one); what matters is that it seeks by it.
        for name in ("end_user", "end_user_after", "end_user_status", "end_user_status_after"):
            assert re.search(r"Index Cond: \(+end_user_id\)::text = 'user_7'", plans[name]), (
                name,
                plans[name],
            )
        assert "ix_connections_status_id" in plans["status"], plans["status"]
        assert "pk_connections" in plans["all"], plans["all"]
        return
    # SQLite keeps no statistics, so its choice is the same at 4,000 rows as at 100,000:
    # without (end_user_id, status, id) it walks the status index instead.
    for name, plan in plans.items():
        assert "SCAN" not in plan, (name, plan)
        assert "TEMP B-TREE" not in plan, (name, plan)
    assert "ix_connections_end_user_id_id (end_user_id=?)" in plans["end_user"]
    assert "ix_connections_end_user_id_id (end_user_id=? AND id>?)" in plans["end_user_after"]
    assert (
        "ix_connections_end_user_id_status_id (end_user_id=? AND status=?)"
        in (plans["end_user_status"])
    )
    assert (
        "ix_connections_end_user_id_status_id (end_user_id=? AND status=? AND id>?)"
        in (plans["end_user_status_after"])
    )
    assert "ix_connections_status_id (status=? AND id>?)" in plans["status"]
    assert "INTEGER PRIMARY KEY (rowid>?)" in plans["all"]


@pytest.mark.parametrize("status", [None, ConnectionStatus.ACTIVE])
def test_the_common_status_alone_never_sorts(
    database_url: str, status: ConnectionStatus | None
) -> None:
    # Most connections are active: either the status index or the key order is fine, a
    # sort of all of them is not.
    plan = _plans(database_url, {"p": ConnectionRepository.page_query(limit=101, status=status)})[
        "p"
    ]
    assert "Sort" not in plan, plan
    assert "TEMP B-TREE" not in plan, plan
