"""Run the Alembic migrations that ship with pinauth."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

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
    command.upgrade(alembic_config(database_url), "head")


def schema_head() -> str:
    """The newest revision this code ships (what a ready database must be at)."""
    script = ScriptDirectory(str(_script_location()))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("the migrations have no head revision")
    return head
