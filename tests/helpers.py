"""Test helpers (new ones live here rather than in conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import respx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from pinauth.observability import Metrics
from pinauth.settings import Settings


async def connect_account(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> str:
    """Log in through /auth/login and /auth/callback with Pinterest mocked; returns the
    session's Cookie header. Pinterest's recorded calls are reset afterwards."""
    token = {
        "access_token": "pina_HELPER-ACCESS",
        "refresh_token": "pinr_HELPER-REFRESH",
        "token_type": "bearer",
        "expires_in": 2592000,
        "refresh_token_expires_in": 5184000,
        "scope": ",".join(settings.scopes),
        "response_type": "authorization_code",
    }
    account: dict[str, Any] = {"id": "549755885175", "username": "ada_pins"}
    pinterest.post(settings.token_url).respond(200, json=token)
    pinterest.get(f"{settings.api_url}/user_account").respond(200, json=account)
    login = await client.get("/auth/login")
    assert login.status_code == 302, login.text
    state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
    callback = await client.get("/auth/callback", params={"code": "helper", "state": state})
    assert callback.status_code == 303, callback.text
    pinterest.reset()
    return f"pinauth_session={client.cookies['pinauth_session']}"


def metrics_of(app: FastAPI) -> Metrics:
    """The Metrics instance `create_app` built for `app` (RequestContextMiddleware's)."""
    for middleware in app.user_middleware:
        metrics = middleware.kwargs.get("metrics")
        if isinstance(metrics, Metrics):
            return metrics
    raise AssertionError("no middleware of the app was given the metrics")


@asynccontextmanager
async def in_process_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """`app` with its lifespan running, called in-process at http://localhost:8000."""
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://localhost:8000"
        ) as client,
    ):
        yield client


def csp_directives(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as {directive: [sources]}."""
    directives: dict[str, list[str]] = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives
