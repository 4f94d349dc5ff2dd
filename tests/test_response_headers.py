"""Pinterest's response headers reach the client by allowlist, and bad values never 500."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from pinauth.app import create_app
from pinauth.pinterest.headers import response_headers
from tests.helpers import (
    API,
    USER_ACCOUNT,
    http_response,
    live_server,
    log_in,
    make_settings,
    raw_http_upstream,
    start_login,
    token_json,
)

RELAYED = [
    (b"Content-Type", b"application/json; charset=utf-8"),
    (b"Link", b"<https://api.pinterest.com/v5/pins?bookmark=b2>; rel=next"),
    (b"Link", b"<https://api.pinterest.com/v5/pins>; rel=first"),
    (b"Retry-After", b"30"),
    (b"X-Pinterest-Rid", b"1494410597907320"),
    (b"X-RateLimit-Limit", b"1000"),
    (b"X-RateLimit-Remaining", b"999"),
    (b"X-RateLimit-Reset", b"1700000000"),
    (b"X-Userendpoint-Ratelimit-Remaining", b"98"),
]
DROPPED = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Credentials", b"true"),
    (b"Access-Control-Expose-Headers", b"*"),
    (b"Location", b"https://evil.example/"),
    (b"Refresh", b"0; url=https://evil.example/"),
    (b"Clear-Site-Data", b'"*"'),
    (b"Set-Cookie", b"_pinterest_sess=abc; Path=/"),
    (b"Content-Security-Policy", b"default-src *"),
    (b"Content-Disposition", b"attachment; filename=x.html"),
    (b"Strict-Transport-Security", b"max-age=0"),
    (b"X-Frame-Options", b"ALLOWALL"),
    (b"Cache-Control", b"public, max-age=600"),
    (b"Vary", b"User-Agent"),
    (b"Server", b"envoy"),
    (b"X-Envoy-Upstream-Service-Time", b"12"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Pinterest-Generated-By", b"host-1"),
]
# Added by pinauth itself on every proxied response.
OWN = {
    "content-length",
    "cache-control",
    "x-request-id",
    "x-content-type-options",
    "referrer-policy",
    "x-frame-options",
    "content-security-policy",
}
# Values a server may put on the wire that are no valid field-value: UTF-8 (which httpx
# decodes to characters latin-1 cannot encode), raw high bytes, control characters.
INVALID_VALUES = [
    b"caf\xc3\xa9 \xe2\x82\xac",
    b"\xff\xfe",
    b"a\x01b",
    b"a\x7fb",
    b"a\x00b",
    b"a\x1b[31mred",
]


async def test_only_allowlisted_response_headers_reach_the_client(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards the response allowlist: Content-Type, Link, Retry-After, rate-limit and
    request-id headers pass (repeats included); CORS, Location, Refresh, Clear-Site-Data,
    Set-Cookie and everything else stay behind."""
    await log_in(client, pinterest)
    pinterest.get(f"{API}/pins").respond(200, content=b"{}", headers=RELAYED + DROPPED)

    response = await client.get("/pinterest/pins")

    assert response.status_code == 200
    assert set(response.headers.keys()) == {n.decode().lower() for n, _ in RELAYED} | OWN
    assert response.headers.get_list("link") == [v.decode() for n, v in RELAYED if n == b"Link"]
    assert response.headers["x-pinterest-rid"] == "1494410597907320"
    assert response.headers["x-userendpoint-ratelimit-remaining"] == "98"
    assert response.headers["cache-control"] == "no-store"
    # pinauth's own security headers, once each, never upstream's values.
    assert response.headers.get_list("x-frame-options") == ["DENY"]
    assert response.headers.get_list("content-security-policy") == [
        "default-src 'none'; frame-ancestors 'none'; sandbox"
    ]


async def test_headers_the_upstream_declares_hop_by_hop_are_dropped(
    client: httpx.AsyncClient, pinterest: respx.MockRouter
) -> None:
    """Guards RFC 9110 7.6.1: a header named in Connection is not relayed, even if allowed."""
    await log_in(client, pinterest)
    pinterest.get(f"{API}/pins").respond(
        200,
        json={},
        headers=[(b"Connection", b"X-RateLimit-Remaining"), (b"X-RateLimit-Remaining", b"1")],
    )

    response = await client.get("/pinterest/pins")

    assert "x-ratelimit-remaining" not in response.headers


