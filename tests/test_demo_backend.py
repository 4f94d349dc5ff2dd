"""The demo's backend half over HTTP: /demo/backend/* and the exchanges they report."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pinauth.apikeys import ApiKeyService
from pinauth.db import create_engine, create_sessionmaker
from tests.helpers import ServedWithSandbox, consent_in_sandbox, pinauth_with_sandbox


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[ServedWithSandbox]:
    async with pinauth_with_sandbox(database_url, demo_backend=True) as running:
        yield running


@pytest.fixture
async def page(served: ServedWithSandbox) -> AsyncIterator[httpx.AsyncClient]:
    """The demo page's fetch() calls: same origin, so its Origin on writes is pinauth's."""
    async with httpx.AsyncClient(base_url=served.base, headers={"Origin": served.base}) as client:
        yield client


def assert_no_pinterest_token(body: str) -> None:
    assert "pina_" not in body
    assert "pinr_" not in body


def exchanges_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert_no_pinterest_token(response.text)
    found: list[dict[str, Any]] = response.json()["exchanges"]
    return found


async def test_the_panel_connects_lists_and_posts_both_ways(
    served: ServedWithSandbox, page: httpx.AsyncClient
) -> None:
    about = await page.get("/demo/backend")
    assert about.json() == {"pinauth_url": served.base}

    minted = await page.post("/demo/backend/connect-sessions", json={"end_user_id": "user_7"})
    assert minted.status_code == 201, minted.text
    [mint] = exchanges_of(minted)
    assert (mint["method"], mint["url"], mint["status"]) == (
        "POST",
        f"{served.base}/v1/connect-sessions",
        201,
    )
    assert mint["request_headers"]["authorization"].startswith("Bearer pinauth_sk_")
    assert '"end_user_id": "user_7"' in mint["request_body"]
    connect_url = minted.json()["connect_session"]["connect_url"]
    # The page gets the link to follow; the exchange shows it as it shows every credential.
    assert connect_url.split("pinauth_cs_")[0] + "pinauth_cs_" in mint["response_body"]
    assert not FULL_CREDENTIAL.search(minted.text.replace(connect_url, "")), minted.text

    async with httpx.AsyncClient(base_url=served.base) as browser:
        landed = await consent_in_sandbox(browser, connect_url)
    location = urlsplit(landed.headers["location"])
    assert (location.path, location.fragment) == ("/", "backend")  # no end user in the URL
    [result] = parse_qs(location.query)["pinauth_connect_result"]

    # The page confirms for the end user logged in to the demo app; someone else: 403.
    refused = await page.post(
        "/demo/backend/confirm", json={"result": result, "end_user_id": "user_8"}
    )
    assert refused.status_code == 403
    assert refused.json()["error"] == "connect_result_mismatch"
    [confirm_call] = exchanges_of(refused)
    assert confirm_call["url"] == f"{served.base}/v1/connections/confirm"
    assert (await page.get("/demo/backend/connections?end_user_id=user_7")).json()[
        "connections"
    ] == []
    minted = await page.post("/demo/backend/connect-sessions", json={"end_user_id": "user_7"})
    async with httpx.AsyncClient(base_url=served.base) as browser:
        landed = await consent_in_sandbox(browser, minted.json()["connect_session"]["connect_url"])
    [result] = parse_qs(urlsplit(landed.headers["location"]).query)["pinauth_connect_result"]
    confirmed = await page.post(
        "/demo/backend/confirm", json={"result": result, "end_user_id": "user_7"}
    )
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["connection"]["status"] == "active"
    [confirm_call] = exchanges_of(confirmed)
    assert (confirm_call["method"], confirm_call["status"]) == ("POST", 200)
    assert '"end_user_id": "user_7"' in confirm_call["request_body"]

    listed = await page.get("/demo/backend/connections", params={"end_user_id": "user_7"})
    assert listed.status_code == 200, listed.text
    [connection] = listed.json()["connections"]
    [listing] = exchanges_of(listed)
    assert listing["url"] == f"{served.base}/v1/connections?limit=100&end_user_id=user_7"

    by_key = await page.post(
        "/demo/backend/pins",
        json={"connection_id": connection["id"], "title": "By key", "via": "api_key"},
    )
    assert by_key.status_code == 201, by_key.text
    assert by_key.json()["pin"]["title"] == "By key"
    boards, pin = exchanges_of(by_key)
    assert boards["url"] == f"{served.base}/pinterest/boards?page_size=1"
    assert pin["url"] == f"{served.base}/pinterest/pins"
    assert pin["status"] == 201
    for call in (boards, pin):
        assert call["request_headers"]["pinauth-connection-id"] == connection["id"]
        assert call["request_headers"]["authorization"].startswith("Bearer pinauth_sk_")

    by_token = await page.post(
        "/demo/backend/pins",
        json={"connection_id": connection["id"], "title": "By token", "via": "proxy_token"},
    )
    assert by_token.status_code == 201, by_token.text
    mint_token, boards, pin = exchanges_of(by_token)
    assert mint_token["url"] == f"{served.base}/v1/connections/{connection['id']}/proxy-tokens"
    assert mint_token["status"] == 201
    assert mint_token["request_headers"]["authorization"].startswith("Bearer pinauth_sk_")
    for call in (boards, pin):
        assert call["request_headers"]["authorization"].startswith("Bearer pinauth_pt_")
        assert "pinauth-connection-id" not in call["request_headers"]
    assert (pin["status"], by_token.json()["pin"]["title"]) == (201, "By token")
    # The proxy token is live for minutes: the page shows it as the key, cut to its prefix.
    assert not FULL_CREDENTIAL.search(by_token.text), by_token.text
    assert re.search(r'"token": "pinauth_pt_[A-Za-z0-9_-]{6}…"', mint_token["response_body"])


async def test_failures_come_back_with_the_exchanges_that_failed(
    page: httpx.AsyncClient,
) -> None:
    refused = await page.post("/demo/backend/connect-sessions", json={"end_user_id": ""})
    assert refused.status_code == 422
    assert refused.json()["error"] == "invalid_request"
    [exchange] = exchanges_of(refused)
    assert exchange["status"] == 422

    missing = await page.post(
        "/demo/backend/pins", json={"connection_id": "conn_nobody", "via": "proxy_token"}
    )
    assert missing.status_code == 404
    assert missing.json()["error"] == "connection_not_found"
    [exchange] = exchanges_of(missing)
    assert exchange["url"].endswith("/v1/connections/conn_nobody/proxy-tokens")

    bad = await page.post("/demo/backend/pins", json={"connection_id": "c", "via": "cookie"})
    assert bad.status_code == 422
    assert bad.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/demo/backend/connect-sessions", {"end_user_id": "victim"}),
        ("POST", "/demo/backend/pins", {"connection_id": "conn_x", "via": "api_key"}),
        ("GET", "/demo/backend/connections?end_user_id=victim", None),
    ],
)
async def test_another_site_cannot_drive_the_demo_backend(
    served: ServedWithSandbox, method: str, path: str, body: dict[str, str] | None
) -> None:
    """Guards the Origin check on the panel's routes: they act with an API key."""
    async with httpx.AsyncClient(
        base_url=served.base, headers={"Origin": "http://evil.example"}
    ) as attacker:
        response = await attacker.request(method, path, json=body)
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden_origin"


