"""Configuration checks that run before a command creates anything.

An operator's mistake should cost one start, not one start per mistake: every problem
is collected (settings pydantic refuses, missing or malformed secrets, a database URL
that names the wrong driver, a SQLite directory that does not exist, a PostgreSQL
server that cannot be reached) and reported together, one line each, saying what to
do. Nothing is created until the list is empty: no SQLite file, no migration.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from cryptography.fernet import Fernet
from pydantic import ValidationError
from pydantic_core import PydanticUndefined
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pinauth.errors import ConfigurationError
from pinauth.settings import Settings

# "maintenance": commands that read or rewrite stored rows (rotate-keys, webhooks,
# connections) and so need the encryption keys, not Pinterest's credentials.
Command = Literal["serve", "keeper", "migrate", "api-keys", "maintenance"]

SQLITE_DRIVER = "sqlite+aiosqlite"
POSTGRES_DRIVER = "postgresql+asyncpg"
URL_EXAMPLES = (
    f"{SQLITE_DRIVER}:///./pinauth.db or {POSTGRES_DRIVER}://user:password@host:5432/database"
)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
CALLBACK_PATH = "/auth/callback"


def load_settings(
    settings_factory: Callable[..., Settings] = Settings,
) -> tuple[Settings, list[str]]:
    """The settings, and what pydantic refused in them.

    A refused value is replaced by its default so that the other checks still run and
    report their problems in the same message.
    """
    try:
        return settings_factory(), []
    except UnicodeDecodeError:
        raise ConfigurationError(
            "the .env file is not UTF-8 text (saved as UTF-16 by an editor?); save it as UTF-8"
        ) from None
    except ValidationError as e:
        problems: list[str] = []
        replaced: dict[str, Any] = {}
        names = {
            str(field.validation_alias or name): name
            for name, field in Settings.model_fields.items()
        }
        for error in e.errors():
            variable = str(error["loc"][0]) if error["loc"] else "configuration"
            message = error["msg"].removeprefix("Value error, ")
            name = names.get(variable)
            field = Settings.model_fields[name] if name is not None else None
            # A secret's value never reaches the terminal or a log collector.
            secret = field is not None and "SecretStr" in repr(field.annotation)
            shown = "" if secret else f" (got {_shown(error.get('input'))})"
            problems.append(f"{variable}: {message}{shown}")
            if name is not None and field is not None:
                default = field.default
                if default is PydanticUndefined and field.default_factory is not None:
                    default = field.default_factory()  # type: ignore[call-arg]
                replaced[name] = default
        try:
            return settings_factory(**replaced), problems
        except ValidationError:
            # Only if a default itself is refused, which a test of the defaults rules out.
            raise ConfigurationError(_report(problems)) from None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def problems(
    settings: Settings, command: Command, *, demo: bool = False, workers: int = 1
) -> list[str]:
    """Everything wrong with `settings` for `command`, one fix per line."""
    found: list[str] = []
    if command in ("serve", "keeper"):
        if not demo and (not settings.client_id or not settings.client_secret.get_secret_value()):
            found.append(
                "PINTEREST_CLIENT_ID and PINTEREST_CLIENT_SECRET are not set: set them to your "
                "Pinterest app's credentials"
                + (
                    ", or run `pinauth serve --demo` to try pinauth against its built-in sandbox"
                    if command == "serve"
                    else " (the keeper refreshes tokens at Pinterest)"
                )
            )
    if command in ("serve", "keeper"):
        found += settings_problems(settings)
    elif command == "maintenance":
        found += encryption_key_problems(settings)
    if settings.log_level.lower() not in LOG_LEVELS:
        found.append(
            f"PINAUTH_LOG_LEVEL {settings.log_level!r} is not a level; "
            f"use one of {', '.join(LOG_LEVELS)}"
        )
    found += database_problems(settings, workers=workers)
    return found


def settings_problems(settings: Settings) -> list[str]:
    """The secrets, the redirect URI and the log level: what serving needs right."""
    found = settings.serving_problems()
    found += encryption_key_problems(settings, missing_reported=True)
    redirect = _split(settings.redirect_uri)
    if (
        redirect is None
        or redirect.scheme not in ("http", "https")
        or redirect.username is not None
        or not _port_ok(redirect)
        or not redirect.hostname
        or not redirect.path.endswith(CALLBACK_PATH)
        or redirect.query
        or redirect.fragment
    ):
        found.append(
            f"PINTEREST_REDIRECT_URI must be absolute and end in {CALLBACK_PATH}, e.g. "
            f"https://pinauth.example.com{CALLBACK_PATH} (got {settings.redirect_uri!r}); "
            "register the same URI in your Pinterest app"
        )
    found += frontend_problems(settings)
    return found


def encryption_key_problems(settings: Settings, *, missing_reported: bool = False) -> list[str]:
    """PINAUTH_ENCRYPTION_KEYS: present, and every key a Fernet key."""
    found: list[str] = []
    if not settings.encryption_keys and not missing_reported:
        found.append(
            "PINAUTH_ENCRYPTION_KEYS is missing: stored tokens are encrypted with it. "
            "Generate a key with: python -c "
            '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        )
    for position, key in enumerate(settings.encryption_keys, start=1):
        try:
            Fernet(key.get_secret_value().encode())
        except (ValueError, TypeError):
            found.append(
                f"PINAUTH_ENCRYPTION_KEYS: key {position} is not a Fernet key (32 url-safe "
                "base64-encoded bytes); generate one with: python -c "
                '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
            )
    return found


def frontend_problems(settings: Settings) -> list[str]:
    """PINAUTH_FRONTEND_URL: where failed logins are sent, so it must be somewhere."""
    value = settings.frontend_url
    parts = _split(value)
    if value.startswith("/") and not value.startswith("//"):
        return []
    if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
        if _port_ok(parts) and parts.username is None:
            return []
    return [
        f"PINAUTH_FRONTEND_URL {value!r} is neither a path on pinauth (starting with /) nor "
        "an absolute http(s) URL such as https://app.example.com/; a failed login is "
        "sent there"
    ]


def listen_problems(host: str, port: int) -> list[str]:
    """`--host` and `--port`: what uvicorn would only find out after the migration."""
    found: list[str] = []
    if not 0 <= port < 65536:
        found.append(f"--port {port} is not a TCP port; use 1 to 65535 (0: any free port)")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        found.append(f"--host {host!r} is not an address of this machine or a name that resolves")
    return found


def _split(value: str) -> SplitResult | None:
    try:
        return urlsplit(value)
    except ValueError:  # an unclosed IPv6 bracket
        return None


def _port_ok(parts: SplitResult) -> bool:
    try:
        parts.port  # noqa: B018 (reading it validates it)
    except ValueError:  # not a number, or out of range
        return False
    return True


def _shown_url(raw: str) -> str:
    # A password in a URL that does not even parse is not shown either.
    scheme, sep, rest = raw.partition("://")
    if sep and "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def database_problems(settings: Settings, *, workers: int = 1) -> list[str]:
    """The database URL's problems; a PostgreSQL server is also asked whether it answers."""
    raw = settings.database_url
    try:
        url = make_url(raw)
        port = url.port
    except (ArgumentError, ValueError):
        # ValueError: a port that is not a number, or an unclosed IPv6 bracket.
        return [
            f"PINAUTH_DATABASE_URL {_shown_url(raw)!r} is not a database URL; use {URL_EXAMPLES}"
        ]
    if port is not None and not 0 < port < 65536:
        return [f"PINAUTH_DATABASE_URL: port {port} is not a TCP port (1 to 65535)"]
    backend = url.get_backend_name()
    shown = url.render_as_string(hide_password=True)
    if backend == "sqlite":
        found = _sqlite_problems(url, shown)
        if workers > 1:
            found.append(
                f"--workers {workers} needs PostgreSQL: SQLite is a single-process database; "
                f"set PINAUTH_DATABASE_URL={POSTGRES_DRIVER}://… or serve with one worker"
            )
        return found
    if backend in ("postgres", "postgresql"):
        if url.drivername != POSTGRES_DRIVER:
            fixed = url.set(drivername=POSTGRES_DRIVER).render_as_string(hide_password=True)
            return [
                f"PINAUTH_DATABASE_URL: `{url.drivername}://` is not a driver URL pinauth "
                f"can use; use `{fixed}`"
            ]
        if not url.host:
            return [
                f"PINAUTH_DATABASE_URL {shown!r} names no host; use "
                f"{POSTGRES_DRIVER}://user:password@host:5432/database"
            ]
        unreachable = asyncio.run(postgres_unreachable(raw, settings.database_timeout_seconds))
        return [unreachable] if unreachable else []
    return [
        f"PINAUTH_DATABASE_URL: pinauth supports SQLite and PostgreSQL, not "
        f"{url.drivername!r}; use {URL_EXAMPLES}"
    ]


