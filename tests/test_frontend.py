"""What a browser and a frontend on another origin get at pinauth's edges (issue 12):
failed logins reported to the frontend, one public origin for every login, CORS a real
frontend can use, / by mode, one request id and Vary, and a text log line for people.
(The same in real Chromium: tests/test_e2e_frontend.py.)"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from pinauth.app import create_app
from pinauth.frontend import with_error
from pinauth.logs import JsonFormatter, TextFormatter
from pinauth.security_headers import secured
from pinauth.settings import Settings
from tests.helpers import (
    API,
    SERVICE,
    TOKEN_URL,
    live_server,
    log_in,
    make_settings,
    mock_login_upstream,
    raw_connection,
    run_client,
    start_login,
)

FRONTEND = "http://localhost:5173"
JSON = {"Accept": "application/json"}
# What Chromium sends when it follows Pinterest's redirect to the callback.
NAVIGATION = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def frontend_settings(database_url: str) -> Settings:
    return make_settings(
        database_url, frontend_url=FRONTEND, cors_origins=FRONTEND, canonical_redirect=True
    )


@pytest.fixture
async def browser(
    frontend_settings: Settings, pinterest: respx.MockRouter
) -> AsyncIterator[httpx.AsyncClient]:
    async with run_client(frontend_settings, pinterest) as client:
        yield client


def error_of(response: httpx.Response) -> str:
    return parse_qs(urlsplit(response.headers["location"]).query)["pinauth_error"][0]


# --- failed callbacks go back to the frontend --------------------------------------


async def test_denied_consent_lands_on_return_to_with_the_error(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards the callback's redirect on failure: the frontend's own page (return_to,
    a path resolved against PINAUTH_FRONTEND_URL), its query kept, the code added."""
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(browser, return_to="/settings?tab=pins")

    response = await browser.get(
        "/auth/callback", params={"error": "access_denied", "state": state}, headers=NAVIGATION
    )

    assert response.status_code == 303
    assert response.headers["location"] == (
        f"{FRONTEND}/settings?tab=pins&pinauth_error=access_denied"
    )
    assert "accept" in response.headers["vary"].lower()
    assert "pinauth_session" not in response.cookies
    assert token_route.call_count == 0
    # Burned all the same: the denied login's state cannot be replayed with a code.
    again = await browser.get("/auth/callback", params={"code": "c", "state": state})
    assert error_of(again) == "invalid_state"
    assert token_route.call_count == 0


