"""The sandbox behaves like Pinterest: OAuth rules, rotation, scopes, paging, controls."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pinauth.sandbox import SandboxConfig, create_sandbox_app

REDIRECT_URI = "http://localhost:8000/auth/callback"
CONFIG = SandboxConfig(redirect_uris=(REDIRECT_URI,))
BASIC = "Basic " + base64.b64encode(f"{CONFIG.client_id}:{CONFIG.client_secret}".encode()).decode()
SCOPES = "user_accounts:read,boards:read,boards:write,pins:read"


@pytest.fixture
async def sandbox() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(create_sandbox_app(CONFIG))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox.test") as client:
        yield client


def authorize_params(**overrides: str) -> dict[str, str]:
    return {
        "client_id": CONFIG.client_id,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "scope": SCOPES,
        "state": "st",
    } | overrides


async def decide(
    client: httpx.AsyncClient, decision: str = "allow", **overrides: str
) -> httpx.Response:
    fields = {k: v for k, v in authorize_params(**overrides).items() if k != "response_type"}
    return await client.post("/oauth/", data=fields | {"decision": decision})


async def get_code(client: httpx.AsyncClient, **overrides: str) -> str:
    response = await decide(client, **overrides)
    return parse_qs(urlsplit(response.headers["location"]).query)["code"][0]


async def token(
    client: httpx.AsyncClient, form: dict[str, str], auth: str = BASIC
) -> httpx.Response:
    return await client.post("/v5/oauth/token", data=form, headers={"Authorization": auth})


async def tokens_for(client: httpx.AsyncClient) -> dict[str, Any]:
    code = await get_code(client)
    response = await token(
        client, {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    )
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


# --- consent page --------------------------------------------------------------------


async def test_consent_page_lists_scopes_and_offers_allow_and_deny(
    sandbox: httpx.AsyncClient,
) -> None:
    page = await sandbox.get("/oauth/", params=authorize_params())
    assert page.status_code == 200
    for text in ("Allow", "Deny", "boards:write", CONFIG.username):
        assert text in page.text


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"client_id": "999"}, "Unknown client_id"),
        ({"redirect_uri": "https://evil.test/cb"}, "not registered"),
    ],
)
async def test_consent_refuses_unknown_clients_and_redirects_without_redirecting(
    sandbox: httpx.AsyncClient, override: dict[str, str], problem: str
) -> None:
    page = await sandbox.get("/oauth/", params=authorize_params(**override))
    assert page.status_code == 400
    assert problem in page.text
    assert "location" not in page.headers


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "read_public"}, "invalid_scope"),
        ({"scope": "boards:read pins:read"}, "invalid_scope"),
    ],
)
async def test_bad_authorize_parameters_redirect_with_an_error(
    sandbox: httpx.AsyncClient, override: dict[str, str], error: str
) -> None:
    response = await sandbox.get("/oauth/", params=authorize_params(**override))
    assert response.status_code == 302
    assert parse_qs(urlsplit(response.headers["location"]).query) == {
        "error": [error],
        "state": ["st"],
    }


async def test_allow_and_deny_redirect_with_state(sandbox: httpx.AsyncClient) -> None:
    allowed = parse_qs(urlsplit((await decide(sandbox)).headers["location"]).query)
    denied = parse_qs(urlsplit((await decide(sandbox, "deny")).headers["location"]).query)
    assert set(allowed) == {"code", "state"}
    assert allowed["state"] == ["st"]
    assert denied == {"error": ["access_denied"], "state": ["st"]}


async def test_the_consent_page_chooses_which_account_approves(
    sandbox: httpx.AsyncClient,
) -> None:
    """Several sandbox accounts can be linked: each approval is for the chosen one, with
    its own id and boards; the default is the first; an unknown account is refused."""
    page = (await sandbox.get("/oauth/", params=authorize_params())).text
    accounts = {}
    for account in (None, "sandbox_studio", "sandbox_pinner"):
        fields = {k: v for k, v in authorize_params().items() if k != "response_type"}
        if account:
            fields["account"] = account
        decided = await sandbox.post("/oauth/", data=fields | {"decision": "allow"})
        code = parse_qs(urlsplit(decided.headers["location"]).query)["code"][0]
        granted = await token(
            sandbox,
            {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
        )
        bearer = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        me = (await sandbox.get("/v5/user_account", headers=bearer)).json()
        boards = (await sandbox.get("/v5/boards", headers=bearer)).json()["items"]
        accounts[account] = (me["id"], me["username"], {b["id"] for b in boards})
    fields = {k: v for k, v in authorize_params().items() if k != "response_type"}
    unknown = await sandbox.post(
        "/oauth/", data=fields | {"decision": "allow", "account": "someone_else"}
    )

    assert 'value="sandbox_pinner" checked' in page
    assert 'value="sandbox_studio"' in page
    assert accounts[None] == accounts["sandbox_pinner"]
    assert accounts["sandbox_studio"][1] == "sandbox_studio"
    assert accounts["sandbox_studio"][0] != accounts["sandbox_pinner"][0]
    assert not accounts["sandbox_studio"][2] & accounts["sandbox_pinner"][2]
    assert unknown.status_code == 400


# --- token endpoint ------------------------------------------------------------------


async def test_code_grant_returns_the_specs_fields(sandbox: httpx.AsyncClient) -> None:
    body = await tokens_for(sandbox)
    assert body["access_token"].startswith("pina_")
    assert body["refresh_token"].startswith("pinr_")
    assert body["token_type"] == "bearer"
    assert body["response_type"] == "authorization_code"
    assert body["expires_in"] == 30 * 24 * 3600
    assert body["refresh_token_expires_in"] == 60 * 24 * 3600
    assert abs(body["refresh_token_expires_at"] - (time.time() + 60 * 24 * 3600)) < 60
    assert body["scope"] == "boards:read,boards:write,pins:read,user_accounts:read"


@pytest.mark.parametrize(
    "auth",
    ["", "Bearer x", "Basic " + base64.b64encode(f"{CONFIG.client_id}:wrong".encode()).decode()],
)
async def test_token_endpoint_requires_basic_client_auth(
    sandbox: httpx.AsyncClient, auth: str
) -> None:
    code = await get_code(sandbox)
    response = await token(
        sandbox,
        {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
        auth=auth,
    )
    assert response.status_code == 401
    assert set(response.json()) == {"code", "message"}


async def test_a_wrong_client_secret_is_401_and_leaves_the_refresh_token_alive(
    sandbox: httpx.AsyncClient,
) -> None:
    """Guards the sandbox's answer to refused client credentials, as Pinterest's: 401,
    code 2, and the refresh token it carried is neither spent nor rotated (the grant is
    never looked at), so it works with the right secret; a spent one is a 400."""
    tokens = await tokens_for(sandbox)
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    wrong = "Basic " + base64.b64encode(f"{CONFIG.client_id}:wrong".encode()).decode()

    refused = await token(sandbox, refresh, auth=wrong)
    accepted = await token(sandbox, refresh)
    spent = await token(sandbox, refresh)

    assert refused.status_code == 401
    assert refused.json() == {"code": 2, "message": "Authentication failed."}
    assert accepted.status_code == 200
    assert spent.status_code == 400


async def test_token_endpoint_requires_a_form_body(sandbox: httpx.AsyncClient) -> None:
    code = await get_code(sandbox)
    response = await sandbox.post(
        "/v5/oauth/token",
        json={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
        headers={"Authorization": BASIC},
    )
    assert response.status_code == 400


async def test_codes_are_single_use_and_bound_to_their_redirect_uri(
    sandbox: httpx.AsyncClient,
) -> None:
    code = await get_code(sandbox)
    wrong_uri = await token(
        sandbox,
        {"grant_type": "authorization_code", "code": code, "redirect_uri": "http://other/cb"},
    )
    assert wrong_uri.status_code == 400
    code = await get_code(sandbox)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    assert (await token(sandbox, form)).status_code == 200
    assert (await token(sandbox, form)).status_code == 400


async def test_refresh_rotates_and_the_old_refresh_token_dies(sandbox: httpx.AsyncClient) -> None:
    first = await tokens_for(sandbox)
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}

    second = await token(sandbox, refresh)
    again = await token(sandbox, refresh)

    assert second.status_code == 200
    assert second.json()["response_type"] == "refresh_token"
    assert second.json()["refresh_token"] != first["refresh_token"]
    assert again.status_code == 400
    rotated = {"grant_type": "refresh_token", "refresh_token": second.json()["refresh_token"]}
    assert (await token(sandbox, rotated)).status_code == 200


# --- API ------------------------------------------------------------------------------


async def test_bookmark_pagination_walks_every_board(sandbox: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {(await tokens_for(sandbox))['access_token']}"}
    for n in range(5):
        await sandbox.post("/v5/boards", json={"name": f"b{n}"}, headers=auth)
    seen: list[str] = []
    bookmark = None
    while True:
        params = {"page_size": "3"} | ({"bookmark": bookmark} if bookmark else {})
        page = (await sandbox.get("/v5/boards", params=params, headers=auth)).json()
        seen += [board["name"] for board in page["items"]]
        bookmark = page["bookmark"]
        if not bookmark:
            break
    assert len(seen) == 8  # 3 sample boards + 5
    assert len(set(seen)) == 8


# "²" and "٣" are digits to str.isdigit(), and int() refuses the first.
@pytest.mark.parametrize("page_size", ["0", "251", "ten", "²", "\u0663", "1" * 5000])
async def test_page_size_bounds(sandbox: httpx.AsyncClient, page_size: str) -> None:
    auth = {"Authorization": f"Bearer {(await tokens_for(sandbox))['access_token']}"}
    response = await sandbox.get("/v5/boards", params={"page_size": page_size}, headers=auth)
    assert response.status_code == 400
    assert set(response.json()) == {"code", "message"}


@pytest.mark.parametrize("number", ["²", "\u0663", "1" * 5000])
async def test_a_bookmark_without_an_ascii_offset_is_refused(
    sandbox: httpx.AsyncClient, number: str
) -> None:
    auth = {"Authorization": f"Bearer {(await tokens_for(sandbox))['access_token']}"}
    bookmark = base64.urlsafe_b64encode(f"offset:{number}".encode()).decode()
    response = await sandbox.get("/v5/boards", params={"bookmark": bookmark}, headers=auth)
    assert response.status_code == 400
    assert response.json() == {"code": 1, "message": "Invalid bookmark."}


async def test_missing_scope_is_401_code_3(sandbox: httpx.AsyncClient) -> None:
    code = await get_code(sandbox, scope="boards:read")
    access = (
        await token(
            sandbox,
            {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
        )
    ).json()["access_token"]
    response = await sandbox.post(
        "/v5/boards", json={"name": "x"}, headers={"Authorization": f"Bearer {access}"}
    )
    assert response.status_code == 401
    assert response.json()["code"] == 3


# --- test controls ---------------------------------------------------------------------


async def test_expire_access_tokens_then_refresh_works(sandbox: httpx.AsyncClient) -> None:
    tokens = await tokens_for(sandbox)
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await sandbox.get("/v5/user_account", headers=auth)).status_code == 200

    await sandbox.post("/_sandbox/expire-access-tokens")

    expired = await sandbox.get("/v5/user_account", headers=auth)
    assert expired.status_code == 401
    assert expired.json() == {"code": 2, "message": "Authentication failed."}
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    assert (await token(sandbox, refresh)).status_code == 200


async def test_revoked_refresh_tokens_are_refused(sandbox: httpx.AsyncClient) -> None:
    tokens = await tokens_for(sandbox)
    await sandbox.post("/_sandbox/revoke-refresh-tokens")
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    assert (await token(sandbox, refresh)).status_code == 400


async def test_access_token_lifetime_control(sandbox: httpx.AsyncClient) -> None:
    await sandbox.put("/_sandbox/access-token-lifetime", json={"seconds": 60})
    assert (await tokens_for(sandbox))["expires_in"] == 60


async def test_faults_are_served_then_consumed(sandbox: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {(await tokens_for(sandbox))['access_token']}"}
    await sandbox.post(
        "/_sandbox/faults",
        json={
            "path_prefix": "/v5/boards",
            "status": 503,
            "body": {"code": 0, "message": "down"},
            "headers": {"Retry-After": "1"},
            "times": 2,
        },
    )
    first = await sandbox.get("/v5/boards", headers=auth)
    second = await sandbox.get("/v5/boards", headers=auth)
    other = await sandbox.get("/v5/user_account", headers=auth)
    third = await sandbox.get("/v5/boards", headers=auth)

    assert (first.status_code, second.status_code) == (503, 503)
    assert first.json() == {"code": 0, "message": "down"}
    assert first.headers["retry-after"] == "1"
    assert other.status_code == 200
    assert third.status_code == 200


async def test_fault_delay(sandbox: httpx.AsyncClient) -> None:
    await sandbox.post(
        "/_sandbox/faults", json={"path_prefix": "/v5/oauth/token", "status": 500, "delay": 0.3}
    )
    started = time.monotonic()
    response = await token(sandbox, {"grant_type": "refresh_token", "refresh_token": "x"})
    assert response.status_code == 500
    assert time.monotonic() - started >= 0.3


async def test_counters_and_reset(sandbox: httpx.AsyncClient) -> None:
    tokens = await tokens_for(sandbox)
    await token(sandbox, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    await sandbox.get("/v5/boards", headers=auth)
    await sandbox.get("/v5/boards", headers=auth)

    counters = (await sandbox.get("/_sandbox/counters")).json()
    assert counters["token_requests"] == {"authorization_code": 1, "refresh_token": 1}
    assert counters["api_requests"] == {"GET /v5/boards": 2}

    await sandbox.post("/_sandbox/reset")
    assert (await sandbox.get("/_sandbox/counters")).json() == {
        "token_requests": {},
        "api_requests": {},
    }
    assert (await sandbox.get("/v5/boards", headers=auth)).status_code == 401


async def test_controls_are_not_part_of_pinauth(client: httpx.AsyncClient) -> None:
    for path in ("/_sandbox/counters", "/sandbox/_sandbox/counters", "/sandbox/oauth/"):
        assert (await client.get(path)).status_code == 404


async def test_introspection_tells_live_from_dead_tokens(sandbox: httpx.AsyncClient) -> None:
    first = await tokens_for(sandbox)
    second = (
        await token(
            sandbox, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        )
    ).json()

    async def inspect(value: str) -> dict[str, Any]:
        result: dict[str, Any] = (
            await sandbox.post("/_sandbox/introspect", json={"token": value})
        ).json()
        return result

    assert await inspect(second["refresh_token"]) == {"active": True, "token_type": "refresh_token"}
    assert await inspect(first["refresh_token"]) == {"active": False, "token_type": None}
    assert await inspect(second["access_token"]) == {"active": True, "token_type": "access_token"}


async def test_held_refresh_answer_has_already_rotated_and_reuse_is_counted(
    sandbox: httpx.AsyncClient,
) -> None:
    """The hold control: while a refresh answer is held, its refresh token is already
    dead (the window in which a client process can lose the grant); presenting a spent
    refresh token again is counted."""
    first = await tokens_for(sandbox)
    assert (await sandbox.put("/_sandbox/token-hold", json={"seconds": 30})).json() == {"held": 1}
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    held = asyncio.create_task(token(sandbox, refresh))
    while (await sandbox.get("/_sandbox/counters")).json()["token_requests"].get(
        "refresh_token"
    ) != 1:
        await asyncio.sleep(0)  # yield until the request is inside the sandbox
    inspected = await sandbox.post("/_sandbox/introspect", json={"token": first["refresh_token"]})
    assert inspected.json() == {"active": False, "token_type": None}
    assert not held.done()
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held

    assert (await sandbox.get("/_sandbox/refresh-token-reuse")).json() == {"reused": 0}
    assert (await token(sandbox, refresh)).status_code == 400
    assert (await token(sandbox, refresh)).status_code == 400
    never_issued = {"grant_type": "refresh_token", "refresh_token": "pinr_never"}
    assert (await token(sandbox, never_issued)).status_code == 400
    assert (await sandbox.get("/_sandbox/refresh-token-reuse")).json() == {"reused": 2}


async def test_a_fault_that_cannot_be_sent_is_refused(sandbox: httpx.AsyncClient) -> None:
    """A fault header the sandbox could not put on the wire is a 422, not a later 500."""
    response = await sandbox.post(
        "/_sandbox/faults",
        json={"path_prefix": "/v5/boards", "status": 200, "headers": {"X-Test": "€"}},
    )
    assert response.status_code == 422
    assert (await sandbox.get("/v5/boards")).status_code == 401  # no fault queued