def _sqlite_problems(url: URL, shown: str) -> list[str]:
    found: list[str] = []
    if url.drivername != SQLITE_DRIVER:
        fixed = url.set(drivername=SQLITE_DRIVER).render_as_string(hide_password=True)
        found.append(
            f"PINAUTH_DATABASE_URL: `{url.drivername}://` is not a driver URL pinauth can "
            f"use; use `{fixed}`"
        )
    database = url.database or ""
    if url.query.get("uri") == "true":
        database = urlsplit(database.removeprefix("file:")).path
    if url.host or database in ("", ":memory:") or url.query.get("mode") == "memory":
        found.append(
            f"PINAUTH_DATABASE_URL {shown!r} names no database file (an in-memory database "
            f"forgets everything); use {SQLITE_DRIVER}:///./pinauth.db for a path relative "
            f"to the working directory or {SQLITE_DRIVER}:////data/pinauth.db for an "
            "absolute one"
        )
        return found
    path = Path(database)
    directory = path.parent.resolve()
    if not directory.is_dir():
        found.append(
            f"PINAUTH_DATABASE_URL: the directory {str(directory)!r} of the SQLite database "
            f"does not exist; create it (mkdir -p {directory}) or correct the path"
        )
    elif path.is_dir():
        found.append(
            f"PINAUTH_DATABASE_URL: {str(path)!r} is a directory, not a database file; "
            f"name a file in it, e.g. {SQLITE_DRIVER}:///{path / 'pinauth.db'}"
        )
    elif not os.access(directory, os.W_OK | os.X_OK):
        found.append(
            f"PINAUTH_DATABASE_URL: pinauth cannot write to {str(directory)!r} (SQLite writes "
            "its journal beside the database); make it writable by this user"
        )
    return found


