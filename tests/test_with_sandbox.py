"""pinauth against its own sandbox, with Pinterest's bad days scripted via /_sandbox/."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pinauth.app import create_app
from pinauth.sandbox import SandboxConfig, create_sandbox_app
from tests.helpers import ManualClock, make_settings, serve_app

SANDBOX = "http://sandbox.test"
REDIRECT_URI = "http://localhost:8000/auth/callback"
CONFIG = SandboxConfig(redirect_uris=(REDIRECT_URI,))


@pytest.fixture
def clock() -> ManualClock:
    """pinauth's rate-governor clock, moved by the test instead of waited for."""
    return ManualClock()


@pytest.fixture
async def world(
    database_url: str, clock: ManualClock
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(browser → pinauth, test → sandbox), pinauth logged in through the consent page."""
    sandbox_transport = httpx.ASGITransport(create_sandbox_app(CONFIG))
    settings = make_settings(
        database_url,
        client_id=CONFIG.client_id,
        client_secret=CONFIG.client_secret,
        redirect_uri=REDIRECT_URI,
        authorize_url=f"{SANDBOX}/oauth/",
        api_url=f"{SANDBOX}/v5",
        scopes="user_accounts:read,boards:read,boards:write",
    )
    app = create_app(settings, transport=sandbox_transport, clock=clock)
    async with (
        serve_app(app) as browser,
        httpx.AsyncClient(transport=sandbox_transport, base_url=SANDBOX) as sandbox,
    ):
        params = parse_qs(urlsplit((await browser.get("/auth/login")).headers["location"]).query)
        fields = {k: v[0] for k, v in params.items() if k != "response_type"}
        decision = await sandbox.post("/oauth/", data=fields | {"decision": "allow"})
        callback = urlsplit(decision.headers["location"]).query
        assert (await browser.get(f"/auth/callback?{callback}")).status_code == 303
        yield browser, sandbox


async def counters(sandbox: httpx.AsyncClient) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = (await sandbox.get("/_sandbox/counters")).json()
    return result


async def test_expired_tokens_refresh_once_for_many_concurrent_calls(
    world: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    browser, sandbox = world
    await sandbox.post("/_sandbox/expire-access-tokens")

    responses = await asyncio.gather(*(browser.get("/pinterest/boards") for _ in range(20)))

    assert [r.status_code for r in responses] == [200] * 20
    assert (await counters(sandbox))["token_requests"]["refresh_token"] == 1


async def test_revoked_refresh_token_needs_a_new_login_without_a_storm(
    world: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    browser, sandbox = world
    await sandbox.post("/_sandbox/expire-access-tokens")
    await sandbox.post("/_sandbox/revoke-refresh-tokens")

    responses = await asyncio.gather(*(browser.get("/pinterest/boards") for _ in range(10)))

    assert {r.json()["error"] for r in responses} == {"reauthorization_required"}
    assert (await counters(sandbox))["token_requests"]["refresh_token"] == 1
    assert (await browser.get("/me")).json()["status"] == "reauthorization_required"


async def test_a_503_from_pinterest_is_retried_for_get(
    world: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    browser, sandbox = world
    await sandbox.post(
        "/_sandbox/faults",
        json={"path_prefix": "/v5/boards", "status": 503, "body": {"code": 0, "message": "busy"}},
    )

    response = await browser.get("/boards")

    assert response.status_code == 200
    assert len(response.json()["items"]) == 3
    assert (await counters(sandbox))["api_requests"]["GET /v5/boards"] == 2


async def test_a_503_on_create_is_returned_not_retried(
    world: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    browser, sandbox = world
    await sandbox.post(
        "/_sandbox/faults",
        json={"path_prefix": "/v5/boards", "status": 503, "body": {"code": 0, "message": "busy"}},
    )

    response = await browser.post("/pinterest/boards", json={"name": "Once only"})

    assert response.status_code == 503
    assert response.json() == {"code": 0, "message": "busy"}
    assert (await counters(sandbox))["api_requests"]["POST /v5/boards"] == 1
    boards = (await browser.get("/boards", params={"all": "true"})).json()["items"]
    assert "Once only" not in [board["name"] for board in boards]


async def test_a_failing_token_endpoint_is_a_503_and_the_tokens_survive(
    world: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    browser, sandbox = world
    await sandbox.post("/_sandbox/faults", json={"path_prefix": "/v5/oauth/token", "status": 502})

    failed = await browser.post("/auth/refresh")

    assert failed.status_code == 503
    assert failed.json()["error"] == "upstream_error"
    assert "retry-after" in failed.headers
    assert (await browser.get("/me")).json()["status"] == "active"
    assert (await browser.get("/pinterest/user_account")).status_code == 200


async def test_a_persistent_429_is_held_for_its_retry_after_without_calling_pinterest(
    world: tuple[httpx.AsyncClient, httpx.AsyncClient],
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Guards the rate governor end to end: the sandbox answers every user_account call 429
    with Retry-After: 30; after the first, pinauth sends none of the connection's org_read
    calls (user_account, boards) to it for 30 s and answers each with 429 and a decreasing
    Retry-After, lets org_write through, and at 30 s calls Pinterest again."""
    browser, sandbox = world
    await sandbox.post(
        "/_sandbox/faults",
        json={
            "path_prefix": "/v5/user_account",
            "status": 429,
            "body": {"code": 8, "message": "This request exceeded a rate limit."},
            "headers": {"Retry-After": "30"},
            "times": 10_000,
        },
    )
    held_calls = ("GET /v5/user_account", "GET /v5/boards")

    first = await browser.get("/pinterest/user_account")
    before = (await counters(sandbox))["api_requests"]
    statuses: Counter[int] = Counter()
    retry_afters: list[int] = []
    created = 0
    for step in range(10):  # t = 0, 3, …, 27 s
        responses = await asyncio.gather(
            browser.get("/pinterest/user_account"),
            browser.get("/pinterest/boards"),
            browser.get("/boards"),
        )
        statuses.update(response.status_code for response in responses)
        retry_afters.extend(int(response.headers["retry-after"]) for response in responses)
        other = await browser.post("/pinterest/boards", json={"name": f"Board {step}"})
        created += other.status_code == 201
        clock.advance(3)
    during = (await counters(sandbox))["api_requests"]
    upstream_while_held = sum(during.get(call, 0) - before.get(call, 0) for call in held_calls)
    at_30_s = await browser.get("/pinterest/user_account")
    after = (await counters(sandbox))["api_requests"]
    upstream_at_30_s = after["GET /v5/user_account"] - during["GET /v5/user_account"]

    with capsys.disabled():
        print(
            f"\npersistent 429, Retry-After: 30: first call {first.status_code}; "
            f"org_read calls sent upstream in the next 30 s: {upstream_while_held} "
            f"of {sum(statuses.values())}; statuses {dict(statuses)}; "
            f"Retry-After sequence {retry_afters}; org_write calls through: {created}/10; "
            f"upstream calls at 30 s: {upstream_at_30_s} ({at_30_s.status_code})"
        )
    assert first.status_code == 429
    assert upstream_while_held == 0
    assert statuses == {429: 30}
    assert retry_afters == [30 - 3 * (i // 3) for i in range(30)]
    assert created == 10
    assert upstream_at_30_s == 1