async def test_a_rebound_host_name_cannot_read_the_demo_backend(served: ServedWithSandbox) -> None:
    """Guards the Host check: a DNS-rebinding page is same-origin with itself (Origin
    equals Host), so only the Host header tells it from the demo page."""
    rebound = "rebind.attacker.example:" + served.base.rsplit(":", 1)[1]
    async with httpx.AsyncClient(
        base_url=served.base, headers={"Host": rebound, "Origin": f"http://{rebound}"}
    ) as attacker:
        read = await attacker.get("/demo/backend/connections", params={"end_user_id": "x"})
        write = await attacker.post("/demo/backend/connect-sessions", json={"end_user_id": "x"})
    for response in (read, write):
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden_origin"
        assert "pinauth_sk_" not in response.text


async def test_a_rebound_host_name_cannot_read_the_demo_webhook_events(
    served: ServedWithSandbox, page: httpx.AsyncClient
) -> None:
    """Guards the Host check on /demo/webhook-events: the events name connections, their
    usernames and end users, and a DNS-rebinding page passes an Origin check."""
    rebound = "rebind.attacker.example:" + served.base.rsplit(":", 1)[1]
    async with httpx.AsyncClient(
        base_url=served.base, headers={"Host": rebound, "Origin": f"http://{rebound}"}
    ) as attacker:
        refused = await attacker.get("/demo/webhook-events")
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden_origin"
    assert (await page.get("/demo/webhook-events")).json() == {"items": []}


FULL_API_KEY = re.compile(r"pinauth_sk_[A-Za-z0-9_-]{20,}")
FULL_CREDENTIAL = re.compile(r"pinauth_(sk|pt|cs|cr)_[A-Za-z0-9_-]{20,}")


async def test_exchanges_show_the_api_key_redacted(
    served: ServedWithSandbox, page: httpx.AsyncClient
) -> None:
    """Guards the redaction: the panel shows that the API key is sent, never the key (the
    prefix `pinauth api-keys list` shows), on success and on failure alike."""
    shown = [
        await page.post("/demo/backend/connect-sessions", json={"end_user_id": "user_9"}),
        await page.get("/demo/backend/connections", params={"end_user_id": "user_9"}),
        await page.post("/demo/backend/pins", json={"connection_id": "conn_x", "via": "api_key"}),
    ]
    prefixes = set()
    for response in shown:
        assert not FULL_API_KEY.search(response.text), response.text
        for exchange in exchanges_of(response):
            authorization = exchange["request_headers"]["authorization"]
            assert re.fullmatch(r"Bearer pinauth_sk_[A-Za-z0-9_-]{6}…", authorization)
            prefixes.add(authorization)
    assert len(prefixes) == 1  # one key, the demo's
    # What is shown cannot call pinauth.
    key = prefixes.pop().removeprefix("Bearer ").removesuffix("…")
    async with httpx.AsyncClient(base_url=served.base) as backend:
        listed = await backend.get("/v1/connections", headers={"Authorization": f"Bearer {key}"})
    assert listed.status_code == 401


async def test_the_panel_exists_only_in_demo_mode_and_its_key_dies_with_it(
    database_url: str,
) -> None:
    async with pinauth_with_sandbox(database_url) as plain, httpx.AsyncClient() as http:
        assert (await http.get(f"{plain.base}/demo/backend")).status_code == 404

    async with pinauth_with_sandbox(database_url, demo_backend=True) as demo:
        engine = create_engine(demo.settings)
        try:
            keys = ApiKeyService(create_sessionmaker(engine), 0)
            [key] = [k for k in await keys.list() if k.name.startswith("demo-backend-")]
            assert key.revoked_at is None
        finally:
            await engine.dispose()
    engine = create_engine(demo.settings)
    try:
        [key] = await ApiKeyService(create_sessionmaker(engine), 0).list()
        assert key.revoked_at is not None
    finally:
        await engine.dispose()
