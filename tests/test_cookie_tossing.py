"""Cookie tossing: a sibling subdomain setting `Domain=` cookies pinauth would read.

A request carrying the session (or login) cookie twice is refused with 400
`ambiguous_session`, never served with either; over https the cookies are `__Host-`
ones, which no other host can set. Chromium does it for real in
tests/test_e2e_cookie_tossing.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx
from asgi_lifespan import LifespanManager

from pinauth.app import create_app
from pinauth.settings import Settings
from tests.helpers import API, USER_ACCOUNT, log_in_as, make_settings, start_login, token_json

VICTIM = {"id": "1001", "username": "victim"}
ATTACKER = {"id": "2002", "username": "attacker"}
AMBIGUOUS = {
    "error": "ambiguous_session",
    "message": "The request carries more than one pinauth session or login cookie: another "
    "site (a sibling subdomain) may have set one. Clear this site's cookies and log in again.",
}


async def session_of(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, account: dict[str, Any], name: str
) -> str:
    """A fresh browser's login as `account`; its session cookie's value."""
    client.cookies.clear()
    await log_in_as(client, pinterest, account, f"pina_{account['id']}", f"pinr_{account['id']}")
    value = client.cookies[name]
    client.cookies.clear()
    return value


def cookie_headers(*headers: str) -> list[tuple[str, str]]:
    return [("cookie", header) for header in headers]


@pytest.fixture
async def sessions(client: httpx.AsyncClient, pinterest: respx.MockRouter) -> tuple[str, str]:
    """The victim's session cookie and the attacker's, from two real logins."""
    victim = await session_of(client, pinterest, VICTIM, "pinauth_session")
    attacker = await session_of(client, pinterest, ATTACKER, "pinauth_session")
    return victim, attacker


TOSSED = [
    # One Cookie header, the tossed cookie after the victim's (what Chromium sends for a
    # Domain= cookie set later on the same path) and before it.
    pytest.param(["pinauth_session={victim}; pinauth_session={attacker}"], id="last"),
    pytest.param(["pinauth_session={attacker}; other=1; pinauth_session={victim}"], id="first"),
    # Two Cookie headers (HTTP/2 sends one per cookie); Starlette reads the first only.
    pytest.param(["pinauth_session={victim}", "pinauth_session={attacker}"], id="two-headers"),
    # Whitespace around a name, which cookie parsers (Starlette's too) strip.
    pytest.param(["pinauth_session={victim}; pinauth_session ={attacker}"], id="spaced"),
    # The same value twice is refused too: no request carries two by accident.
    pytest.param(["pinauth_session={victim}; pinauth_session={victim}"], id="same-value"),
]
ROUTES = [
    ("GET", "/me"),
    ("GET", "/boards"),
    ("GET", "/pinterest/boards"),  # the proxy's fast path
    ("POST", "/pinterest/pins"),
    ("POST", "/auth/refresh"),
    ("POST", "/auth/logout"),
    ("DELETE", "/auth/connection"),
]


@pytest.mark.parametrize("headers", TOSSED)
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_two_session_cookies_are_refused_on_every_cookie_route(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    sessions: tuple[str, str],
    headers: list[str],
    method: str,
    path: str,
) -> None:
    """Guards the duplicate check in get_current_connection and read_session_cookie: every
    route acting for a cookie refuses two of them, and neither session is acted for."""
    victim, attacker = sessions
    upstream = pinterest.route(host="api.pinterest.com").respond(200, json={"items": []})
    filled = [h.format(victim=victim, attacker=attacker) for h in headers]
    response = await client.request(method, path, headers=cookie_headers(*filled))
    assert response.status_code == 400, response.text
    assert response.json() == AMBIGUOUS
    assert "set-cookie" not in response.headers
    assert upstream.call_count == 0
    # Neither session was ended, nor the connection deleted.
    for cookie in (victim, attacker):
        me = await client.get("/me", headers={"cookie": f"pinauth_session={cookie}"})
        assert me.status_code == 200, me.text


async def test_one_session_cookie_among_others_is_served(
    client: httpx.AsyncClient, sessions: tuple[str, str]
) -> None:
    """Guards against over-blocking: other cookies, or names that merely contain ours."""
    victim, attacker = sessions
    for header in (
        f"a=1; pinauth_session={victim}; b=2",
        f"x_pinauth_session={attacker}; pinauth_session={victim}",
        f"pinauth_session={victim}; pinauth_sessionx={attacker}",
    ):
        me = await client.get("/me", headers={"cookie": header})
        assert me.status_code == 200, (header, me.text)
        assert me.json()["username"] == "victim"


async def test_two_login_cookies_are_refused_at_the_callback(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards the duplicate check on the login cookie: a tossed login cookie beside the
    victim's own does not finish anyone's login, and no code is exchanged."""
    attacker_state = await start_login(client)
    attacker_nonce = client.cookies["pinauth_login"]
    client.cookies.clear()
    victim_state = await start_login(client)
    victim_nonce = client.cookies["pinauth_login"]
    client.cookies.clear()
    token = pinterest.post(f"{API}/oauth/token").respond(200, json=token_json())
    pinterest.get(f"{API}/user_account").respond(200, json=USER_ACCOUNT)
    for state in (attacker_state, victim_state):
        for first, second in ((victim_nonce, attacker_nonce), (attacker_nonce, victim_nonce)):
            response = await client.get(
                "/auth/callback",
                params={"code": "c", "state": state},
                headers={"cookie": f"pinauth_login={first}; pinauth_login={second}"},
            )
            # Refused outright, to a browser too: not a redirect that looks like a login.
            assert response.status_code == 400, response.text
            assert response.json() == AMBIGUOUS
            assert "set-cookie" not in response.headers
    assert token.call_count == 0
    # Neither login was burned: the victim's own completes with its one cookie.
    response = await client.get(
        "/auth/callback",
        params={"code": "c", "state": victim_state},
        headers={"cookie": f"pinauth_login={victim_nonce}"},
    )
    assert response.status_code == 303, response.text
    assert token.call_count == 1


