"""Database outages: 503 `database_unavailable` with Retry-After for every request that needs
the database, one log line when an outage starts and one when it ends, no traceback for
it, and no SQL parameter in any log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.app import create_app
from pinauth.db import create_engine
from pinauth.logs import JsonFormatter
from pinauth.migrations import upgrade_to_head
from pinauth.outage import OutageTracker
from tests.helpers import (
    ACCESS_2,
    API,
    REFRESH_2,
    TOKEN_URL,
    PrivatePostgres,
    captured_logs,
    events,
    live_server,
    log_in,
    make_settings,
    run_client,
    sandbox_login,
    sandboxed_pinauth,
    stored_tokens,
    token_json,
)

# Every Fernet token starts so: an encrypted token at rest, as it travels in SQL parameters.
FERNET_PREFIX = "gAAAAA"
STARTED, ENDED = "database outage started", "database outage ended"
# What each client sends while the database is down, per route.
PER_ROUTE = 20
ROUTES = ("/me", "/pinterest/boards", "/auth/login")


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print a measured number in the test output, even when pytest captures it."""
    with capsys.disabled():
        print(f"\n    {line}")


def assert_refused(responses: list[httpx.Response]) -> None:
    for response in responses:
        assert response.status_code == 503, (response.request.url, response.text)
        assert response.json()["error"] == "database_unavailable"
        assert int(response.headers["retry-after"]) >= 1


async def stored_secrets(database_url: str) -> list[str]:
    """The values pinauth sends as SQL parameters: session hashes and encrypted tokens."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as db:
            hashes = (await db.execute(text("SELECT id_hash FROM sessions"))).scalars().all()
            tokens = (
                await db.execute(
                    text("SELECT access_token_encrypted, refresh_token_encrypted FROM connections")
                )
            ).one()
    finally:
        await engine.dispose()
    return [*hashes, *tokens]


async def concurrently(base: str, cookies: httpx.Cookies, routes: tuple[str, ...]) -> Any:
    limits = httpx.Limits(max_connections=len(routes))
    async with httpx.AsyncClient(
        base_url=base, cookies=cookies, timeout=30, limits=limits
    ) as client:
        return await asyncio.gather(*(client.get(route) for route in routes))


@pytest.fixture
def private_database(private_postgres: PrivatePostgres) -> str:
    """A migrated database on this test's own PostgreSQL server."""
    url = private_postgres.create_database("pinauth")
    upgrade_to_head(url)
    return url


