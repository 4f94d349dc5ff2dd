"""Run the Alembic migrations that ship with pinauth."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from filelock import FileLock

from pinauth.db import create_private_sqlite_file, sqlite_file

_PACKAGE_DIR = Path(__file__).resolve().parent


def _script_location() -> Path:
    # A wheel carries the migrations inside the package; a source checkout has them
    # at the repository root, where `alembic` on the command line finds them too.
    for candidate in (_PACKAGE_DIR / "alembic", _PACKAGE_DIR.parents[1] / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("pinauth's alembic migrations are missing from this installation")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_script_location()))
    # Alembic's ini interpolation would choke on a literal "%" in a password.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def upgrade_to_head(database_url: str) -> None:
    """Bring the schema to the newest revision. Blocking: call it outside the event loop."""
    # The first start creates the database here, before alembic's engine opens it.
    create_private_sqlite_file(database_url)
    with _sqlite_migration_lock(database_url):
        command.upgrade(alembic_config(database_url), "head")


def sqlite_lock_path(database_url: str) -> Path | None:
    """The lock file beside a SQLite database file; None for other databases or memory."""
    database = sqlite_file(database_url)
    if database is None:
        return None
    return database.with_name(database.name + ".migrate.lock")


@contextmanager
def _sqlite_migration_lock(database_url: str) -> Iterator[None]:
    """Queue processes migrating one SQLite file, as the advisory lock does on PostgreSQL.

    SQLite has no lock a migration can hold across its DDL, so two processes starting on
    a fresh file both saw no schema and both created it: one failed ("table connections
    already exists") and exited. An exclusive lock on a file beside the database makes
    the second wait; it then finds the schema at head and does nothing. The OS releases
    the lock if its holder dies, so a crash cannot wedge the next start.
    """
    path = sqlite_lock_path(database_url)
    with FileLock(path) if path is not None else nullcontext():
        yield


def schema_head() -> str:
    """The newest revision this code ships (what a ready database must be at)."""
    script = ScriptDirectory(str(_script_location()))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("the migrations have no head revision")
    return head