async def postgres_unreachable(database_url: str, timeout: float) -> str | None:
    """Why the server cannot be used, or None once a connection has said SELECT 1."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    url = make_url(database_url)
    where = f"{url.host}:{url.port or 5432}"
    engine = create_async_engine(
        database_url, poolclass=NullPool, connect_args={"timeout": timeout}
    )
    try:
        async with asyncio.timeout(timeout + 1):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, TimeoutError) as e:
        return _explain(_root(e), where, url)
    finally:
        await engine.dispose()
    return None


def _root(error: BaseException) -> BaseException:
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "orig", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def _explain(error: BaseException, where: str, url: URL) -> str:
    prefix = f"cannot reach the database at {where}"
    name = type(error).__name__
    if isinstance(error, socket.gaierror):
        return f"{prefix}: the host name {url.host!r} does not resolve; check PINAUTH_DATABASE_URL"
    if isinstance(error, TimeoutError):
        return (
            f"{prefix}: no answer within PINAUTH_DATABASE_TIMEOUT; check the host, port and "
            "firewall"
        )
    if isinstance(error, OSError) and (
        error.errno == errno.ECONNREFUSED or "Connect call failed" in str(error)
    ):
        return f"{prefix}: connection refused; is PostgreSQL running and listening there?"
    if name in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
        return (
            f"the database at {where} refused user {url.username!r}: {error}; "
            "check the user and password in PINAUTH_DATABASE_URL"
        )
    if name == "InvalidCatalogNameError":
        return (
            f"the database {url.database!r} does not exist at {where}; create it "
            f"(createdb {url.database}) or correct PINAUTH_DATABASE_URL"
        )
    return f"{prefix}: {error or name}"


def _report(found: list[str]) -> str:
    count = "1 problem" if len(found) == 1 else f"{len(found)} problems"
    return f"{count} in the configuration:\n" + "\n".join(f"  - {line}" for line in found)


def require(found: list[str]) -> None:
    """Refuse to go on if anything was found."""
    if found:
        raise ConfigurationError(_report(found))


def migrate(settings: Settings) -> None:
    """Bring the schema to head; a database failing under the migration (a file that is
    not a database, a server gone since the checks) is reported, not dumped as a
    traceback."""
    from pinauth.migrations import upgrade_to_head

    try:
        upgrade_to_head(settings.database_url)
    except (SQLAlchemyError, OSError) as e:
        url = make_url(settings.database_url)
        where = f"{url.host}:{url.port or 5432}" if url.host else str(url.database)
        root = _root(e)
        explained = _explain(root, where, url)
        if explained.endswith(f": {root or type(root).__name__}"):  # nothing better known
            explained = f"{type(root).__name__}: {root}"
        raise ConfigurationError(f"migrating the database at {where} failed: {explained}") from e
