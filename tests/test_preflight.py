"""Configuration mistakes: every one reported at once, one line with its fix, before
anything exists (no database file, no migration), and never as a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from pinauth.cli import main
from tests.helpers import POSTGRES_ADMIN_URL, clean_env, free_port

GOOD = {
    "PINTEREST_CLIENT_ID": "cid",
    "PINTEREST_CLIENT_SECRET": "csecret",
    "PINTEREST_REDIRECT_URI": "https://pinauth.example.com/auth/callback",
    "PINAUTH_SECRET_KEY": "preflight-secret-" + "p" * 32,
    "PINAUTH_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
    # Relative to the test's working directory, which must stay empty.
    "PINAUTH_DATABASE_URL": "sqlite+aiosqlite:///./pinauth.db",
}

# (id, command line, settings changed from GOOD (None: unset), lines the report must have)
MISTAKES: list[tuple[str, list[str], dict[str, str | None], list[str]]] = [
    (
        "postgres-scheme",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "postgres://app:pw@db.example.com/app"},
        [
            "`postgres://` is not a driver URL pinauth can use; "
            "use `postgresql+asyncpg://app:***@db.example.com/app`"
        ],
    ),
    (
        "sqlite-without-driver",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "sqlite:///./pinauth.db"},
        ["`sqlite://` is not a driver URL pinauth can use; use `sqlite+aiosqlite:///./pinauth.db`"],
    ),
    (
        "sqlite-two-slashes",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "sqlite+aiosqlite://pinauth.db"},
        ["names no database file", "sqlite+aiosqlite:///./pinauth.db"],
    ),
    (
        "sqlite-missing-directory",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "sqlite+aiosqlite:///./data/pinauth.db"},
        ["of the SQLite database does not exist; create it (mkdir -p "],
    ),
    (
        "not-a-url",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "pinauth.db"},
        ["PINAUTH_DATABASE_URL 'pinauth.db' is not a database URL; use sqlite+aiosqlite://"],
    ),
    (
        "postgres-port-not-a-number",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "postgresql+asyncpg://app:pw@db.example.com:abc/app"},
        ["is not a database URL; use sqlite+aiosqlite://"],
    ),
    (
        "postgres-port-out-of-range",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "postgresql+asyncpg://app@127.0.0.1:99999/app"},
        ["PINAUTH_DATABASE_URL: port 99999 is not a TCP port (1 to 65535)"],
    ),
    (
        "postgres-unclosed-ipv6",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "postgresql+asyncpg://app@[::1:5432/app"},
        ["is not a database URL"],
    ),
    (
        "unsupported-database",
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "mysql://app@db/app"},
        ["pinauth supports SQLite and PostgreSQL, not 'mysql'"],
    ),
    (
        "bad-fernet-key",
        ["serve"],
        {"PINAUTH_ENCRYPTION_KEYS": "not-a-fernet-key"},
        ["PINAUTH_ENCRYPTION_KEYS: key 1 is not a Fernet key", "Fernet.generate_key()"],
    ),
    (
        "second-fernet-key-bad",
        ["serve"],
        {"PINAUTH_ENCRYPTION_KEYS": GOOD["PINAUTH_ENCRYPTION_KEYS"] + ",short"},
        ["PINAUTH_ENCRYPTION_KEYS: key 2 is not a Fernet key"],
    ),
    (
        "no-encryption-keys",
        ["serve"],
        {"PINAUTH_ENCRYPTION_KEYS": None},
        ["PINAUTH_ENCRYPTION_KEYS is missing"],
    ),
    (
        "short-secret",
        ["serve"],
        {"PINAUTH_SECRET_KEY": "short"},
        ["PINAUTH_SECRET_KEY is too short", "secrets.token_urlsafe(48)"],
    ),
    (
        "redirect-without-scheme",
        ["serve"],
        {"PINTEREST_REDIRECT_URI": "localhost:8000/auth/callback"},
        ["PINTEREST_REDIRECT_URI must be absolute and end in /auth/callback"],
    ),
    (
        "redirect-to-a-path-pinauth-does-not-serve",
        ["serve"],
        {"PINTEREST_REDIRECT_URI": "https://pinauth.example.com/oauth/done"},
        ["PINTEREST_REDIRECT_URI must be absolute and end in /auth/callback"],
    ),
    (
        "redirect-unclosed-ipv6",
        ["serve"],
        {"PINTEREST_REDIRECT_URI": "http://[::1/auth/callback"},
        ["PINTEREST_REDIRECT_URI must be absolute and end in /auth/callback"],
    ),
    (
        "redirect-port-out-of-range",
        ["serve"],
        {"PINTEREST_REDIRECT_URI": "http://localhost:99999/auth/callback"},
        ["PINTEREST_REDIRECT_URI must be absolute and end in /auth/callback"],
    ),
    (
        "redirect-with-userinfo",
        ["serve"],
        {"PINTEREST_REDIRECT_URI": "http://user:pw@localhost:8000/auth/callback"},
        ["PINTEREST_REDIRECT_URI must be absolute and end in /auth/callback"],
    ),
    (
        "frontend-url-empty",
        ["serve"],
        {"PINAUTH_FRONTEND_URL": ""},
        ["PINAUTH_FRONTEND_URL '' is neither a path on pinauth"],
    ),
    (
        "frontend-url-without-scheme",
        ["serve"],
        {"PINAUTH_FRONTEND_URL": "app.example.com:3000"},
        ["PINAUTH_FRONTEND_URL 'app.example.com:3000' is neither a path on pinauth"],
    ),
    (
        "port-out-of-range",
        ["serve", "--port", "99999"],
        {},
        ["--port 99999 is not a TCP port"],
    ),
    (
        "host-that-does-not-resolve",
        ["serve", "--host", "nohost.invalid"],
        {},
        ["--host 'nohost.invalid' is not an address of this machine"],
    ),
    (
        "no-pinterest-credentials",
        ["serve"],
        {"PINTEREST_CLIENT_ID": None, "PINTEREST_CLIENT_SECRET": None},
        ["PINTEREST_CLIENT_ID and PINTEREST_CLIENT_SECRET are not set", "pinauth serve --demo"],
    ),
    (
        "workers-on-sqlite",
        ["serve", "--workers", "2"],
        {},
        ["--workers 2 needs PostgreSQL: SQLite is a single-process database"],
    ),
    (
        "not-a-number",
        ["serve"],
        {"PINAUTH_SESSION_MAX_AGE": "a month"},
        ["PINAUTH_SESSION_MAX_AGE: Input should be a valid integer"],
    ),
    (
        "webhook-url-with-a-space-in-its-host",
        ["serve"],
        {"PINAUTH_WEBHOOK_URL": "http://exa mple.com/"},
        ["PINAUTH_WEBHOOK_URL: 'http://exa mple.com/' has no usable host name"],
    ),
    (
        "webhook-url-port-out-of-range",
        ["serve"],
        {"PINAUTH_WEBHOOK_URL": "http://127.0.0.1:99999/hook"},
        ["PINAUTH_WEBHOOK_URL: 'http://127.0.0.1:99999/hook' has no usable port"],
    ),
    (
        "keeper-interval-infinite",
        ["migrate"],  # not serve: without the check, that would serve for good
        {"PINAUTH_KEEPER_INTERVAL": "inf"},
        ["PINAUTH_KEEPER_INTERVAL: Input should be a finite number"],
    ),
    (
        "cache-ttl-not-a-number",
        ["migrate"],  # not serve: without the check, that would serve for good
        {"PINAUTH_CACHE_TTL": "nan"},
        ["PINAUTH_CACHE_TTL: Input should be a finite number"],
    ),
    (
        "log-level",
        ["migrate"],
        {"PINAUTH_LOG_LEVEL": "verbose"},
        ["PINAUTH_LOG_LEVEL 'verbose' is not a level; use one of"],
    ),
    (
        "all-at-once",
        ["serve"],
        {
            "PINAUTH_SECRET_KEY": "short",
            "PINAUTH_ENCRYPTION_KEYS": "not-a-fernet-key",
            "PINAUTH_DATABASE_URL": "postgres://app@db.example.com/app",
            "PINTEREST_REDIRECT_URI": "/auth/callback",
            "PINAUTH_CORS_ORIGINS": "https://app.example.com/",
        },
        [
            "5 problems in the configuration:",
            "PINAUTH_CORS_ORIGINS: 'https://app.example.com/' is not an origin",
            "PINAUTH_SECRET_KEY is too short",
            "PINAUTH_ENCRYPTION_KEYS: key 1 is not a Fernet key",
            "PINTEREST_REDIRECT_URI must be absolute",
            "`postgres://` is not a driver URL",
        ],
    ),
]


def env_with(changes: dict[str, str | None]) -> dict[str, str]:
    values = GOOD | changes
    return clean_env(**{k: v for k, v in values.items() if v is not None})


def problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("  - ")]


@pytest.mark.parametrize(
    ("command", "changes", "expected"),
    [pytest.param(c, ch, e, id=name) for name, c, ch, e in MISTAKES],
)
def test_each_mistake_is_reported_with_its_fix_before_anything_is_created(
    command: list[str],
    changes: dict[str, str | None],
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # where ./pinauth.db and a .env would be
    for name in [k for k in os.environ if k.startswith(("PINAUTH_", "PINTEREST_"))]:
        monkeypatch.delenv(name)
    for name, value in GOOD.items():
        monkeypatch.setenv(name, value)
    for name, change in changes.items():
        if change is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, change)

    assert main(command) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("pinauth: cannot start: "), stderr
    for text in expected:
        assert text in stderr, stderr
    # One line per problem, and no secret value among them.
    assert len(problem_lines(stderr)) == (5 if "5 problems" in expected[0] else 1), stderr
    assert GOOD["PINAUTH_SECRET_KEY"] not in stderr
    assert GOOD["PINAUTH_ENCRYPTION_KEYS"] not in stderr
    assert list(tmp_path.iterdir()) == []


def test_the_configuration_used_above_is_good(tmp_path: Path) -> None:
    """The table changes one thing at a time from a configuration that works."""
    result = subprocess.run(
        [sys.executable, "-m", "pinauth", "migrate"],
        env=env_with({}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pinauth.db").is_file()


# The real commands, as an operator runs them: exit status 2, the message, no traceback.
PROCESS_MISTAKES = [
    pytest.param(
        ["serve"],
        {
            "PINAUTH_SECRET_KEY": "short",
            "PINAUTH_ENCRYPTION_KEYS": "not-a-fernet-key",
            "PINAUTH_DATABASE_URL": "postgres://app@db.example.com/app",
        },
        ["3 problems", "too short", "not a Fernet key", "use `postgresql+asyncpg://"],
        id="serve-three-problems",
    ),
    pytest.param(
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "sqlite+aiosqlite:///./missing/dir/pinauth.db"},
        ["does not exist; create it (mkdir -p "],
        id="migrate-missing-directory",
    ),
    pytest.param(
        ["serve", "--workers", "2"],
        {},
        ["--workers 2 needs PostgreSQL"],
        id="serve-workers-on-sqlite",
    ),
    pytest.param(
        ["migrate"],
        {"PINAUTH_DATABASE_URL": "postgresql+asyncpg://app@127.0.0.1:{port}/app"},
        ["cannot reach the database at 127.0.0.1:{port}: connection refused"],
        id="migrate-unreachable-postgres",
    ),
    pytest.param(
        ["serve", "--demo", "--workers", "2"],
        {},
        ["2 problems", "--demo serves with one worker", "--workers 2 needs PostgreSQL"],
        id="demo-with-workers",
    ),
    pytest.param(
        ["api-keys", "list"],
        {"PINAUTH_DATABASE_URL": "sqlite:///./pinauth.db"},
        ["`sqlite://` is not a driver URL"],
        id="api-keys-wrong-driver",
    ),
]


@pytest.mark.parametrize(("command", "changes", "expected"), PROCESS_MISTAKES)
def test_commands_report_mistakes_without_a_traceback(
    command: list[str], changes: dict[str, str], expected: list[str], tmp_path: Path
) -> None:
    port = str(free_port())  # nothing listens there
    changes = {k: v.replace("{port}", port) for k, v in changes.items()}
    result = subprocess.run(
        [sys.executable, "-m", "pinauth", *command],
        env=env_with(dict(changes)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text.replace("{port}", port) in result.stderr, output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not POSTGRES_ADMIN_URL, reason="needs a PostgreSQL server")
def test_a_database_that_does_not_exist_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import make_url

    missing = make_url(POSTGRES_ADMIN_URL).set(database="pinauth_no_such_database")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PINAUTH_DATABASE_URL", missing.render_as_string(hide_password=False))
    assert main(["migrate"]) == 2
    assert "the database 'pinauth_no_such_database' does not exist at " in capsys.readouterr().err


def test_a_migration_that_fails_is_reported_without_a_traceback(tmp_path: Path) -> None:
    """Guards preflight.migrate: a file at the database's path that is not a SQLite
    database passes every check and fails in the migration, as one line."""
    (tmp_path / "pinauth.db").write_bytes(b"not a database, but the operator's notes\n" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "pinauth", "migrate"],
        env=env_with({}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (
        "migrating the database at ./pinauth.db failed: DatabaseError: file is not a database"
        in result.stderr
    )


def test_a_dotenv_file_that_is_not_utf8_is_named_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith(("PINAUTH_", "PINTEREST_"))]:
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_bytes("PINTEREST_CLIENT_ID=x\r\n".encode("utf-16"))

    assert main(["migrate"]) == 2
    assert "the .env file is not UTF-8 text" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [".env"]