async def test_a_successful_login_lands_on_the_frontends_path(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards return_to relative to an absolute PINAUTH_FRONTEND_URL: the README's
    return_to=/settings is the frontend's /settings, not pinauth's."""
    mock_login_upstream(pinterest)
    state = await start_login(browser, return_to="/settings")

    response = await browser.get("/auth/callback", params={"code": "c", "state": state})

    assert response.status_code == 303
    assert response.headers["location"] == f"{FRONTEND}/settings"
    assert "pinauth_session" in response.cookies


@pytest.mark.parametrize(
    "params",
    [
        {"code": "c"},
        {"code": "c", "state": "not-a-state"},
        {"code": "c", "state": "x" * 10_000},
        {"error": "access_denied"},
    ],
)
async def test_a_callback_with_no_usable_state_goes_to_the_frontend_url(
    browser: httpx.AsyncClient, params: dict[str, str]
) -> None:
    response = await browser.get("/auth/callback", params=params, headers=NAVIGATION)

    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith(f"{FRONTEND}/?pinauth_error=")
    assert error_of(response) == params.get("error", "invalid_state")


async def test_an_expired_state_still_finds_its_frontend_page(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter, frontend_settings: Settings
) -> None:
    """An expired login (the state is genuine, only too old) is refused, and the browser
    goes back to the page that started it, told invalid_state."""
    token_route, _ = mock_login_upstream(pinterest)
    state = await start_login(browser, return_to="/settings")
    secret = frontend_settings.secret_key.get_secret_value()

    class ElevenMinutesAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 660

    genuine = URLSafeTimedSerializer(secret, salt="pinauth.oauth-state")
    old = URLSafeTimedSerializer(secret, salt="pinauth.oauth-state", signer=ElevenMinutesAgo).dumps(
        genuine.loads(state)
    )

    response = await browser.get("/auth/callback", params={"code": "c", "state": old})

    assert response.headers["location"] == f"{FRONTEND}/settings?pinauth_error=invalid_state"
    assert token_route.call_count == 0


@pytest.mark.parametrize(
    ("return_to", "signed_with"),
    [
        ("https://evil.example/steal", "attacker-key"),
        ("https://evil.example/steal", None),  # pinauth's key: trusted once, not now
        ("//evil.example/steal", None),
        ("/\\evil.example", None),
    ],
)
async def test_a_failed_callback_never_redirects_off_the_trusted_origins(
    browser: httpx.AsyncClient,
    frontend_settings: Settings,
    return_to: str,
    signed_with: str | None,
) -> None:
    """Guards the confinement of the failure redirect: a state's return_to is used only
    if pinauth signed it and it is on a trusted origin now; else PINAUTH_FRONTEND_URL."""
    key = signed_with or frontend_settings.secret_key.get_secret_value()
    state = URLSafeTimedSerializer(key, salt="pinauth.oauth-state").dumps(
        {"nonce_hash": "0" * 64, "return_to": return_to}
    )

    response = await browser.get("/auth/callback", params={"code": "c", "state": state})

    assert response.headers["location"] == f"{FRONTEND}/?pinauth_error=invalid_state"


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (httpx.Response(503, text="<html>down</html>"), "upstream_error"),
        (httpx.ConnectError("connection refused"), "upstream_error"),
        (httpx.ReadTimeout("slow"), "upstream_timeout"),
        (httpx.Response(400, json={"code": 1, "message": "Invalid code"}), "authorization_failed"),
        (RuntimeError("a bug"), "internal_error"),
    ],
)
async def test_pinterest_failing_during_the_callback_is_reported_to_the_frontend(
    browser: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    failure: httpx.Response | Exception,
    code: str,
) -> None:
    route = pinterest.post(TOKEN_URL)
    if isinstance(failure, Exception):
        route.side_effect = failure
    else:
        route.return_value = failure
    state = await start_login(browser, return_to=f"{FRONTEND}/connect?step=2")

    response = await browser.get("/auth/callback", params={"code": "c", "state": state})

    assert response.status_code == 303
    assert response.headers["location"] == f"{FRONTEND}/connect?step=2&pinauth_error={code}"
    assert (await browser.get("/me")).status_code == 401


async def test_an_api_client_asking_for_json_gets_the_error_itself(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    state = await start_login(browser)
    pinterest.post(TOKEN_URL).respond(503)

    denied = await browser.get(
        "/auth/callback", params={"error": "access_denied", "state": state}, headers=JSON
    )
    forged = await browser.get("/auth/callback", params={"code": "c", "state": "x"}, headers=JSON)

    assert (denied.status_code, denied.json()["error"]) == (403, "access_denied")
    assert (forged.status_code, forged.json()["error"]) == (400, "invalid_state")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/", "/?pinauth_error=invalid_state"),
        ("http://app.example", "http://app.example/?pinauth_error=invalid_state"),
        ("/a?b=1&c=", "/a?b=1&c=&pinauth_error=invalid_state"),
        ("/a?pinauth_error=old&b=2", "/a?b=2&pinauth_error=invalid_state"),
        ("/a?q=x%26y#frag", "/a?q=x%26y&pinauth_error=invalid_state#frag"),
    ],
)
def test_the_error_code_merges_into_the_query(url: str, expected: str) -> None:
    assert with_error(url, "invalid_state") == expected


# --- one public origin for the whole login -----------------------------------------


@pytest.mark.parametrize("path", ["/auth/login?return_to=%2Fsettings%3Fa%3D1", "/"])
async def test_another_host_name_is_sent_to_the_public_origin_first(
    browser: httpx.AsyncClient, path: str
) -> None:
    """Guards the host canonicalisation: a login started at 127.0.0.1 would set its login
    cookie there, and the callback on localhost would never see it."""
    response = await browser.get(path, headers={"Host": "127.0.0.1:8000"})

    assert response.status_code == 307
    assert response.headers["location"] == f"{SERVICE}{path}"
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize("host", ["localhost:8000", "LOCALHOST:8000"])
async def test_the_public_host_is_served_in_place(browser: httpx.AsyncClient, host: str) -> None:
    response = await browser.get("/auth/login", headers={"Host": host})

    assert response.status_code == 302
    assert response.headers["location"].startswith("https://www.pinterest.com/oauth/")


@pytest.mark.parametrize(
    ("host", "moved"),
    [
        ("auth.example.com", False),
        ("auth.example.com:443", False),  # a proxy that spells the default port out
        ("10.0.0.5:8000", True),
        ("pinauth:8000", True),
    ],
)
async def test_behind_https_only_the_host_is_compared(
    database_url: str, pinterest: respx.MockRouter, host: str, moved: bool
) -> None:
    """The app sees http behind a TLS-terminating proxy: comparing schemes would loop."""
    settings = make_settings(
        database_url,
        redirect_uri="https://auth.example.com/auth/callback",
        canonical_redirect=True,
    )
    async with run_client(settings, pinterest) as client:
        response = await client.get("/auth/login", headers={"Host": host})

    if moved:
        assert response.status_code == 307
        assert response.headers["location"] == "https://auth.example.com/auth/login"
    else:
        assert response.status_code == 302


async def test_the_host_redirect_can_be_turned_off(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    settings = make_settings(database_url, canonical_redirect=False)
    async with run_client(settings, pinterest) as client:
        response = await client.get("/auth/login", headers={"Host": "127.0.0.1:8000"})
    assert response.status_code == 302


# --- / by mode ---------------------------------------------------------------------


async def test_without_demo_mode_slash_is_an_index(browser: httpx.AsyncClient) -> None:
    """Guards the demo page's setting: with real credentials, / offers no working
    "Create board" form, only where the documentation is."""
    response = await browser.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["docs"] == "/docs"
    assert "create-board" not in response.text
    # Nor is the page (or its script) served by another name.
    for path in ("/static/index.html", "/static/demo.js"):
        assert (await browser.get(path)).status_code == 404


async def test_in_demo_mode_slash_is_the_demo_page(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    settings = make_settings(database_url, demo_page=True)
    async with run_client(settings, pinterest) as client:
        response = await client.get("/")

    assert response.headers["content-type"].startswith("text/html")
    assert 'id="create-board"' in response.text


# --- CORS for a frontend on another origin ------------------------------------------


async def test_a_preflight_accepts_x_request_id(browser: httpx.AsyncClient) -> None:
    """Guards X-Request-ID in Access-Control-Allow-Headers: the README invites sending it."""
    response = await browser.options(
        "/pinterest/boards",
        headers={
            "Origin": FRONTEND,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-request-id",
        },
    )

    assert response.status_code == 200, response.text
    allowed = {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    assert {"content-type", "x-request-id"} <= set(allowed)


async def test_responses_expose_what_a_frontend_needs_to_read(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards Access-Control-Expose-Headers: without it, cross-origin JavaScript reads no
    Retry-After, request id or Pinterest rate-limit header."""
    await log_in(browser, pinterest)
    pinterest.get(f"{API}/boards").respond(
        429,
        json={"code": 8, "message": "Too many requests"},
        headers={"Retry-After": "30", "X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "10"},
    )

    response = await browser.get("/pinterest/boards", headers={"Origin": FRONTEND})

    exposed = {
        h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")
    }
    assert {
        "retry-after",
        "x-request-id",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-userendpoint-ratelimit-remaining",
    } <= exposed
    assert response.headers["retry-after"] == "30"


# --- one request id, one Vary -------------------------------------------------------


def test_secured_keeps_one_request_id_and_merges_vary() -> None:
    """Guards the merge in security_headers.secured: an inner layer's request id and a
    Vary that two layers both added come out once."""
    ours = (b"x-request-id", b"ours")
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"inner"),
        (b"vary", b"Origin, Accept"),
        (b"vary", b"origin"),
    ]

    result = secured(headers, ours)

    assert [v for k, v in result if k == b"x-request-id"] == [b"ours"]
    assert [v for k, v in result if k == b"vary"] == [b"Origin, Accept"]
    assert secured([(b"vary", b"Origin, Origin")], ours).count((b"vary", b"Origin")) == 1