def test_postgres_stopped_and_started_under_real_processes(
    private_postgres: PrivatePostgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards the outage contract end to end, with `pinauth serve` and `pinauth sandbox` as
    real processes and PostgreSQL stopped, then started: concurrent requests to /me,
    /pinterest/boards (session not cached) and /auth/login all get 503 database_unavailable
    with Retry-After, the log says "outage started" once and "outage ended" once with the
    count, with no traceback and none of the SQL parameters (session hash, encrypted tokens)."""
    database_url = private_postgres.create_database("pinauth")
    rig = sandboxed_pinauth(
        tmp_path,
        database_url,
        "/readyz",
        PINAUTH_CACHE_TTL="0",  # every request reads its session from the database
    )
    sandbox, service, base, sandbox_url = rig.sandbox, rig.service, rig.base, rig.sandbox_url
    routes = ROUTES * PER_ROUTE
    try:
        sandbox.start()
        service.start()
        with httpx.Client(timeout=30) as browser:
            sandbox_login(browser, base, sandbox_url)
            assert browser.get(f"{base}/pinterest/boards").status_code == 200
            secrets = asyncio.run(stored_secrets(database_url))

            private_postgres.stop()
            responses = asyncio.run(concurrently(base, browser.cookies, routes))
            during = service.log_lines()
            private_postgres.start()
            after = [browser.get(f"{base}{route}") for route in ROUTES]
        exit_status = service.terminate()
    finally:
        service.kill()
        sandbox.kill()

    assert_refused(responses)
    assert [r.status_code for r in after] == [200, 200, 302]
    assert exit_status in (0, -signal.SIGTERM)
    output = service.output()
    lines = service.log_lines()
    started = [line for line in lines if STARTED in line["event"]]
    ended = [line for line in lines if ENDED in line["event"]]
    assert len([line for line in during if STARTED in line["event"]]) == 1
    assert not [line for line in during if ENDED in line["event"]]
    assert len(started) == 1
    assert "ConnectionRefusedError" in started[0]["cause"]
    assert len(ended) == 1
    assert ended[0]["refused_requests"] == len(routes)
    tracebacks = output.count("Traceback")
    assert tracebacks == 0
    assert not [line for line in lines if "exception" in line]
    # Nothing else worth a warning: no error line per request, no pool noise.
    loud = [line for line in lines if line["level"] in ("warning", "error", "critical")]
    assert loud == [*started, *ended]
    leaked = [secret for secret in secrets if secret in output]
    assert leaked == []
    assert FERNET_PREFIX not in output
    retry_after = {r.headers["retry-after"] for r in responses}
    report(
        capsys,
        f"PostgreSQL stopped: {len(routes)} concurrent requests ({PER_ROUTE} each to "
        f"{', '.join(ROUTES)}) -> {sum(r.status_code == 503 for r in responses)} x 503 "
        f"database_unavailable, Retry-After {'/'.join(sorted(retry_after))}, "
        f"{sum(r.status_code == 500 for r in responses)} x 500; log: {len(started)} "
        f"'outage started', {len(ended)} 'outage ended' (refused_requests="
        f"{ended[0]['refused_requests']}, {ended[0]['outage_seconds']} s), {tracebacks} "
        f"tracebacks, {len(leaked)} of {len(secrets)} SQL-parameter canaries logged",
    )


async def test_database_stopped_during_a_token_refresh_keeps_the_tokens_and_logs_none(
    private_postgres: PrivatePostgres,
    private_database: str,
    pinterest: respx.MockRouter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Guards the measured leak and loss: PostgreSQL stops while the refresh waits for
    Pinterest, so the write of the new encrypted tokens fails on a dead connection. The
    process keeps the new pair and answers with it (no 500), stores it once the database
    is back, and no token, ciphertext or traceback is logged."""
    settings = make_settings(private_database, cache_ttl_seconds=0)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held_token_answer(_request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

    with captured_logs() as logs:
        async with run_client(settings, pinterest) as client:
            await log_in(client, pinterest)
            pinterest.post(TOKEN_URL).mock(side_effect=held_token_answer)
            refresh = asyncio.create_task(client.post("/auth/refresh"))
            await arrived.wait()
            await asyncio.to_thread(private_postgres.stop)
            release.set()
            response = await refresh
            await asyncio.to_thread(private_postgres.start)
            me = await client.get("/me")
        # The lifespan's shutdown waited for the write that was still pending.
        stored_access, stored_refresh, _ = await stored_tokens(settings)

    assert response.status_code == 200, response.text
    assert me.status_code == 200
    assert (stored_access, stored_refresh) == (ACCESS_2, REFRESH_2)
    output = logs.getvalue()
    for secret in (ACCESS_2, REFRESH_2, FERNET_PREFIX, "Traceback"):
        assert secret not in output, f"{secret!r} was logged"
    assert len(events(logs, STARTED)) <= 1
    report(
        capsys,
        f"PostgreSQL stopped during a held token answer: client got {response.status_code}, "
        f"new pair stored after restart: {stored_access == ACCESS_2}; log: "
        f"{output.count('Traceback')} tracebacks, {output.count(FERNET_PREFIX)} ciphertexts",
    )


@pytest.fixture
def sqlite_volume(tmp_path: Path) -> Path:
    """A directory holding a migrated SQLite database, as a mounted volume would."""
    volume = tmp_path / "volume"
    volume.mkdir()
    upgrade_to_head(f"sqlite+aiosqlite:///{volume / 'pinauth.db'}")
    return volume


async def test_sqlite_file_out_of_reach_is_a_503_until_it_is_back(
    sqlite_volume: Path, pinterest: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards the SQLite side of the outage contract: with the database's directory gone
    (an unmounted volume), every connection pinauth opens fails (SQLITE_CANTOPEN), and
    requests get 503 database_unavailable, one log line each way, no traceback.

    The service is started after the login, as a restarted process would be: connections
    a running process already holds keep the file open and go on working (see README)."""
    url = f"sqlite+aiosqlite:///{sqlite_volume / 'pinauth.db'}"
    # More requests than the pool has connections: the rest wait for one this long.
    settings = make_settings(url, cache_ttl_seconds=0, database_timeout_seconds=0.5)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        cookies = client.cookies
    away = sqlite_volume.with_name("unmounted")

    pinterest.get(f"{API}/boards").respond(200, json={"items": []})
    with captured_logs() as logs:
        async with run_client(settings, pinterest) as client:
            client.cookies = cookies
            sqlite_volume.rename(away)
            try:
                responses = await asyncio.gather(*(client.get(r) for r in ROUTES * PER_ROUTE))
            finally:
                away.rename(sqlite_volume)
            after = [await client.get(route) for route in ROUTES]

    assert_refused(responses)
    assert [r.status_code for r in after] == [200, 200, 302]
    output = logs.getvalue()
    assert "Traceback" not in output
    [started] = events(logs, STARTED)
    assert "SQLITE_CANTOPEN" in started["cause"]
    [ended] = events(logs, ENDED)
    assert ended["refused_requests"] == len(responses)
    report(
        capsys,
        f"SQLite directory gone: {len(responses)} concurrent requests -> "
        f"{sum(r.status_code == 503 for r in responses)} x 503 database_unavailable; log: "
        f"1 'outage started' ({started['cause']}), 1 'outage ended' "
        f"(refused_requests={ended['refused_requests']}), {output.count('Traceback')} tracebacks",
    )


async def test_no_free_connection_within_the_timeout_is_a_503(
    sqlite_volume: Path, pinterest: respx.MockRouter
) -> None:
    """Guards the pool's side: when every pooled connection is busy (here, all waiting on
    another process's SQLite write lock) for PINAUTH_DATABASE_TIMEOUT, the requests queued
    behind them get 503 database_unavailable instead of a 500; the rest finish normally.
    A busy database is no outage: nothing is logged beyond each request's access line."""
    path = sqlite_volume / "pinauth.db"
    settings = make_settings(f"sqlite+aiosqlite:///{path}", database_timeout_seconds=0.5)
    other_process = sqlite3.connect(path, isolation_level=None)
    try:
        with captured_logs() as logs:
            async with run_client(settings, pinterest) as client:
                # The first connection puts the file in WAL mode, where writers queue for
                # the lock (SQLite's busy wait) holding their pooled connections.
                assert (await client.get("/auth/login")).status_code == 302
                other_process.execute("BEGIN IMMEDIATE")  # holds the write lock
                logins = [asyncio.create_task(client.get("/auth/login")) for _ in range(30)]
                done, _ = await asyncio.wait(logins, return_when=asyncio.FIRST_COMPLETED)
                first = next(iter(done)).result()
                other_process.execute("ROLLBACK")
                responses = await asyncio.gather(*logins)
    finally:
        other_process.close()

    assert first.status_code == 503
    assert first.json()["error"] == "database_unavailable"
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {302, 503}, statuses
    assert not events(logs, STARTED)
    assert "Traceback" not in logs.getvalue()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers, like a hung database host."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


async def test_a_database_that_never_answers_is_a_503_after_the_timeout(
    silent_port: int, pinterest: respx.MockRouter
) -> None:
    """Guards PINAUTH_DATABASE_TIMEOUT and the translation of connect timeouts: a request
    waits that long (asyncpg's own default is 60 s), then gets 503 database_unavailable."""
    settings = make_settings(
        f"postgresql+asyncpg://pinauth@127.0.0.1:{silent_port}/none", database_timeout_seconds=0.5
    )
    with captured_logs() as logs:
        async with run_client(settings, pinterest) as client:
            started = time.monotonic()
            login = await client.get("/auth/login")
            waited = time.monotonic() - started
            ready = await client.get("/readyz")

    assert login.status_code == 503
    assert login.json()["error"] == "database_unavailable"
    assert 0.4 < waited < 5
    assert ready.status_code == 503
    assert ready.json()["error"] == "not_ready"
    [started_line] = events(logs, STARTED)
    assert "TimeoutError" in started_line["cause"]
    assert "Traceback" not in logs.getvalue()


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


async def test_a_broken_schema_is_still_a_500_with_a_traceback(
    own_database: str, pinterest: respx.MockRouter
) -> None:
    """Guards the line between "unavailable" and "wrong": a missing table is no outage, so
    it stays a 500 with its traceback logged (no "outage started"), and that traceback
    still carries no SQL parameter (here, the session hash)."""
    settings = make_settings(own_database, cache_ttl_seconds=0)
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    with captured_logs() as logs:
        # A real server: in-process transports re-raise the error instead of answering 500.
        async with live_server(app) as base, httpx.AsyncClient(base_url=base) as client:
            await log_in(client, pinterest)
            [session_hash, *_] = await stored_secrets(own_database)
            engine = create_async_engine(own_database)
            try:
                async with engine.begin() as db:
                    await db.execute(text("DROP TABLE sessions"))
            finally:
                await engine.dispose()
            response = await client.get("/me")

    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    [unhandled] = events(logs, "unhandled error")
    assert "Traceback" in unhandled["exception"]
    assert "sessions" in unhandled["exception"]  # the SQL is kept, its parameters are not
    assert not events(logs, STARTED)
    assert session_hash not in logs.getvalue()


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


async def test_a_statement_from_before_the_failure_does_not_end_the_outage(
    tmp_path: Path,
) -> None:
    """Guards the outage log's "once": a statement that was already running when the
    database failed, and then succeeds, says nothing about now; letting it end the outage
    would log an end, and a new start at the next failure, for every such straggler. A
    statement begun after the failure does end it."""
    engine = create_engine(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'tracker.db'}"))
    tracker = OutageTracker()
    tracker.watch(engine)

    def fail_elsewhere() -> int:
        # SQLite calls this in the middle of the statement: another connection fails then.
        tracker.failed(ConnectionResetError(104, "Connection reset by peer"))
        return 1

    @event.listens_for(engine.sync_engine, "connect")
    def register(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("fail_elsewhere", 0, fail_elsewhere)

    with captured_logs() as logs:
        try:
            async with engine.connect() as db:
                await db.execute(text("SELECT fail_elsewhere()"))
                down_after_straggler = tracker.down
                await db.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    assert down_after_straggler
    assert not tracker.down
    assert len(events(logs, STARTED)) == 1
    assert len(events(logs, ENDED)) == 1


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
