"""/pinterest/{path}: passthrough, confinement, headers, refresh on 401, retries."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pinauth.app import create_app
from pinauth.pinterest.client import retry_after_seconds
from pinauth.pinterest.paths import InvalidPath, confine
from pinauth.settings import Settings
from tests.helpers import (
    ACCESS_1,
    ACCESS_2,
    API,
    REFRESH_2,
    SERVICE,
    TOKEN_URL,
    browsers,
    captured_logs,
    counted_client,
    events,
    live_server,
    log_in,
    make_settings,
    mock_login_upstream,
    raw_request,
    run_client,
    start_login,
    token_json,
    warm_up,
)

BOARD = {"id": "549755885175", "name": "Recipes", "privacy": "PUBLIC"}


async def log_in_with(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, **tokens: object
) -> None:
    """Log in with a token response of the test's choosing (e.g. already expired)."""
    mock_login_upstream(pinterest, token_json(**tokens))  # type: ignore[arg-type]
    state = await start_login(client)
    response = await client.get("/auth/callback", params={"code": "c", "state": state})
    assert response.status_code == 303
    pinterest.reset()


def bearer(route: respx.Route, index: int = -1) -> str:
    return str(route.calls[index].request.headers["authorization"])


# --- passthrough -------------------------------------------------------------------


async def test_get_passes_query_and_token_and_returns_pinterest_unchanged(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    body = b'{"items": [], "bookmark": null}'
    route = pinterest.get(f"{API}/boards/123/pins").respond(
        200,
        content=body,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Set-Cookie": "_pinterest_sess=abc; Path=/",
            "X-RateLimit-Remaining": "99",
            "Keep-Alive": "timeout=5",
            "Cache-Control": "public, max-age=600",
        },
    )

    response = await client.get(
        "/pinterest/boards/123/pins?page_size=25&bookmark=b%2B1&pin_metrics=true"
    )

    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["x-ratelimit-remaining"] == "99"
    assert response.headers["cache-control"] == "no-store"
    assert "set-cookie" not in response.headers
    assert "keep-alive" not in response.headers
    sent = route.calls.last.request
    assert str(sent.url) == f"{API}/boards/123/pins?page_size=25&bookmark=b%2B1&pin_metrics=true"
    assert sent.headers["authorization"] == f"Bearer {ACCESS_1}"