def _raw_headers(response: bytes) -> list[tuple[bytes, bytes]]:
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [
        (name.strip().lower(), value.strip())
        for name, value in (line.split(b":", 1) for line in head)
    ]


async def test_no_response_repeats_a_request_id_or_a_vary_value(
    frontend_settings: Settings, pinterest: respx.MockRouter
) -> None:
    """On the wire, through a real uvicorn: proxied answers (whose upstream sends its own
    X-Request-ID and Vary), the callback (Vary: Accept, then CORS's Origin), a preflight,
    an error, each with an allowed, a foreign and no Origin."""
    pinterest.get(f"{API}/boards").respond(
        200,
        json={"items": []},
        headers={"X-Request-ID": "upstream", "Vary": "Origin, Accept-Encoding"},
    )
    mock_login_upstream(pinterest)
    app = create_app(frontend_settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with (
        live_server(app) as base,
        httpx.AsyncClient(base_url=base, headers={"Host": "localhost:8000"}) as client,
    ):
        state = await start_login(client)
        await client.get("/auth/callback", params={"code": "c", "state": state})
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        requests = [
            ("GET", "/pinterest/boards", ""),
            ("GET", "/boards", ""),
            ("GET", "/auth/callback?state=x", ""),
            ("GET", "/me", ""),
            ("GET", "/nope", ""),
            ("OPTIONS", "/pinterest/boards", "Access-Control-Request-Method: GET\r\n"),
        ]
        for method, target, extra in requests:
            for origin in ("", f"Origin: {FRONTEND}\r\n", "Origin: https://evil.example\r\n"):
                async with raw_connection(base) as connection:
                    connection.send(
                        f"{method} {target} HTTP/1.1\r\nHost: localhost:8000\r\n"
                        f"Cookie: {cookie}\r\n{origin}{extra}Connection: close\r\n\r\n".encode()
                    )
                    headers = _raw_headers(await connection.wait_closed())
                names = [name for name, _ in headers]
                assert names.count(b"x-request-id") == 1, (method, target, origin, headers)
                assert names.count(b"vary") <= 1, (method, target, origin, headers)
                for name, value in headers:
                    if name == b"vary":
                        fields = [f.strip().lower() for f in value.split(b",")]
                        assert len(fields) == len(set(fields)), (method, target, origin, value)


# --- the text log, for people --------------------------------------------------------


@contextmanager
def access_lines(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("pinauth.access")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


async def test_the_text_log_says_what_each_request_was(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards the text access line: method, path without its query, status, duration,
    request id and connection id on one line; a path cannot split or forge it."""
    await log_in(browser, pinterest)
    connection_id = (await browser.get("/me")).json()["connection_id"]
    pinterest.get(f"{API}/boards").respond(200, json={"items": []})
    text = TextFormatter("%(levelname)s %(name)s: %(message)s")

    with access_lines(text) as stream:
        proxied = await browser.get("/pinterest/boards", params={"bookmark": "SECRET-QUERY"})
        browser.cookies.clear()
        anonymous = await browser.get("/me%0Aforged%20line")

    lines = stream.getvalue().splitlines()
    assert lines[0] == (
        f"INFO pinauth.access: GET /pinterest/boards 200 "
        f"{lines[0].split()[5]} request_id={proxied.headers['x-request-id']} "
        f"connection_id={connection_id}"
    )
    assert re.fullmatch(r"\d+(\.\d+)?ms", lines[0].split()[5])
    assert lines[1].startswith("INFO pinauth.access: GET /me%0Aforged%20line 404 ")
    assert lines[1].endswith(f"request_id={anonymous.headers['x-request-id']} connection_id=-")
    assert len(lines) == 2
    assert "SECRET-QUERY" not in stream.getvalue()


async def test_the_json_log_keeps_its_fields(
    browser: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    with access_lines(JsonFormatter()) as stream:
        response = await browser.get("/healthz?x=1")

    [line] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert line["event"] == "request"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/healthz", 200)
    assert line["request_id"] == response.headers["x-request-id"]
    assert "connection_id" not in line