async def test_two_session_cookies_are_refused_at_the_callback(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, sessions: tuple[str, str]
) -> None:
    """The callback reads the session cookie too (to end the previous session)."""
    victim, attacker = sessions
    state = await start_login(client)
    nonce = client.cookies["pinauth_login"]
    client.cookies.clear()
    token = pinterest.post(f"{API}/oauth/token").respond(200, json=token_json())
    cookie = f"pinauth_login={nonce}; pinauth_session={victim}; pinauth_session={attacker}"
    response = await client.get(
        "/auth/callback", params={"code": "c", "state": state}, headers={"cookie": cookie}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "ambiguous_session"
    assert token.call_count == 0


# --- https: __Host- cookies -------------------------------------------------------------

PUBLIC = "https://auth.example.com"


def https_settings(database_url: str, **overrides: Any) -> Settings:
    return make_settings(database_url, redirect_uri=f"{PUBLIC}/auth/callback", **overrides)


@pytest.fixture
async def https_client(
    database_url: str, pinterest: respx.MockRouter
) -> AsyncIterator[httpx.AsyncClient]:
    """pinauth served over https, reached like a browser reaches it (Secure cookies kept)."""
    app = create_app(
        https_settings(database_url), transport=httpx.MockTransport(pinterest.async_handler)
    )
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url=PUBLIC) as client,
    ):
        yield client


def set_cookie_headers(response: httpx.Response) -> dict[str, str]:
    return {h.split("=", 1)[0]: h for h in response.headers.get_list("set-cookie")}


async def test_https_cookies_are_host_prefixed(
    https_client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards the `__Host-` names: Secure, Path=/ and no Domain, which a browser requires of
    them, so no sibling subdomain can set one."""
    login = await https_client.get("/auth/login")
    assert login.status_code == 302
    [login_cookie] = set_cookie_headers(login).items()
    assert login_cookie[0] == "__Host-pinauth_login"
    attributes = [a.strip().lower() for a in login_cookie[1].split(";")[1:]]
    assert {"secure", "path=/", "httponly", "samesite=lax"} <= set(attributes)
    assert not [a for a in attributes if a.startswith("domain")]

    session = await log_in_as(https_client, pinterest, VICTIM, "pina_v", "pinr_v")
    cookies = set_cookie_headers(session)
    assert set(cookies) == {"__Host-pinauth_session", "__Host-pinauth_login"}
    assert "Secure" in cookies["__Host-pinauth_session"]
    assert "Domain" not in cookies["__Host-pinauth_session"]
    assert (await https_client.get("/me")).json()["username"] == "victim"

    logout = await https_client.post("/auth/logout")
    assert logout.status_code == 204
    assert set(set_cookie_headers(logout)) == {"__Host-pinauth_session"}


async def test_https_refuses_the_plain_names(
    https_client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards that https deployments read only the `__Host-` names: a plain-named cookie,
    which a sibling subdomain can set, is not a session nor a login, and is no duplicate."""
    await log_in_as(https_client, pinterest, VICTIM, "pina_v", "pinr_v")
    victim = https_client.cookies["__Host-pinauth_session"]
    https_client.cookies.clear()
    await log_in_as(https_client, pinterest, ATTACKER, "pina_a", "pinr_a")
    attacker = https_client.cookies["__Host-pinauth_session"]
    https_client.cookies.clear()

    plain = await https_client.get("/me", headers={"cookie": f"pinauth_session={attacker}"})
    assert plain.status_code == 401
    assert plain.json()["error"] == "not_authenticated"
    tossed = await https_client.get(
        "/me",
        headers={"cookie": f"__Host-pinauth_session={victim}; pinauth_session={attacker}"},
    )
    assert tossed.json()["username"] == "victim"
    twice = await https_client.get(
        "/me",
        headers={"cookie": f"__Host-pinauth_session={victim}; __Host-pinauth_session={attacker}"},
    )
    assert twice.status_code == 400
    assert twice.json()["error"] == "ambiguous_session"

    # A login cookie under the plain name does not bind a login.
    state = await start_login(https_client)
    nonce = https_client.cookies["__Host-pinauth_login"]
    https_client.cookies.clear()
    callback = await https_client.get(
        "/auth/callback",
        params={"code": "c", "state": state},
        headers={"cookie": f"pinauth_login={nonce}", "accept": "application/json"},
    )
    assert callback.status_code == 400
    assert callback.json()["error"] == "invalid_state"


async def test_http_deployments_keep_the_plain_names(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    """http://localhost (the demo) cannot have Secure cookies, so no `__Host-` ones."""
    assert not settings.secure_cookies
    response = await log_in_as(client, pinterest, VICTIM, "pina_v", "pinr_v")
    assert set(set_cookie_headers(response)) == {"pinauth_session", "pinauth_login"}
    assert (await client.get("/me")).json()["username"] == "victim"
