"""Fixtures: a fresh migrated database per test, the app in-process, Pinterest mocked by respx.

Helpers live in tests/helpers.py; test modules import them from there, never from here.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import respx
from fastapi import FastAPI

from pinauth.app import create_app
from pinauth.migrations import upgrade_to_head
from pinauth.settings import Settings
from tests.helpers import (
    POSTGRES_ADMIN_URL,
    PrivatePostgres,
    make_settings,
    new_postgres_database,
    postgres_bin,
    serve_app,
    truncate_all,
)

# What `pinauth` commands run in-process (tests call `pinauth.cli.main`) configure for the
# whole process with dictConfig: `pinauth` loggers that no longer propagate to the root,
# where the next test's log capture listens.
_CONFIGURED_LOGGERS = ("", "pinauth", "pinauth.access", "uvicorn", "uvicorn.error", "httpx")


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _CONFIGURED_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate, lg.level, lg.disabled) for lg in loggers]
    yield
    for lg, (handlers, propagate, level, disabled) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.propagate, lg.disabled = propagate, disabled
        lg.setLevel(level)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new PostgreSQL database for this test run, migrated once."""
    with new_postgres_database("pinauth_test") as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with the schema at head and no rows, for this test alone."""
    if POSTGRES_ADMIN_URL:
        url: str = request.getfixturevalue("postgres_url")
        truncate_all(url)
        return url
    url = f"sqlite+aiosqlite:///{tmp_path / 'pinauth.db'}"
    upgrade_to_head(url)
    return url


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def pinterest() -> respx.MockRouter:
    """Pinterest, mocked at the edge: the app's injected transport, nothing patched
    globally. A request no route matches fails the test."""
    return respx.MockRouter(assert_all_called=False, assert_all_mocked=True)


@pytest.fixture
def app(settings: Settings, pinterest: respx.MockRouter) -> FastAPI:
    return create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_app(app) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[Path]:
    """An initdb'd cluster, copied by every private_postgres (initdb takes seconds)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL's server programs are not installed")
    template = PrivatePostgres.template()
    yield template
    shutil.rmtree(template.parent, ignore_errors=True)


@pytest.fixture
def private_postgres(postgres_template: Path) -> Iterator[PrivatePostgres]:
    """A running PostgreSQL server of this test's own, which the test may stop and start."""
    server = PrivatePostgres(postgres_template)
    server.start()
    try:
        yield server
    finally:
        server.remove()
