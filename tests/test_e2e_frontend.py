"""Issue 12 in Debian's Chromium: the demo reached at 127.0.0.1, and a frontend on
another origin that learns how each login ended and reads pinauth's headers from JS."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    demo_process,
    free_port,
    require_chromium,
)

require_chromium()

playwright_sync = pytest.importorskip("playwright.sync_api")


# The app's frontend: one page for every path, as a single-page app's server does. It
# starts logins with a return_to path of its own and shows how a login ended.
FRONTEND_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Frontend</title></head>
<body>
<h1>The app</h1>
<p>Login result: <span id="error"></span></p>
<a href="{pinauth}/auth/login?return_to=%2Fsettings%3Ftab%3Dpins">Connect Pinterest</a>
<script>
  const code = new URLSearchParams(location.search).get("pinauth_error");
  document.getElementById("error").textContent = code || "none";
</script>
</body></html>
"""


@contextmanager
def frontend_server(port: int, pinauth: str) -> Iterator[None]:
    page = FRONTEND_PAGE.format(pinauth=pinauth).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name for it
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass(frozen=True)
class Deployment:
    pinauth: str  # its public origin, the redirect URI's
    frontend: str  # the app's frontend, on another origin

    def add_fault(self, **fault: Any) -> None:
        url = f"{self.pinauth.replace('localhost', '127.0.0.1')}/sandbox/_sandbox/faults"
        # The demo's controls serve its public host only.
        public_host = self.pinauth.removeprefix("http://")
        httpx.post(url, json=fault, headers={"Host": public_host}).raise_for_status()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """pinauth in demo mode, and a frontend on another port of localhost."""
    port, frontend_port = free_port(), free_port()
    pinauth, frontend = f"http://localhost:{port}", f"http://localhost:{frontend_port}"
    with (
        frontend_server(frontend_port, pinauth),
        demo_process(
            tmp_path_factory.mktemp("frontend"),
            port,
            PINAUTH_FRONTEND_URL=frontend,
            PINAUTH_CORS_ORIGINS=frontend,
        ),
    ):
        yield Deployment(pinauth=pinauth, frontend=frontend)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(chromium: Any) -> Any:
    """A page in a browser profile of its own (its own cookies)."""
    page = chromium.new_context().new_page()
    page.set_default_timeout(15_000)
    return page


def to_consent(page: Any, frontend: str) -> None:
    page.goto(f"{frontend}/")
    page.get_by_role("link", name="Connect Pinterest").click()
    playwright_sync.expect(page.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()


def test_the_demo_at_127_0_0_1_moves_to_the_public_origin_and_logs_in(
    tmp_path: Path, chromium: Any
) -> None:
    """Guards the host canonicalisation in a real browser: the address uvicorn prints
    (127.0.0.1) is not the redirect URI's host (localhost); the demo moves there first,
    so the login cookie and the callback share an origin and the login completes."""
    port = free_port()
    expect = playwright_sync.expect
    with demo_process(tmp_path, port):
        page = new_page(chromium)
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page).to_have_url(f"http://localhost:{port}/")
        page.get_by_role("link", name="Connect Pinterest").click()
        page.get_by_role("button", name="Allow").click()
        expect(page.locator("#username")).to_have_text("sandbox_pinner")
        expect(page).to_have_url(f"http://localhost:{port}/")

        # Even a login link that names 127.0.0.1 ends logged in.
        other = new_page(chromium)
        other.goto(f"http://127.0.0.1:{port}/auth/login?return_to=%2F")
        other.get_by_role("button", name="Allow").click()
        expect(other.locator("#username")).to_have_text("sandbox_pinner")


def test_denied_consent_returns_to_the_frontend_with_the_reason(
    deployment: Deployment, chromium: Any
) -> None:
    page = new_page(chromium)
    to_consent(page, deployment.frontend)
    page.get_by_role("button", name="Deny").click()

    expect = playwright_sync.expect
    expect(page).to_have_url(f"{deployment.frontend}/settings?tab=pins&pinauth_error=access_denied")
    expect(page.locator("#error")).to_have_text("access_denied")


def test_an_invalid_state_returns_to_the_frontend_with_the_reason(
    deployment: Deployment, chromium: Any
) -> None:
    """A consent page opened in another browser (no login cookie there) and a forged
    state: both land on the frontend told invalid_state; the first browser still logs in."""
    expect = playwright_sync.expect
    first = new_page(chromium)
    to_consent(first, deployment.frontend)

    elsewhere = new_page(chromium)
    elsewhere.goto(first.url)
    elsewhere.get_by_role("button", name="Allow").click()
    expect(elsewhere).to_have_url(
        f"{deployment.frontend}/settings?tab=pins&pinauth_error=invalid_state"
    )
    expect(elsewhere.locator("#error")).to_have_text("invalid_state")

    elsewhere.goto(f"{deployment.pinauth}/auth/callback?code=anything&state=forged")
    expect(elsewhere).to_have_url(f"{deployment.frontend}/?pinauth_error=invalid_state")

    first.get_by_role("button", name="Allow").click()
    expect(first).to_have_url(f"{deployment.frontend}/settings?tab=pins")
    expect(first.locator("#error")).to_have_text("none")


READ_HEADERS = """async ([url, init]) => {
  const response = await fetch(url, { credentials: "include", ...init });
  const read = (name) => response.headers.get(name);
  return {
    status: response.status,
    requestId: read("X-Request-ID"),
    retryAfter: read("Retry-After"),
    remaining: read("X-RateLimit-Remaining"),
  };
}"""


def test_frontend_javascript_reads_request_id_retry_after_and_rate_limits(
    deployment: Deployment, chromium: Any
) -> None:
    """Guards CORS for a frontend on another origin: a request sending X-Request-ID passes
    the preflight, and JavaScript reads X-Request-ID, Retry-After and Pinterest's
    rate-limit headers from pinauth's answers."""
    page = new_page(chromium)
    to_consent(page, deployment.frontend)
    page.get_by_role("button", name="Allow").click()
    playwright_sync.expect(page).to_have_url(f"{deployment.frontend}/settings?tab=pins")

    me = page.evaluate(
        READ_HEADERS, [f"{deployment.pinauth}/me", {"headers": {"X-Request-ID": "frontend-1"}}]
    )
    assert me["status"] == 200
    assert me["requestId"] == "frontend-1"

    deployment.add_fault(
        path_prefix="/v5/boards",
        status=429,
        body={"code": 8, "message": "Too many requests"},
        headers={"Retry-After": "30", "X-RateLimit-Remaining": "0"},
    )
    created = page.evaluate(
        READ_HEADERS,
        [
            f"{deployment.pinauth}/pinterest/boards",
            {
                "method": "POST",
                "headers": {"Content-Type": "application/json", "X-Request-ID": "frontend-2"},
                "body": '{"name": "Held back"}',
            },
        ],
    )
    assert created == {
        "status": 429,
        "requestId": "frontend-2",
        "retryAfter": "30",
        "remaining": "0",
    }
