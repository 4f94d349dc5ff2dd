"""Processes starting together on one fresh database all migrate it, and all succeed."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from pinauth.migrations import schema_head, sqlite_lock_path
from tests.helpers import POSTGRES_ADMIN_URL, new_postgres_database

ROUNDS = 3
PROCESSES = 3


@contextmanager
def fresh_database(tmp_path: Path, round_: int) -> Iterator[str]:
    """A database nobody has migrated: a new SQLite file, or (in the PostgreSQL run) a
    new PostgreSQL database, where the advisory lock in alembic/env.py is what is tested."""
    if POSTGRES_ADMIN_URL:
        with new_postgres_database("pinauth_migrate") as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / f'round{round_}.db'}"


# `pinauth migrate`, but imported first and started on a signal: the processes then
# migrate at the same moment, not spread out by import times on a busy machine.
MIGRATE_ON_SIGNAL = """
import sys
import aiosqlite, alembic.command, sqlalchemy.ext.asyncio, pinauth.migrations, pinauth.models
from pinauth.cli import main
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(["migrate"]))
"""


def migrate_at_once(database_url: str, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env["PINAUTH_DATABASE_URL"] = database_url
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_ON_SIGNAL],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in processes:
            output, _ = process.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, output))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_processes_migrating_one_fresh_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Guards the migration lock: `pinauth migrate` three times at once on a fresh database,
    three rounds, every process exits 0 and the schema ends at head. (Without the SQLite
    file lock, most rounds lose a process to "table connections already exists".)"""
    for round_ in range(ROUNDS):
        with fresh_database(tmp_path, round_) as url:
            results = migrate_at_once(url, tmp_path)
            failures = [r.stdout for r in results if r.returncode != 0]
            assert not failures, f"round {round_}: {failures[0][-2000:]}"
            if not POSTGRES_ADMIN_URL:
                with closing(sqlite3.connect(tmp_path / f"round{round_}.db")) as database:
                    version = database.execute("SELECT version_num FROM alembic_version")
                    assert [row[0] for row in version] == [schema_head()]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite+aiosqlite:////data/pinauth.db", "/data/pinauth.db.migrate.lock"),
        ("sqlite+aiosqlite:///./pinauth.db", "pinauth.db.migrate.lock"),
        ("sqlite:///relative/dir/x.sqlite", "relative/dir/x.sqlite.migrate.lock"),
        ("sqlite+aiosqlite:///file:/data/p.db?uri=true&mode=rwc", "/data/p.db.migrate.lock"),
        ("sqlite+aiosqlite://", None),
        ("sqlite+aiosqlite:///:memory:", None),
        ("sqlite+aiosqlite:///file:mem?mode=memory&uri=true", None),
        ("postgresql+asyncpg://u@db:5432/pinauth", None),
    ],
)
def test_the_lock_file_sits_beside_the_sqlite_file(url: str, expected: str | None) -> None:
    """Guards where the lock is taken: beside the file itself, never for memory or PostgreSQL."""
    assert sqlite_lock_path(url) == (None if expected is None else Path(expected))
