"""No SQL parameter in any log: pinauth's engine hides them in error messages, and the log
formatter withholds the driver messages that quote them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.db import create_engine
from pinauth.logs import JsonFormatter
from pinauth.migrations import upgrade_to_head
from tests.conftest import make_settings
from tests.helpers import PrivatePostgres


@pytest.fixture(params=["sqlite", "postgresql"])
def own_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database this test may break: a SQLite file, or on a private server."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    else:
        server: PrivatePostgres = request.getfixturevalue("private_postgres")
        url = server.create_database("pinauth")
    upgrade_to_head(url)
    return url


async def failing_statements(engine: Any, canary: str) -> list[DBAPIError]:
    """Real driver errors from statements that carry `canary` as a parameter."""
    statements = ["INSERT INTO no_such_table (x) VALUES (:p)"]
    if engine.dialect.name == "postgresql":
        # asyncpg quotes the value it could not encode, and so does the ValueError under it.
        statements.append("SELECT CAST(:p AS UUID)")
    errors: list[DBAPIError] = []
    for statement in statements:
        with pytest.raises(DBAPIError) as caught:
            async with engine.connect() as db:
                await db.execute(text(statement), {"p": canary})
        errors.append(caught.value)
    return errors


async def test_tracebacks_withhold_sql_parameters(own_database: str) -> None:
    """Guards the log formatter: a traceback keeps its frames and SQL, but not the messages
    in which drivers and SQLAlchemy quote parameters, even from an engine configured
    without hide_parameters."""
    canary = "CANARY-5e1f0a"
    engine = create_async_engine(own_database)
    try:
        errors = await failing_statements(engine, canary)
    finally:
        await engine.dispose()
    for error in errors:
        assert canary in str(error) or canary in str(error.orig)  # the hazard is real
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", (), None)
        record.exc_info = (type(error), error, error.__traceback__)
        entry = json.loads(JsonFormatter().format(record))
        assert canary not in entry["exception"]
        assert entry["exception"].startswith("Traceback")
        assert "[SQL: " in entry["exception"]


async def test_pinauths_engine_keeps_parameters_out_of_error_messages(own_database: str) -> None:
    """Guards hide_parameters on pinauth's engine: a database error's text, wherever it is
    shown, lists the SQL but not the values sent with it."""
    canary = "CANARY-91c3d2"
    engine = create_engine(make_settings(own_database))
    try:
        errors = await failing_statements(engine, canary)
    finally:
        await engine.dispose()
    assert canary not in str(errors[0])
    assert "[SQL parameters hidden" in str(errors[0])


LIBRARY_ERROR = """
import asyncio, logging, logging.config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from pinauth.logs import logging_config

logging.config.dictConfig(logging_config("info", "json"))

async def main():
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        async with engine.connect() as db:
            await db.execute(text("INSERT INTO no_such_table VALUES (:p)"), {"p": "CANARY-77ab"})
    except Exception:
        # As SQLAlchemy's pool logs a failed reset: its own logger, with the traceback.
        logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool").error(
            "Exception during reset or similar", exc_info=True
        )
    finally:
        await engine.dispose()

asyncio.run(main())
"""


def test_other_libraries_log_through_the_same_formatter() -> None:
    """Guards the root logger in logs.logging_config: an error another library logs (here
    SQLAlchemy's pool, with a traceback that quotes a parameter) comes out as pinauth's
    JSON, parameters withheld, not through Python's bare last-resort handler."""
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY_ERROR], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    [entry] = [json.loads(line) for line in result.stderr.splitlines()]
    assert entry["logger"] == "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"
    assert entry["exception"].startswith("Traceback")
    assert "CANARY-77ab" not in result.stderr
