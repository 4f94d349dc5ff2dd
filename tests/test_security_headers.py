"""Security headers on every response, a policy fitted to each HTML page, inert proxied
bodies, and no redirect that takes its host from the Host header."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest
import respx

from pinauth.app import create_app
from pinauth.sandbox import SandboxConfig
from pinauth.settings import Settings
from tests.helpers import (
    connect_account,
    csp_directives,
    in_process_client,
    make_settings,
    run_client,
)

LOCKED_DOWN = "default-src 'none'; frame-ancestors 'none'; sandbox"


def _sha256(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/me", 401),
        ("GET", "/nope", 404),
        ("DELETE", "/healthz", 405),
        ("GET", "/openapi.json", 200),
        # Served in demo mode only (see below); elsewhere a 404, headers and all.
        ("GET", "/static/demo.js", 404),
        ("GET", "/static/index.html", 404),
        ("GET", "/metrics", 200),
        ("POST", "/auth/logout", 204),
        ("GET", "/auth/login", 302),
        ("GET", "/pinterest/boards", 401),
        ("GET", "/", 200),
        ("GET", "/docs", 200),
        ("GET", "/redoc", 200),
    ],
)
async def test_every_response_carries_the_security_headers(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    """Guards the headers every response gets: nosniff, no referrer, no framing (both
    X-Frame-Options and frame-ancestors), and the locked-down policy on anything that is
    not one of pinauth's pages (JSON, errors, redirects, static files, even index.html
    served as a file)."""
    response = await client.request(method, path)

    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    policies = response.headers.get_list("content-security-policy")
    assert len(policies) == 1
    assert csp_directives(policies[0])["frame-ancestors"] == ["'none'"]
    if path not in ("/", "/docs", "/redoc"):
        assert policies[0] == LOCKED_DOWN


async def test_the_demo_page_policy_allows_exactly_what_the_page_uses(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the demo page's strict policy: scripts and styles only from pinauth's own
    files, nothing inline anywhere (so the policy needs no 'unsafe-inline'), no framing."""
    async with run_client(make_settings(database_url, demo_page=True), pinterest) as client:
        response = await client.get("/")
        # Its files, and the page itself fetched as a file, are locked down.
        for path in ("/static/demo.js", "/static/index.html"):
            as_file = await client.get(path)
            assert as_file.status_code == 200
            assert as_file.headers["content-security-policy"] == LOCKED_DOWN
    policy = csp_directives(response.headers["content-security-policy"])
    html = response.text

    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    # What the page loads is all same-origin, and nothing is inline.
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/demo.js" defer>']
    assert re.findall(r"<link\b[^>]*>", html) == ['<link rel="stylesheet" href="/static/demo.css">']
    assert "<style" not in html
    assert not re.search(r"\sstyle=|\son[a-z]+=", html)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_docs_pages_allow_exactly_their_assets(client: httpx.AsyncClient, path: str) -> None:
    """Guards the documentation pages' policies: scripts only from pinauth itself (no CDN:
    nothing from a third party runs on the origin that holds the session cookie) or, if
    inline, by their hash, and nothing else may run; no framing."""
    response = await client.get(path)
    html = response.text
    header = response.headers["content-security-policy"]
    policy = csp_directives(header)

    external = re.findall(r'<script src="([^"]+)"', html)
    inline = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert external
    for url in external:
        assert url.startswith("/docs/"), url
        assert (await client.get(url)).status_code == 200, url
    assert sorted(policy["script-src"]) == sorted(["'self'"] + [_sha256(s) for s in inline])
    stylesheets = [
        re.search(r'href="([^"]+)"', link).group(1)  # type: ignore[union-attr]
        for link in re.findall(r"<link\b[^>]*>", html)
        if 'rel="stylesheet"' in link
    ]
    for stylesheet in stylesheets:
        assert stylesheet.startswith("/docs/"), stylesheet
        assert "'self'" in policy["style-src"]
    assert "http" not in header
    assert "http" not in html.replace("http-equiv", "")
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["form-action"] == ["'none'"]
    assert "'unsafe-eval'" not in header


