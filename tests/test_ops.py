"""Health, readiness, metrics, request ids and structured logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx

from pinauth.logs import JsonFormatter, logging_config
from pinauth.settings import Settings
from tests.helpers import (
    ALL_TOKENS,
    API,
    CLIENT_SECRET,
    TOKEN_URL,
    free_port,
    log_in,
    make_settings,
    run_client,
    start_login,
    token_json,
)


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_when_migrated(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_readyz_before_migrations(tmp_path: Path, pinterest: respx.MockRouter) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    async with run_client(settings, pinterest) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"] == "not_ready"
    assert "pinauth migrate" in response.json()["message"]


async def test_readyz_without_a_database(pinterest: respx.MockRouter) -> None:
    # Nothing listens on that port. (A failing SQLite connect would also do, but aiosqlite's
    # worker thread can outlive the test's event loop and fail the next test.)
    settings = make_settings(f"postgresql+asyncpg://pinauth@127.0.0.1:{free_port()}/none")
    async with run_client(settings, pinterest) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"error": "not_ready", "message": "The database is unreachable."}


@pytest.mark.parametrize(
    ("incoming", "echoed"),
    [("abc-123.X_y", True), ("has space", False), ("x" * 65, False), (None, False)],
)
async def test_request_id_is_echoed_or_made(
    client: httpx.AsyncClient, incoming: str | None, echoed: bool
) -> None:
    headers = {"X-Request-ID": incoming} if incoming else {}
    response = await client.get("/healthz", headers=headers)
    request_id = response.headers["x-request-id"]
    if echoed:
        assert request_id == incoming
    else:
        assert request_id != incoming
        assert len(request_id) == 32
    # Errors carry one too.
    assert "x-request-id" in (await client.get("/me")).headers


async def test_metrics(client: httpx.AsyncClient, pinterest: respx.MockRouter) -> None:
    await log_in(client, pinterest)
    pinterest.get(f"{API}/boards").respond(200, json={"items": []})
    pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_X", "pinr_Y"))
    await client.get("/pinterest/boards")
    await client.get("/pinterest/boards")
    await client.post("/auth/refresh")

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'pinauth_http_requests_total{method="GET",route="/pinterest/{path}",status="200"} 2.0'
        in text
    )
    assert 'pinauth_http_requests_total{method="GET",route="/auth/callback",status="303"}' in text
    assert 'pinauth_upstream_request_duration_seconds_count{endpoint="boards"} 2.0' in text
    assert 'pinauth_upstream_request_duration_seconds_count{endpoint="oauth"} 2.0' in text
    assert 'pinauth_token_refreshes_total{outcome="ok"} 1.0' in text
    assert 'pinauth_token_refreshes_total{outcome="rejected"} 0.0' in text
    assert 'pinauth_connections{status="active"} 1.0' in text
    assert 'pinauth_connections{status="reauthorization_required"} 0.0' in text


async def test_metrics_can_require_a_token(database_url: str, pinterest: respx.MockRouter) -> None:
    settings = make_settings(database_url, metrics_token="scrape-me")
    async with run_client(settings, pinterest) as client:
        anonymous = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert (anonymous.status_code, wrong.status_code, right.status_code) == (401, 401, 200)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Everything pinauth logs, formatted exactly as `pinauth serve` formats it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    httpx_logger = logging.getLogger("httpx")
    previous = root.level, httpx_logger.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # As `pinauth serve` configures it (logs.logging_config): httpx logs full URLs.
    httpx_logger.setLevel(logging_config("debug")["loggers"]["httpx"]["level"])
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous[0])
        httpx_logger.setLevel(previous[1])


async def test_json_logs_through_a_full_flow_leak_nothing(
    settings: Settings, pinterest: respx.MockRouter, json_logs: io.StringIO
) -> None:
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        session_cookie = client.cookies["pinauth_session"]
        pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        await client.get("/pinterest/boards?page_size=5")
        # A bearer credential is an API-key attempt: refused, and never logged either.
        await client.get(
            "/pinterest/boards?page_size=5",
            headers={"Authorization": "Bearer client-secret-bearer"},
        )
        pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_ACCESS-TWO-a93b01"))
        await client.post("/auth/refresh")
        pinterest.post(TOKEN_URL).respond(400, json={"code": 1, "message": "dead"})
        await client.post("/auth/refresh")  # a rejected refresh token
        state = await start_login(client)
        login_cookie = client.cookies["pinauth_login"]
        pinterest.post(TOKEN_URL).mock(side_effect=httpx.ConnectError("refused"))
        await client.get("/auth/callback", params={"code": "CODE-XYZ-1", "state": state})
        await client.get("/auth/callback", params={"code": "CODE-XYZ-2", "state": "forged"})

    output = json_logs.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) >= 8
    for line in requests:
        assert {"time", "level", "request_id", "method", "path", "route", "status"} <= set(line)
        assert line["duration_ms"] >= 0
    proxied = next(line for line in requests if line["route"] == "/pinterest/{path}")
    assert str(proxied["connection_id"]).startswith("conn_")  # the public id, never the key
    assert proxied["path"] == "/pinterest/boards"
    forbidden = [
        *ALL_TOKENS,
        CLIENT_SECRET,
        settings.secret_key.get_secret_value(),
        session_cookie,
        login_cookie,
        state,
        "CODE-XYZ",
        "client-secret-bearer",
        "Basic ",
        "Bearer ",
    ]
    for secret in forbidden:
        assert secret not in output, f"{secret!r} was logged"