@pytest.mark.parametrize("value", INVALID_VALUES)
async def test_an_invalid_upstream_header_value_is_dropped_not_a_500(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, value: bytes
) -> None:
    """Guards the value check: an allowlisted header with a bad value is dropped alone."""
    await log_in(client, pinterest)
    pinterest.get(f"{API}/pins").respond(
        200,
        content=b'{"items": []}',
        headers=[(b"X-Pinterest-Rid", value), (b"X-RateLimit-Remaining", b"7")],
    )

    response = await client.get("/pinterest/pins")

    assert response.status_code == 200
    assert response.json() == {"items": []}
    assert "x-pinterest-rid" not in response.headers
    assert response.headers["x-ratelimit-remaining"] == "7"


async def test_bad_headers_from_a_real_upstream_over_aiohttp_and_uvicorn(
    database_url: str,
) -> None:
    """Guards the whole wire path: a loopback "Pinterest" sends UTF-8 and control bytes in
    allowlisted headers, plus CORS and Location, through the production aiohttp transport;
    pinauth behind a real uvicorn answers 200 with only the valid allowlisted headers."""
    boards = json.dumps({"items": [], "bookmark": None}).encode()

    def answer(method: str, target: str) -> bytes:
        if target == "/v5/oauth/token":
            return http_response(200, [(b"Content-Type", b"application/json")], token_body)
        if target == "/v5/user_account":
            return http_response(200, [(b"Content-Type", b"application/json")], account_body)
        return http_response(
            200,
            [
                (b"Content-Type", b"application/json"),
                (b"X-Pinterest-Rid", "caf\u00e9-\u20ac".encode()),
                (b"X-RateLimit-Remaining", b"9\x019"),
                (b"X-RateLimit-Limit", b"\xff"),
                (b"X-Userendpoint-Ratelimit-Remaining", b"42"),
                (b"Access-Control-Allow-Origin", b"https://evil.example"),
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"Location", b"https://evil.example/"),
            ],
            boards,
        )

    token_body = json.dumps(token_json()).encode()
    account_body = json.dumps(USER_ACCOUNT).encode()
    async with raw_http_upstream(answer) as upstream:
        settings = make_settings(database_url, api_url=f"{upstream}/v5")
        async with (
            live_server(create_app(settings)) as base,
            httpx.AsyncClient(base_url=base) as client,
        ):
            state = await start_login(client)
            login = await client.get("/auth/callback", params={"code": "c", "state": state})
            assert login.status_code == 303
            response = await client.get("/pinterest/boards")

    assert response.status_code == 200
    assert response.content == boards
    assert response.headers["x-userendpoint-ratelimit-remaining"] == "42"
    for name in (
        "x-pinterest-rid",
        "x-ratelimit-remaining",
        "x-ratelimit-limit",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "location",
    ):
        assert name not in response.headers


@pytest.mark.parametrize(
    ("upstream", "relayed"),
    [
        ([(b"Content-Type", b"application/json"), (b"Content-Type", b"text/html")], None),
        ([(b"Retry-After", b"abc")], []),
        ([(b"Retry-After", b"-5")], []),
        ([(b"Retry-After", b"30"), (b"Retry-After", b"60")], ["30"]),
        ([(b"Retry-After", b"Wed, 21 Oct 2015 07:28:00 GMT")], ["Wed, 21 Oct 2015 07:28:00 GMT"]),
    ],
)
def test_single_valued_headers_are_relayed_once_and_only_when_valid(
    upstream: list[tuple[bytes, bytes]], relayed: list[str] | None
) -> None:
    """Guards what the allowlist alone let through (black-box review): a second
    Content-Type (browsers use the last) and Retry-After values that are not one."""
    kept = response_headers(upstream)
    if relayed is None:
        assert [v for n, v in kept if n == b"content-type"] == [b"application/json"]
    else:
        assert [v.decode() for n, v in kept if n == b"retry-after"] == relayed