async def test_the_sandbox_consent_page_has_its_own_strict_policy(
    settings: Settings, pinterest: respx.MockRouter
) -> None:
    """Guards the sandbox pages' policy (demo mode): no script at all, the one inline
    style by hash, the form may post only to the page and the registered redirect URI's
    origin, no framing; pinauth keeps that policy rather than stacking its own."""
    config = SandboxConfig(redirect_uris=(settings.redirect_uri,))
    app = create_app(
        settings, transport=httpx.MockTransport(pinterest.async_handler), sandbox=config
    )
    async with in_process_client(app) as client:
        consent = await client.get(
            "/sandbox/oauth/",
            params={
                "client_id": config.client_id,
                "redirect_uri": settings.redirect_uri,
                "response_type": "code",
                "scope": "boards:read",
                "state": "s",
            },
        )
        refused = await client.get("/sandbox/oauth/", params={"client_id": "someone-else"})

    assert (consent.status_code, refused.status_code) == (200, 400)
    for response in (consent, refused):
        assert response.headers["x-content-type-options"] == "nosniff"
        policies = response.headers.get_list("content-security-policy")
        assert len(policies) == 1
        policy = csp_directives(policies[0])
        assert policy["default-src"] == ["'none'"]
        assert "script-src" not in policy
        (style,) = re.findall(r"<style>(.*?)</style>", response.text, re.DOTALL)
        assert policy["style-src"] == [_sha256(style)]
        assert policy["form-action"] == ["'self'", "http://localhost:8000"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["base-uri"] == ["'none'"]


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, "text/html", "<script>document.title = 'pwned'</script>"),
        (404, "application/json", '{"code": 2, "message": "Board not found."}'),
    ],
)
async def test_proxied_responses_are_inert_documents(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    status: int,
    content_type: str,
    body: str,
) -> None:
    """Guards `Content-Security-Policy: sandbox` on what the proxy relays: even HTML from
    upstream, with a permissive policy of its own, is inert on pinauth's origin; and
    upstream's own security headers never compete with pinauth's (browsers read only
    the first X-Content-Type-Options value)."""
    await connect_account(client, pinterest, settings)
    pinterest.get(f"{settings.api_url}/boards").respond(
        status,
        text=body,
        headers={
            "Content-Type": content_type,
            "Content-Security-Policy": "script-src *",
            "Content-Security-Policy-Report-Only": "script-src *",
            "X-Content-Type-Options": "whatever",
            "X-Frame-Options": "ALLOWALL",
            "Referrer-Policy": "unsafe-url",
        },
    )

    response = await client.get("/pinterest/boards")

    assert response.status_code == status
    assert response.text == body
    assert response.headers.get_list("content-security-policy") == [LOCKED_DOWN]
    assert "content-security-policy-report-only" not in response.headers
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]
    assert response.headers.get_list("x-frame-options") == ["DENY"]
    assert response.headers.get_list("referrer-policy") == ["no-referrer"]


@pytest.mark.parametrize(
    "path",
    [
        "/me/",
        "/healthz/",
        "/auth/logout/",
        "/docs/",
        "/static",
        "/sandbox",
        "/sandbox/oauth",
        "/sandbox/v5/boards/",
        "/sandbox/_sandbox/counters/",
    ],
)
async def test_no_redirect_takes_its_host_from_the_host_header(
    settings: Settings, pinterest: respx.MockRouter, path: str
) -> None:
    """Guards against Host-built redirects (Starlette's trailing-slash redirects, in
    pinauth and in the mounted sandbox): a forged Host never becomes a Location."""
    config = SandboxConfig(redirect_uris=(settings.redirect_uri,))
    app = create_app(
        settings, transport=httpx.MockTransport(pinterest.async_handler), sandbox=config
    )
    async with in_process_client(app) as client:
        for method in ("GET", "POST"):
            response = await client.request(method, path, headers={"Host": "evil.example"})
            assert "evil.example" not in response.headers.get("location", ""), response
            assert not response.is_redirect, (method, response.headers)
