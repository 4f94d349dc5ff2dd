"""The OAuth login: authorize redirect, state checks, code exchange, session cookie."""

from __future__ import annotations

import time
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from pinauth.settings import Settings
from tests.helpers import (
    ABSURD_LIFETIMES,
    API,
    BASIC,
    CLIENT_ID,
    CLIENT_SECRET,
    TEN_YEARS,
    TOKEN_URL,
    log_in,
    make_settings,
    mock_login_upstream,
    run_client,
    start_login,
    token_json,
    with_fields,
)

# An API client's callback: failures answer as JSON (a browser's are redirected to the
# frontend, see tests/test_frontend.py).
JSON = {"Accept": "application/json"}


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Each Set-Cookie header of the response, by cookie name."""
    result = {}
    for header in response.headers.get_list("set-cookie"):
        name = header.split("=", 1)[0]
        result[name] = header
    return result


async def test_login_redirects_to_pinterest_with_v5_parameters(client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/login")

    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == (
        "https://www.pinterest.com/oauth/"
    )
    query = parse_qs(location.query)
    assert query["client_id"] == [CLIENT_ID]
    assert query["redirect_uri"] == ["http://localhost:8000/auth/callback"]
    assert query["response_type"] == ["code"]
    assert query["scope"] == ["user_accounts:read,boards:read,pins:read"]
    assert len(query["state"][0]) > 40
    cookie = set_cookies(response)["pinauth_login"]
    for attribute in ("HttpOnly", "SameSite=lax", "Path=/", "Max-Age=600"):
        assert attribute in cookie
    assert "Secure" not in cookie  # the redirect URI is plain http here


async def test_every_login_gets_its_own_state(client: httpx.AsyncClient) -> None:
    assert await start_login(client) != await start_login(client)


async def test_full_login_flow(client: httpx.AsyncClient, pinterest: respx.MockRouter) -> None:
    token_route, account_route = mock_login_upstream(pinterest)
    state = await start_login(client, return_to="/dashboard?tab=boards")

    response = await client.get("/auth/callback", params={"code": "the-code", "state": state})

    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard?tab=boards"
    # Exactly the token request Pinterest documents: Basic client auth, form body.
    assert token_route.call_count == 1
    sent = token_route.calls.last.request
    assert sent.headers["authorization"] == BASIC
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(sent.content.decode(), strict_parsing=True) == {
        "grant_type": ["authorization_code"],
        "code": ["the-code"],
        "redirect_uri": ["http://localhost:8000/auth/callback"],
        "continuous_refresh": ["true"],
    }
    assert CLIENT_SECRET not in sent.content.decode()
    assert CLIENT_SECRET not in str(sent.url)
    assert (
        account_route.calls.last.request.headers["authorization"] == "Bearer pina_ACCESS-ONE-5f2c9e"
    )

    cookies = set_cookies(response)
    session_cookie = cookies["pinauth_session"]
    for attribute in ("HttpOnly", "SameSite=lax", "Path=/"):
        assert attribute in session_cookie
    assert 'pinauth_login=""' in cookies["pinauth_login"]  # the login cookie is spent

    me = await client.get("/me")
    assert me.status_code == 200
    body = me.json()
    assert body["pinterest_user_id"] == "549755885175"
    assert body["username"] == "ada_pins"
    assert body["scopes"] == ["user_accounts:read", "boards:read", "pins:read"]
    assert body["status"] == "active"
    assert body["refresh_token_expires_at"] == "2030-03-17T17:46:40Z"
    remaining = httpx_datetime(body["access_token_expires_at"]) - time.time()
    assert 2592000 - 60 < remaining <= 2592000


def httpx_datetime(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def test_expires_in_sent_as_string_is_understood(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    mock_login_upstream(pinterest, token_json(expires_in="3600"))
    state = await start_login(client)
    await client.get("/auth/callback", params={"code": "c", "state": state})

    expires = httpx_datetime((await client.get("/me")).json()["access_token_expires_at"])
    assert 3500 < expires - time.time() <= 3600


@pytest.mark.parametrize("fields", ABSURD_LIFETIMES)
async def test_absurd_lifetimes_are_clamped_and_the_tokens_kept(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, fields: dict[str, int | None]
) -> None:
    mock_login_upstream(pinterest, with_fields(token_json(), fields))
    state = await start_login(client)

    response = await client.get(
        "/auth/callback", params={"code": "c", "state": state}, headers=JSON
    )

    assert response.status_code == 303, response.text
    me = (await client.get("/me")).json()
    for field in ("access_token_expires_at", "refresh_token_expires_at"):
        remaining = httpx_datetime(me[field]) - time.time()
        assert -60 < remaining <= TEN_YEARS, (field, me[field])


@pytest.mark.parametrize(
    ("return_to", "expected"),
    [
        ("/boards", "/boards"),
        ("//evil.com", "/"),
        ("/\\evil.com", "/"),
        ("https:evil.com", "/"),
        ("https://evil.com/", "/"),
        ("javascript:alert(1)", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("https://app.example.com@evil.com/", "/"),
        ("https://app.example.com/after", "https://app.example.com/after"),
        # Dot segments a browser removes, leaving "//evil.com": plain and percent-encoded.
        ("/.//evil.com", "/"),
        ("/..//evil.com", "/"),
        ("/%2e//evil.com", "/"),
        ("/%2E%2e//evil.com", "/"),
        ("/a/.%2e//evil.com", "/"),
        ("https://app.example.com/.//evil.com", "/"),
        ("https://app.example.com//evil.com", "/"),
        ("/a/../b/./c", "/a/../b/./c"),
        ("/%2e%2f/x", "/%2e%2f/x"),  # "%2f" separates nothing: "%2e%2f" is a name
        ("//..", "/"),  # a host named "..", not a path
        # Unparseable (urlsplit raises on them): the frontend URL, not a 500.
        ("https://[", "/"),
        ("https://[host]", "/"),
        ("https://[::1", "/"),
        ("https://app.example\uff0ecom/", "/"),
        ("https://ex\u2100ample.com/", "/"),
        # Too long to carry through Pinterest and back in a Location header.
        ("/" + "a" * 2048, "/"),
        ("/" + "a" * 2047, "/" + "a" * 2047),
    ],
)
async def test_return_to_only_to_trusted_places(
    database_url: str,
    pinterest: respx.MockRouter,
    return_to: str,
    expected: str,
) -> None:
    settings = make_settings(database_url, cors_origins="https://app.example.com")
    async with run_client(settings, pinterest) as client:
        mock_login_upstream(pinterest)
        state = await start_login(client, return_to=return_to)
        response = await client.get("/auth/callback", params={"code": "c", "state": state})
    assert response.status_code == 303
    assert response.headers["location"] == expected


async def test_new_session_id_at_every_login(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    first = (await log_in(client, pinterest)).cookies["pinauth_session"]
    second = (await log_in(client, pinterest)).cookies["pinauth_session"]

    assert first != second
    # The session the browser had before is ended, not left usable.
    client.cookies.clear()
    client.cookies.set("pinauth_session", first)
    assert (await client.get("/me")).status_code == 401


async def test_secure_cookies_when_served_over_https(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    settings = make_settings(database_url, redirect_uri="https://auth.example.com/auth/callback")
    async with run_client(settings, pinterest) as client:
        response = await client.get("/auth/login")
    assert "Secure" in set_cookies(response)["__Host-pinauth_login"]


# --- every bad state: a clear 4xx, no token request, no session ---------------------


async def _assert_rejected_without_token_request(
    client: httpx.AsyncClient,
    token_route: respx.Route,
    params: dict[str, str],
    cookies: dict[str, str] | None = None,
    expected_error: str = "invalid_state",
) -> None:
    if cookies is not None:
        client.cookies.clear()
        client.cookies.update(cookies)
    response = await client.get("/auth/callback", params=params, headers=JSON)
    assert response.status_code in (400, 403), response.text
    assert response.json()["error"] == expected_error
    assert response.json()["message"]
    assert token_route.call_count == 0
    assert "pinauth_session" not in set_cookies(response)
    assert (await client.get("/me")).status_code == 401


async def test_missing_state_is_rejected(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    await start_login(client)
    await _assert_rejected_without_token_request(client, token_route, {"code": "c"})


async def test_tampered_state_is_rejected(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(client)
    tampered = state[:-3] + ("AAA" if not state.endswith("AAA") else "BBB")
    await _assert_rejected_without_token_request(
        client, token_route, {"code": "c", "state": tampered}
    )


async def test_state_signed_with_another_key_is_rejected(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    await start_login(client)
    forged = URLSafeTimedSerializer("attacker-key", salt="pinauth.oauth-state").dumps(
        {"nonce_hash": "0" * 64, "return_to": "/"}
    )
    await _assert_rejected_without_token_request(
        client, token_route, {"code": "c", "state": forged}
    )


async def test_expired_state_is_rejected(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(client)

    class ElevenMinutesAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 660

    # Re-sign the genuine payload as if it had been issued 11 minutes ago.
    genuine = URLSafeTimedSerializer(
        settings.secret_key.get_secret_value(), salt="pinauth.oauth-state"
    )
    old = URLSafeTimedSerializer(
        settings.secret_key.get_secret_value(), salt="pinauth.oauth-state", signer=ElevenMinutesAgo
    ).dumps(genuine.loads(state))
    assert genuine.loads(old) == genuine.loads(state)  # genuine, only too old
    await _assert_rejected_without_token_request(client, token_route, {"code": "c", "state": old})


async def test_replayed_state_is_rejected(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(client)
    login_cookie = client.cookies["pinauth_login"]
    first = await client.get("/auth/callback", params={"code": "c", "state": state})
    assert first.status_code == 303
    token_route.reset()
    await client.post("/auth/logout")

    await _assert_rejected_without_token_request(
        client, token_route, {"code": "c", "state": state}, cookies={"pinauth_login": login_cookie}
    )


async def test_state_from_another_browser_is_rejected(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(client)  # the victim's login...
    # ...completed in the attacker's browser, which has its own (or no) login cookie.
    await _assert_rejected_without_token_request(
        client, token_route, {"code": "c", "state": state}, cookies={"pinauth_login": "other"}
    )
    await _assert_rejected_without_token_request(
        client, token_route, {"code": "c", "state": state}, cookies={}
    )


async def test_access_denied(client: httpx.AsyncClient, pinterest: respx.MockRouter) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(client)
    login_cookie = client.cookies["pinauth_login"]

    await _assert_rejected_without_token_request(
        client,
        token_route,
        {"error": "access_denied", "state": state},
        cookies={"pinauth_login": login_cookie},
        expected_error="access_denied",
    )
    # The denied login's state is burned: it cannot be replayed with a code.
    await _assert_rejected_without_token_request(
        client, token_route, {"code": "c", "state": state}, cookies={"pinauth_login": login_cookie}
    )


async def test_missing_code_with_valid_state(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(client)
    await _assert_rejected_without_token_request(
        client, token_route, {"state": state}, expected_error="invalid_request"
    )


# --- Pinterest failing during the callback ----------------------------------------


async def test_code_rejected_by_pinterest(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    pinterest.post(TOKEN_URL).respond(400, json={"code": 1, "message": "Invalid code"})
    state = await start_login(client)

    response = await client.get(
        "/auth/callback", params={"code": "bad", "state": state}, headers=JSON
    )

    assert response.status_code == 400
    assert response.json() == {"error": "authorization_failed", "message": "Invalid code"}
    assert "pinauth_session" not in set_cookies(response)


@pytest.mark.parametrize(
    ("failure", "status", "error"),
    [
        (httpx.Response(503, text="<html>down</html>"), 503, "upstream_error"),
        (httpx.ConnectError("connection refused"), 502, "upstream_error"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
    ],
)
async def test_token_endpoint_failure_is_a_clean_error(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    failure: httpx.Response | Exception,
    status: int,
    error: str,
) -> None:
    route = pinterest.post(TOKEN_URL)
    if isinstance(failure, Exception):
        route.side_effect = failure
    else:
        route.return_value = failure
    state = await start_login(client)

    response = await client.get(
        "/auth/callback", params={"code": "c", "state": state}, headers=JSON
    )

    assert response.status_code == status
    assert response.json()["error"] == error
    assert "refused" not in response.text
    assert "<html>" not in response.text


async def test_user_account_failure_stores_nothing(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    pinterest.post(TOKEN_URL).respond(200, json=token_json())
    pinterest.get(f"{API}/user_account").respond(403, json={"code": 403, "message": "nope"})
    state = await start_login(client)

    response = await client.get(
        "/auth/callback", params={"code": "c", "state": state}, headers=JSON
    )

    assert response.status_code == 502
    assert response.json()["error"] == "upstream_error"
    assert (await client.get("/me")).status_code == 401


async def test_login_without_client_id_is_a_clear_503(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    async with run_client(make_settings(database_url, client_id=""), pinterest) as client:
        response = await client.get("/auth/login")
    assert response.status_code == 503
    assert response.json()["error"] == "not_configured"
    assert "PINTEREST_CLIENT_ID" in response.json()["message"]