async def test_post_body_passes_through(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    route = pinterest.post(f"{API}/boards").respond(201, json=BOARD)
    payload = json.dumps({"name": "Recipes", "privacy": "PUBLIC"}).encode()

    response = await client.post(
        "/pinterest/boards", content=payload, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 201
    assert response.json() == BOARD
    assert route.calls.last.request.content == payload
    assert route.calls.last.request.headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [400, 403, 404, 409])
async def test_pinterest_errors_pass_through_unchanged(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, status: int
) -> None:
    await log_in(client, pinterest)
    error = b'{"code": 2000, "message": "Board not found."}'
    pinterest.get(f"{API}/boards/9").respond(
        status, content=error, headers={"Content-Type": "application/json"}
    )

    response = await client.get("/pinterest/boards/9")

    assert response.status_code == status
    assert response.content == error


async def test_proxy_requires_a_session(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    route = pinterest.get(f"{API}/boards").respond(200, json={})
    response = await client.get("/pinterest/boards")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert route.call_count == 0


# --- headers -----------------------------------------------------------------------


async def test_only_allowlisted_headers_reach_pinterest(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    route = pinterest.put(f"{API}/boards/1").respond(200, json=BOARD)

    await client.put(
        "/pinterest/boards/1",
        content=b"{}",
        headers={
            "Accept": "application/json",
            "Accept-Language": "fr",
            "Content-Type": "application/json",
            # A browser names no connection; if it tries, the header is ignored (the
            # cookie decides) and goes no further.
            "Pinauth-Connection-Id": "conn_someone_else",
            "Cookie": f"pinauth_session={client.cookies['pinauth_session']}; other=1",
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=10.0.0.1",
            "X-Custom-Secret": "nope",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        },
    )

    sent = route.calls.last.request.headers
    assert sent["authorization"] == f"Bearer {ACCESS_1}"
    assert sent["accept"] == "application/json"
    assert sent["accept-language"] == "fr"
    assert sent["content-type"] == "application/json"
    assert sent["host"] == "api.pinterest.com"
    for name in (
        "cookie",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
        "x-custom-secret",
        "upgrade",
        "proxy-authorization",
        "pinauth-connection-id",
    ):
        assert name not in sent, name
    assert client.cookies["pinauth_session"] not in str(sent)


async def test_headers_named_in_connection_are_not_forwarded(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    route = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

    await client.get(
        "/pinterest/boards",
        headers={"Accept-Language": "fr", "Connection": "keep-alive, Accept-Language"},
    )

    assert "accept-language" not in route.calls.last.request.headers


async def test_upstream_cookies_are_never_replayed(database_url: str) -> None:
    """Guards both cookie jars (the OAuth client's and the proxy transport's): a cookie
    Pinterest sets on one user's response never rides along with another user's request.

    Runs over real HTTP against a loopback stand-in, with pinauth's real transport: a
    mocked transport has no cookie jar to break. It fails with either jar removed.
    """
    seen_cookies: list[str] = []

    async def record(request: Request) -> None:
        seen_cookies.extend(request.headers.getlist("cookie"))

    def with_cookie(response: Response, name: str) -> Response:
        # Host-only cookies on a name (not an IP), which every cookie jar would keep.
        response.set_cookie(name, "from-" + name, path="/")
        return response

    async def token(request: Request) -> Response:
        await record(request)
        code = (await request.form())["code"]
        return with_cookie(JSONResponse(token_json(f"pina_{code}", f"pinr_{code}")), "oauth")

    async def user_account(request: Request) -> Response:
        await record(request)
        user = request.headers["authorization"].removeprefix("Bearer pina_")
        return with_cookie(JSONResponse({"id": user, "username": user}), "account")

    async def boards(request: Request) -> Response:
        await record(request)
        return with_cookie(JSONResponse({"items": []}), "tracker")

    stand_in = Starlette(
        routes=[
            Route("/v5/oauth/token", token, methods=["POST"]),
            Route("/v5/user_account", user_account),
            Route("/v5/boards", boards),
        ]
    )
    async with live_server(stand_in) as upstream:  # type: ignore[arg-type]
        api = upstream.replace("127.0.0.1", "localhost") + "/v5"
        settings = make_settings(database_url, api_url=api)
        async with browsers(settings, None, 2) as (alice, bob):
            for browser, user in ((alice, "alice"), (bob, "bob"), (alice, "alice")):
                state = await start_login(browser)
                callback = await browser.get(
                    "/auth/callback", params={"code": user, "state": state}
                )
                assert callback.status_code == 303
                assert (await browser.get("/pinterest/boards")).status_code == 200

    assert seen_cookies == []


# --- path confinement (through a real uvicorn, which decodes %2F before routing) ----

ESCAPES = [
    "..%2f..%2foauth%2ftoken",
    "%2e%2e/%2e%2e/x",
    "%252e%252e/x",
    "%2e%2e%2fx",
    "http://127.0.0.1:9/x",
    "http:%2f%2f127.0.0.1:9/x",
    "//127.0.0.1:9/x",
    "@127.0.0.1:9/x",
    "127.0.0.1:9/x",
    "..;/x",
    "..\\..\\x",
    "..%5c..%5cx",
    "boards/../../oauth/token",
    "../x",
    "boards/./x",
    "boards//x",
    "boards/",
    "boards%00",
    "boards%0d%0aHost:%20evil",
    "boards/%2540evil",
    "oauth/token",
    "OAuth/token/revoke",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_confine_refuses_escapes(payload: str) -> None:
    with pytest.raises(InvalidPath):
        confine(payload)


@pytest.mark.parametrize("path", ["boards", "boards/1/pins", "user_account", "pins/1.2-3_x~y"])
def test_confine_accepts_pinterest_paths(path: str) -> None:
    assert confine(path) == path


async def test_no_payload_escapes_the_api_base_over_real_http(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    async with live_server(app) as base, httpx.AsyncClient(base_url=base) as client:
        await log_in(client, pinterest)
        cookie = f"pinauth_session={client.cookies['pinauth_session']}"
        # A recording stand-in for every host: whatever is requested anywhere is seen here.
        pinterest.route().respond(200, json={"reached": True})

        for payload in ESCAPES:
            for method in ("GET", "POST", "DELETE"):
                status, body = await raw_request(base, method, f"/pinterest/{payload}", cookie)
                assert status in (400, 404), (payload, method, status)
                if b"{" in body:
                    assert json.loads(body)["error"] in ("invalid_path", "not_found"), body
        assert pinterest.calls.call_count == 0, [str(c.request.url) for c in pinterest.calls]

        for good in ("boards", "boards/1/pins?bookmark=a%2Fb&x=..%2f..", "user_account"):
            status, _ = await raw_request(base, "GET", f"/pinterest/{good}", cookie)
            assert status == 200
    urls = [str(call.request.url) for call in pinterest.calls]
    assert urls == [
        f"{API}/boards",
        f"{API}/boards/1/pins?bookmark=a%2Fb&x=..%2f..",
        f"{API}/user_account",
    ]


async def test_body_size_is_capped(database_url: str, pinterest: respx.MockRouter) -> None:
    settings = make_settings(database_url, max_body_bytes=1024)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        route = pinterest.post(f"{API}/pins").respond(201, json={})

        too_big = await client.post("/pinterest/pins", content=b"x" * 1025)

        async def chunked() -> object:  # no Content-Length: the cap applies while reading
            for _ in range(4):
                yield b"x" * 400

        streamed = await client.post("/pinterest/pins", content=chunked())  # type: ignore[arg-type]
        fits = await client.post("/pinterest/pins", content=b"x" * 1024)
        # "²" (Latin-1 0xB2) is a digit to str.isdigit() but not to int(): a declared
        # length that says nothing, so the cap applies while reading.
        superscript = [(b"Content-Length", b"\xb2")]
        declared_big = await client.post(
            "/pinterest/pins", content=b"x" * 1025, headers=superscript
        )
        declared_small = await client.post(
            "/pinterest/pins", content=b"x" * 10, headers=superscript
        )

    assert too_big.status_code == 413
    assert too_big.json()["error"] == "payload_too_large"
    assert streamed.status_code == 413
    assert declared_big.status_code == 413, declared_big.text
    assert fits.status_code == 201
    assert declared_small.status_code == 201, declared_small.text
    assert route.call_count == 2


# --- refresh -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_401_refreshes_once_and_retries(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, method: str
) -> None:
    await log_in(client, pinterest)
    token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
    api = pinterest.route(method=method, url=f"{API}/boards").mock(
        side_effect=[
            httpx.Response(401, json={"code": 2, "message": "Authentication failed."}),
            httpx.Response(200, json={"items": [BOARD]}),
        ]
    )

    response = await client.request(method, "/pinterest/boards", content=b"{}")

    assert response.status_code == 200
    assert token.call_count == 1
    assert api.call_count == 2
    assert bearer(api, 0) == f"Bearer {ACCESS_1}"
    assert bearer(api, 1) == f"Bearer {ACCESS_2}"
    # Later calls use the new token without refreshing again.
    api.side_effect = None
    api.return_value = httpx.Response(200, json={"items": []})
    await client.request(method, "/pinterest/boards", content=b"{}")
    assert bearer(api) == f"Bearer {ACCESS_2}"
    assert token.call_count == 1


async def test_insufficient_scope_401_does_not_refresh(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
    scope_error = {"code": 3, "message": "Your token does not have sufficient permissions."}
    api = pinterest.post(f"{API}/boards").respond(401, json=scope_error)

    response = await client.post("/pinterest/boards", json={"name": "x"})

    assert response.status_code == 401
    assert response.json() == scope_error
    assert token.call_count == 0
    assert api.call_count == 1


async def test_proactive_refresh_before_expiry(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in_with(client, pinterest, expires_in=60)  # inside the 300 s margin
    token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
    api = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

    assert (await client.get("/pinterest/boards")).status_code == 200

    assert token.call_count == 1
    assert api.call_count == 1
    assert bearer(api) == f"Bearer {ACCESS_2}"


async def test_failed_proactive_refresh_still_uses_a_valid_token(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in_with(client, pinterest, expires_in=60)
    token = pinterest.post(TOKEN_URL).respond(503)
    api = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

    first = await client.get("/pinterest/boards")
    second = await client.get("/pinterest/boards")

    assert (first.status_code, second.status_code) == (200, 200)
    assert bearer(api) == f"Bearer {ACCESS_1}"
    assert token.call_count == 1  # the cooldown spares Pinterest the second attempt


async def test_expired_token_and_token_endpoint_down_is_a_503(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in_with(client, pinterest, expires_in=0)
    pinterest.post(TOKEN_URL).mock(side_effect=httpx.ConnectError("refused"))
    api = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

    response = await client.get("/pinterest/boards")

    assert response.status_code == 503
    assert response.json()["error"] == "upstream_error"
    assert int(response.headers["retry-after"]) >= 1
    assert api.call_count == 0


async def test_50_concurrent_requests_with_an_expired_token_refresh_once(
    pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards single flight on the proxy: the token answer waits until all 50 calls are
    inside pinauth at once. Fails (50 token requests) without the lock on SQLite."""
    async with counted_client(settings, pinterest) as (client, in_flight):
        await log_in_with(client, pinterest, expires_in=0)
        await warm_up(client)

        async def token_endpoint(_request: httpx.Request) -> httpx.Response:
            await in_flight.reached(50)
            return httpx.Response(200, json=token_json(ACCESS_2, REFRESH_2))

        token = pinterest.post(TOKEN_URL).mock(side_effect=token_endpoint)
        api = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

        responses = await asyncio.gather(*(client.get("/pinterest/boards") for _ in range(50)))

    assert [r.status_code for r in responses] == [200] * 50
    assert token.call_count == 1
    assert api.call_count == 50
    assert {bearer(api, i) for i in range(50)} == {f"Bearer {ACCESS_2}"}


async def test_revoked_refresh_token_requires_reauthorization_without_a_storm(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in_with(client, pinterest, expires_in=0)
    token = pinterest.post(TOKEN_URL).respond(400, json={"code": 1, "message": "revoked"})
    api = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

    responses = await asyncio.gather(*(client.get("/pinterest/boards") for _ in range(10)))
    later = await client.get("/pinterest/boards")

    for response in [*responses, later]:
        assert response.status_code == 401
        assert response.json()["error"] == "reauthorization_required"
        assert response.json()["login_url"] == f"{SERVICE}/auth/login"
    assert token.call_count == 1
    assert api.call_count == 0


async def test_token_changed_by_another_replica_is_used_without_refreshing(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Replica B refreshes; replica A's cached token then gets a 401 and A must not
    refresh again (its refresh token is dead) but retry with B's new token."""
    settings_a = make_settings(database_url)
    settings_b = make_settings(database_url, encryption_keys=settings_a.encryption_keys[0])
    async with run_client(settings_a, pinterest) as a, run_client(settings_b, pinterest) as b:
        await log_in(a, pinterest)
        b.cookies.update(a.cookies)
        api = pinterest.get(f"{API}/boards").mock(
            side_effect=lambda request: httpx.Response(
                200 if request.headers["authorization"] == f"Bearer {ACCESS_2}" else 401,
                json={"items": []},
            )
        )
        assert (await a.get("/me")).status_code == 200  # A now caches the connection...
        token = pinterest.post(TOKEN_URL).respond(200, json=token_json(ACCESS_2, REFRESH_2))
        assert (await b.post("/auth/refresh")).status_code == 200

        response = await a.get("/pinterest/boards")

    assert response.status_code == 200
    assert token.call_count == 1  # B's refresh only
    assert [bearer(api, i) for i in range(api.call_count)] == [
        f"Bearer {ACCESS_1}",
        f"Bearer {ACCESS_2}",
    ]


# --- retries -----------------------------------------------------------------------


async def test_429_on_get_is_retried_after_retry_after(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    api = pinterest.get(f"{API}/boards").mock(
        side_effect=[
            httpx.Response(
                429, json={"code": 8, "message": "slow down"}, headers={"Retry-After": "0"}
            ),
            httpx.Response(200, json={"items": []}),
        ]
    )

    response = await client.get("/pinterest/boards")

    assert response.status_code == 200
    assert api.call_count == 2


async def test_429_beyond_the_budget_is_returned_with_retry_after(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    body = {"code": 8, "message": "slow down"}
    api = pinterest.get(f"{API}/boards").respond(429, json=body, headers={"Retry-After": "60"})

    response = await client.get("/pinterest/boards")

    assert response.status_code == 429
    assert response.json() == body
    assert response.headers["retry-after"] == "60"
    assert api.call_count == 1


async def test_429_on_post_is_returned_not_retried(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    api = pinterest.post(f"{API}/pins").respond(429, json={"code": 8}, headers={"Retry-After": "0"})

    response = await client.post("/pinterest/pins", json={})

    assert response.status_code == 429
    assert response.headers["retry-after"] == "0"
    assert api.call_count == 1


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_503_on_non_idempotent_methods_is_not_retried(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, method: str
) -> None:
    await log_in(client, pinterest)
    api = pinterest.route(method=method, url=f"{API}/pins").respond(503, json={"code": 0})

    response = await client.request(method, "/pinterest/pins", json={})

    assert response.status_code == 503
    assert api.call_count == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("status", [502, 503, 504])
async def test_idempotent_methods_retry_5xx_at_most_max_retries(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, method: str, status: int
) -> None:
    await log_in(client, pinterest)
    api = pinterest.route(method=method, url=f"{API}/boards/1").respond(status, json={"code": 0})

    response = await client.request(method, "/pinterest/boards/1")

    assert response.status_code == status
    assert response.json() == {"code": 0}
    assert api.call_count == 3  # the first attempt and two retries


async def test_transient_failure_then_success(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    api = pinterest.get(f"{API}/boards").mock(
        side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json={"items": []})]
    )
    assert (await client.get("/pinterest/boards")).status_code == 200
    assert api.call_count == 2


@pytest.mark.parametrize(
    ("method", "failure", "status", "error", "calls"),
    [
        ("GET", httpx.ReadTimeout("timed out"), 504, "upstream_timeout", 1),
        ("POST", httpx.ReadTimeout("timed out"), 504, "upstream_timeout", 1),
        ("GET", httpx.ConnectError("[Errno 111] refused 10.1.2.3"), 502, "upstream_error", 3),
        ("POST", httpx.ConnectError("[Errno 111] refused 10.1.2.3"), 502, "upstream_error", 1),
        ("GET", httpx.ReadError("connection reset by peer"), 502, "upstream_error", 3),
    ],
)
async def test_network_failures_are_clean_errors(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    method: str,
    failure: Exception,
    status: int,
    error: str,
    calls: int,
) -> None:
    await log_in(client, pinterest)
    api = pinterest.route(method=method, url=f"{API}/boards").mock(side_effect=failure)

    response = await client.request(method, "/pinterest/boards")

    assert response.status_code == status
    assert response.json()["error"] == error
    assert "10.1.2.3" not in response.text
    assert "reset" not in response.text
    assert api.call_count == calls


# --- /boards -----------------------------------------------------------------------


async def test_boards_passes_paging_through(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    api = pinterest.get(f"{API}/boards").respond(200, json={"items": [BOARD], "bookmark": "next"})

    response = await client.get("/boards", params={"page_size": 10, "bookmark": "b1"})

    assert response.status_code == 200
    assert response.json() == {"items": [BOARD], "bookmark": "next"}
    assert parse_qs(api.calls.last.request.url.query.decode()) == {
        "page_size": ["10"],
        "bookmark": ["b1"],
    }


async def test_boards_all_follows_bookmarks(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    pages = {
        None: {"items": [{"id": "1"}], "bookmark": "p2"},
        "p2": {"items": [{"id": "2"}], "bookmark": "p3"},
        "p3": {"items": [{"id": "3"}], "bookmark": None},
    }
    pinterest.get(f"{API}/boards").mock(
        side_effect=lambda request: httpx.Response(
            200, json=pages[request.url.params.get("bookmark")]
        )
    )

    response = await client.get("/boards", params={"all": "true", "page_size": 250})

    assert response.json() == {"items": [{"id": "1"}, {"id": "2"}, {"id": "3"}], "bookmark": None}


async def test_boards_all_stops_at_the_bound(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    async with run_client(make_settings(database_url, boards_max_pages=3), pinterest) as client:
        await log_in(client, pinterest)
        api = pinterest.get(f"{API}/boards").mock(
            side_effect=lambda request: httpx.Response(
                200, json={"items": [{"id": "x"}], "bookmark": "again"}
            )
        )
        response = await client.get("/boards", params={"all": "true"})

    assert api.call_count == 3
    assert response.json() == {"items": [{"id": "x"}] * 3, "bookmark": "again"}


@pytest.mark.parametrize("page_size", ["0", "251", "x"])
async def test_boards_validates_page_size(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, page_size: str
) -> None:
    await log_in(client, pinterest)
    response = await client.get("/boards", params={"page_size": page_size})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"


async def test_boards_passes_pinterest_errors_through(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    pinterest.get(f"{API}/boards").respond(403, json={"code": 29, "message": "Forbidden"})
    response = await client.get("/boards")
    assert response.status_code == 403
    assert response.json() == {"code": 29, "message": "Forbidden"}


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), (None, None), ("soon", None)],
)
def test_retry_after_forms(header: str | None, expected: float | None) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    assert retry_after_seconds(httpx.Response(429, headers=headers)) == expected


def test_retry_after_as_a_future_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    response = httpx.Response(503, headers={"Retry-After": format_datetime(when, usegmt=True)})
    assert 28 <= (retry_after_seconds(response) or 0) <= 30


async def test_short_lived_tokens_do_not_cause_a_refresh_per_call(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Tokens living 60 s, inside the 300 s margin: one refresh, not one per call."""
    await log_in_with(client, pinterest, expires_in=60)
    token = pinterest.post(TOKEN_URL).respond(
        200, json=token_json(ACCESS_2, REFRESH_2, expires_in=60)
    )
    api = pinterest.get(f"{API}/boards").respond(200, json={"items": []})

    for _ in range(5):
        assert (await client.get("/pinterest/boards")).status_code == 200

    assert token.call_count == 1
    assert api.call_count == 5


async def test_repeated_upstream_headers_all_come_back(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    pinterest.get(f"{API}/pins").respond(
        200,
        json={"items": []},
        headers=[("Link", "<a>; rel=next"), ("Link", "<b>; rel=last"), ("X-Thing", "1")],
    )

    response = await client.get("/pinterest/pins")

    assert response.headers.get_list("link") == ["<a>; rel=next", "<b>; rel=last"]
    assert "x-thing" not in response.headers  # not on the allowlist
    assert response.headers["content-length"] == str(len(response.content))


async def test_cross_origin_proxy_calls_get_cors_headers(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    origin = "https://app.example.com"
    settings = make_settings(database_url, cors_origins=origin)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        pinterest.get(f"{API}/boards").respond(200, json={"items": []})
        preflight = await client.options(
            "/pinterest/boards",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        ok = await client.get("/pinterest/boards", headers={"Origin": origin})
        client.cookies.clear()
        error = await client.get("/pinterest/boards", headers={"Origin": origin})

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    for response in (ok, error):
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
    assert error.status_code == 401
    assert "x-request-id" in ok.headers


async def test_other_methods_reach_the_documented_routes(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    await log_in(client, pinterest)
    response = await client.request("HEAD", "/pinterest/boards")
    assert response.status_code == 405


# --- the proxy's own stack ---------------------------------------------------------


@pytest.mark.parametrize("opentelemetry", [False, True])
async def test_a_bug_on_the_proxy_path_is_a_json_500_with_or_without_its_own_stack(
    database_url: str, pinterest: respx.MockRouter, opentelemetry: bool
) -> None:
    """Guards the proxy's stack (served ahead of FastAPI's outer layers when OpenTelemetry
    is off): an unexpected error still answers pinauth's JSON 500 and logs one traceback,
    and a normal call still carries the edge's request id and security headers. With
    OpenTelemetry on, FastAPI serves the proxy itself, so its hooks see every call."""
    settings = make_settings(database_url, opentelemetry=opentelemetry)
    app = create_app(settings, transport=httpx.MockTransport(pinterest.async_handler))
    assert (getattr(app, "proxy_stack", None) is None) is opentelemetry
    with captured_logs() as logs:
        # A real server: in-process transports re-raise the error instead of answering 500.
        async with live_server(app) as base, httpx.AsyncClient(base_url=base) as client:
            await log_in(client, pinterest)
            pinterest.get(f"{API}/boards").respond(200, json={"items": []})
            fine = await client.get("/pinterest/boards")
            pinterest.get(f"{API}/pins").mock(side_effect=RuntimeError("a bug"))
            broken = await client.get("/pinterest/pins")

    assert fine.status_code == 200
    assert len(fine.headers["x-request-id"]) == 32
    assert fine.headers["x-content-type-options"] == "nosniff"
    assert broken.status_code == 500
    assert broken.json() == {
        "error": "internal_error",
        "message": "Something went wrong inside pinauth.",
    }
    [unhandled] = events(logs, "unhandled error")
    assert "a bug" in unhandled["exception"]
