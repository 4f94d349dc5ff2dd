"""The demo end to end in a real browser: `pinauth serve --demo` and Debian's Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    demo_process,
    free_port,
    require_chromium,
)

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage

ARTIFACTS = Path(__file__).parent / "artifacts"

require_chromium()

playwright_sync = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with demo_process(tmp_path, port):
        yield f"http://localhost:{port}"


def sandbox(base: str, method: str, control: str) -> httpx.Response:
    # Reached on 127.0.0.1, named by the demo's public host, the only one its controls serve.
    response = httpx.request(
        method,
        f"{base.replace('localhost', '127.0.0.1')}/sandbox/_sandbox/{control}",
        headers={"Host": base.removeprefix("http://")},
    )
    response.raise_for_status()
    return response


def test_connect_browse_create_refresh_deny_and_disconnect(demo_server: str) -> None:
    base = demo_server
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            expect = playwright_sync.expect
            # Every page's Content-Security-Policy must allow all it does: Chromium logs
            # each blocked load, script, style or form as a console error.
            csp_errors: list[str] = []

            def note_csp_errors(message: ConsoleMessage) -> None:
                if "Content Security Policy" in message.text:
                    csp_errors.append(message.text)

            page.on("console", note_csp_errors)

            # Connect and allow.
            page.goto(f"{base}/")
            page.get_by_role("link", name="Connect Pinterest").click()
            expect(page.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()
            page.get_by_role("button", name="Allow").click()
            expect(page.locator("#username")).to_have_text("sandbox_pinner")
            expect(page.locator("#boards li")).to_have_count(3)
            expect(page.locator("#boards")).to_contain_text("Weeknight dinners")
            assert "pina_" not in page.content()  # no token ever reaches the page

            # Create a board.
            page.get_by_label("Name").fill("Made in the browser")
            page.get_by_label("Description").fill("Created through /pinterest/boards")
            page.get_by_role("button", name="Create board").click()
            expect(page.locator("#boards li").first).to_contain_text("Made in the browser")
            expect(page.locator("#boards li")).to_have_count(4)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-connected.png"), full_page=True)

            # Pinterest expires every access token; a reload still shows the boards,
            # because pinauth refreshed (exactly once) and retried.
            before = sandbox(base, "GET", "counters").json()["token_requests"]
            sandbox(base, "POST", "expire-access-tokens")
            page.reload()
            expect(page.locator("#boards li")).to_have_count(4)
            after = sandbox(base, "GET", "counters").json()["token_requests"]
            assert after.get("refresh_token", 0) - before.get("refresh_token", 0) == 1

            # Disconnect.
            page.get_by_role("button", name="Disconnect").click()
            expect(page.get_by_role("link", name="Connect Pinterest")).to_be_visible()
            expect(page.locator("#message")).to_contain_text("Disconnected")
            page.reload()
            expect(page.get_by_role("link", name="Connect Pinterest")).to_be_visible()

            # A second visitor denies consent: a clear error, and no session.
            other = browser.new_context().new_page()
            other.set_default_timeout(15_000)
            other.goto(f"{base}/")
            other.get_by_role("link", name="Connect Pinterest").click()
            other.get_by_role("button", name="Deny").click()
            expect(other.locator("body")).to_contain_text("access_denied")
            expect(other.locator("body")).to_contain_text("did not grant access")
            assert not [c for c in other.context.cookies() if c["name"] == "pinauth_session"]
            other.goto(f"{base}/")
            expect(other.get_by_role("link", name="Connect Pinterest")).to_be_visible()

            assert csp_errors == []
        finally:
            browser.close()


def test_the_demo_page_cannot_be_framed(demo_server: str) -> None:
    """Guards against clickjacking (frame-ancestors 'none'): a page on another origin that
    frames the demo page gets nothing from it, and Chromium says why."""
    base = demo_server
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()  # about:blank, with no policy of its own
            page.set_default_timeout(15_000)
            with page.expect_console_message(
                lambda m: "frame-ancestors 'none'" in m.text
            ) as refusal:
                page.set_content(f'<iframe id="victim" src="{base}/"></iframe>')
            assert base in refusal.value.text
            frame = page.frame_locator("#victim")
            assert frame.locator("#connect").count() == 0
            assert frame.locator("#disconnect").count() == 0
        finally:
            browser.close()


# login_url values a relayed error body could carry, and where the demo page may send
# the browser for each ("{base}" is the demo's own origin).
LOGIN_URLS = [
    ("javascript:window.pwned=1", "{base}/auth/login"),
    (" javascript:window.pwned=1", "{base}/auth/login"),
    ("JaVaScRiPt:window.pwned=1", "{base}/auth/login"),
    ("data:text/html,<script>window.pwned=1</script>", "{base}/auth/login"),
    ("https://evil.example/auth/login", "{base}/auth/login"),
    ("//evil.example/auth/login", "{base}/auth/login"),
    ("{base}.evil.example/auth/login", "{base}/auth/login"),
    ("blob:{base}/0b9c4d5e", "{base}/auth/login"),
    ("", "{base}/auth/login"),
    ("/auth/login?return_to=%2F", "{base}/auth/login?return_to=%2F"),
    ("{base}/auth/login", "{base}/auth/login"),
]


def test_the_demo_page_follows_only_same_origin_login_urls(demo_server: str) -> None:
    """Guards demo.js's login_url check, in Chromium: a reauthorization_required body
    relayed from "Pinterest" (a sandbox fault) with a javascript: login_url yields a
    same-origin Reconnect link, and clicking it runs nothing; the table above runs
    explain() itself on each candidate URL."""
    base = demo_server
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            expect = playwright_sync.expect
            page.goto(f"{base}/")
            page.get_by_role("link", name="Connect Pinterest").click()
            page.get_by_role("button", name="Allow").click()
            expect(page.locator("#username")).to_have_text("sandbox_pinner")

            # "Pinterest" answers the next boards call with a body naming a script URL.
            httpx.post(
                f"{base.replace('localhost', '127.0.0.1')}/sandbox/_sandbox/faults",
                headers={"Host": base.removeprefix("http://")},  # the demo's public host
                json={
                    "path_prefix": "/v5/boards",
                    "status": 403,
                    "body": {
                        "error": "reauthorization_required",
                        "message": "x",
                        "login_url": "javascript:window.pwned=1",
                    },
                },
            ).raise_for_status()
            page.reload()
            link = page.get_by_role("link", name="Reconnect Pinterest")
            expect(link).to_have_attribute("href", f"{base}/auth/login")
            link.click()
            expect(page.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()
            assert page.evaluate("window.pwned") is None

            page.goto(f"{base}/")
            for candidate, expected in LOGIN_URLS:
                href = page.evaluate(
                    """(loginUrl) => {
                      const data = { error: "reauthorization_required", login_url: loginUrl };
                      explain({ data });
                      return document.querySelector("#message a").getAttribute("href");
                    }""",
                    candidate.format(base=base),
                )
                assert href == expected.format(base=base), candidate
            assert page.evaluate("window.pwned") is None
        finally:
            browser.close()


def api_key_of_demo(tmp_path: Path, name: str = "e2e") -> str:
    """A new API key in the demo's database, made by `pinauth api-keys create`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env["PINAUTH_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
    created = subprocess.run(
        [sys.executable, "-m", "pinauth", "api-keys", "create", "--name", name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.splitlines()[-1]


def test_a_backend_connects_its_user_and_posts_a_pin(demo_server: str, tmp_path: Path) -> None:
    """Issue 10 end to end: the backend (this test) mints a connect session, Chromium
    follows connect_url and approves, the backend confirms the result the browser came
    back with, then finds the connection by its end user and creates a pin for it through
    the proxy, with nothing but its API key."""
    key = api_key_of_demo(tmp_path)
    backend = httpx.Client(
        base_url=demo_server, headers={"Authorization": f"Bearer {key}"}, timeout=15
    )
    with backend:
        _connect_and_post_a_pin(backend)


def landed_result(url: str) -> str:
    """The `pinauth_connect_result` of the URL a connect link's browser came back to."""
    [result] = parse_qs(urlsplit(url).query)["pinauth_connect_result"]
    return result


def _connect_and_post_a_pin(backend: httpx.Client) -> None:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            expect = playwright_sync.expect

            def connect(end_user_id: str, account: str | None = None) -> None:
                # Back to a page of the app's own (here a path the demo does not serve);
                # the app, knowing its user is `end_user_id`, confirms.
                minted = backend.post(
                    "/v1/connect-sessions",
                    json={"end_user_id": end_user_id, "return_to": "/app/connected"},
                )
                page.goto(minted.json()["connect_url"])
                expect(page.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()
                if account is not None:
                    page.get_by_label(account).check()
                page.get_by_role("button", name="Allow").click()
                page.wait_for_url("**/app/connected?pinauth_connect_result=*")
                confirmed = backend.post(
                    "/v1/connections/confirm",
                    json={"result": landed_result(page.url), "end_user_id": end_user_id},
                )
                assert confirmed.status_code == 200, confirmed.text
                assert confirmed.json()["username"] == (account or "sandbox_pinner")

            connect("customer-7")
            # One end user links a second account; another end user links the first.
            connect("customer-7", "sandbox_studio")
            connect("customer-8", "sandbox_pinner")
            # The browser got no pinauth session from any of it.
            assert page.request.get(str(backend.base_url.join("/me"))).status == 401
        finally:
            browser.close()

    mine = backend.get("/v1/connections", params={"end_user_id": "customer-7"}).json()["items"]
    theirs = backend.get("/v1/connections", params={"end_user_id": "customer-8"}).json()["items"]
    assert [c["username"] for c in mine] == ["sandbox_pinner", "sandbox_studio"]
    assert [c["username"] for c in theirs] == ["sandbox_pinner"]
    assert theirs[0]["id"] not in {c["id"] for c in mine}

    connection = mine[0]
    named = {"Pinauth-Connection-Id": connection["id"]}
    board = backend.get("/pinterest/boards", headers=named).json()["items"][0]
    pin = backend.post(
        "/pinterest/pins",
        headers=named,
        json={
            "board_id": board["id"],
            "title": "Posted by the backend",
            "media_source": {"source_type": "image_url", "url": "https://example.com/a.jpg"},
        },
    )
    assert pin.status_code == 201, pin.text
    pins = backend.get(f"/pinterest/boards/{board['id']}/pins", headers=named).json()
    assert "Posted by the backend" in {p.get("title") for p in pins["items"]}
    assert connection["end_user_id"] == "customer-7"


def test_the_backend_panel_connects_lists_and_posts_both_ways(
    demo_server: str, tmp_path: Path
) -> None:
    """Issue 11: the demo page's backend panel, walked in Chromium. It mints a connect
    session, the browser follows it, the panel confirms the result for its end user, lists
    the end user's connections and posts a pin through the server route and through a
    proxy token, each exchange shown."""
    base = demo_server
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            expect = playwright_sync.expect
            csp_errors: list[str] = []
            page.on(
                "console",
                lambda m: (
                    csp_errors.append(m.text) if "Content Security Policy" in m.text else None
                ),
            )
            exchanges = page.locator("#backend-exchanges")

            page.goto(f"{base}/")
            expect(page.get_by_role("heading", name="Your backend")).to_be_visible()
            page.get_by_label("End user id").fill("customer-e2e")
            page.get_by_role("button", name="Mint connect session").click()
            expect(exchanges.locator("li").first).to_contain_text("/v1/connect-sessions → 201")
            expect(exchanges).to_contain_text("authorization: Bearer pinauth_sk_")
            expect(exchanges).to_contain_text('"end_user_id": "customer-e2e"')

            page.get_by_role("link", name="Connect Pinterest as this end user").click()
            expect(page.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()
            page.get_by_role("button", name="Allow").click()
            # Back on the panel, which confirms for its end user and lists their connections.
            expect(page.get_by_label("End user id")).to_have_value("customer-e2e")
            expect(page.locator("#message")).to_contain_text(
                "Connected sandbox_pinner for customer-e2e"
            )
            expect(exchanges).to_contain_text("/v1/connections/confirm → 200")
            assert "pinauth_connect_result" not in page.url  # one-time: not kept to reload
            connections = page.locator("#backend-connections li")
            expect(connections).to_have_count(1)
            expect(connections).to_contain_text("sandbox_pinner")
            expect(exchanges.locator("li").first).to_contain_text(
                "/v1/connections?limit=100&end_user_id=customer-e2e → 200"
            )

            page.get_by_label("Pin title").fill("Pinned by key")
            page.get_by_role("button", name="Post through the server route").click()
            expect(page.locator("#message")).to_contain_text(
                "“Pinned by key” posted through the server route"
            )
            expect(exchanges.locator("li").first).to_contain_text("/pinterest/pins → 201")
            expect(exchanges).to_contain_text("pinauth-connection-id: conn_")

            page.get_by_label("Pin title").fill("Pinned by proxy token")
            page.get_by_role("button", name="Post with a proxy token").click()
            expect(page.locator("#message")).to_contain_text(
                "“Pinned by proxy token” posted with a proxy token"
            )
            expect(exchanges).to_contain_text("/proxy-tokens → 201")
            expect(exchanges).to_contain_text("authorization: Bearer pinauth_pt_")
            expect(exchanges.locator("li").first).to_contain_text("/pinterest/pins → 201")
            page.locator("#backend-exchanges summary").first.click()  # open the newest
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-backend.png"), full_page=True)

            # Both pins are really there, read back by another backend of the app.
            connection_id = connections.locator("input").get_attribute("value")
            assert connection_id is not None
            pins = httpx.get(
                f"{base}/pinterest/pins?page_size=25",
                headers={
                    "Authorization": f"Bearer {api_key_of_demo(tmp_path)}",
                    "Pinauth-Connection-Id": connection_id,
                },
            ).json()["items"]
            titles = {pin["title"] for pin in pins}
            assert {"Pinned by key", "Pinned by proxy token"} <= titles
            content = page.content()
            assert "pina_" not in content
            assert "pinr_" not in content
            assert csp_errors == []
        finally:
            browser.close()


def test_a_connect_link_sent_to_someone_else_links_nothing(
    demo_server: str, tmp_path: Path
) -> None:
    """Issue 18.1, the login-swapping attack end to end in Chromium, two browsers. The
    attacker's browser presses the demo app's own "Connect" for the attacker's end user
    and sends the link away; the victim's browser, with a pinauth session of its own and
    the victim logged in to the app, opens it and approves with the victim's Pinterest
    account. Back on the app, the app's backend confirms the result for its logged-in user,
    the victim: 403 connect_result_mismatch, and nothing is kept for anyone. The victim's
    own pinauth session is untouched throughout."""
    base = demo_server
    key = api_key_of_demo(tmp_path)
    backend = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=15)
    with playwright_sync.sync_playwright() as p, backend:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            expect = playwright_sync.expect
            attacker = browser.new_context().new_page()
            victim = browser.new_context().new_page()
            for page in (attacker, victim):
                page.set_default_timeout(15_000)

            # The victim: logged in to the app as "victim", and to pinauth on their own.
            victim.goto(f"{base}/")
            victim.get_by_label("End user id").fill("victim")
            victim.get_by_label("End user id").dispatch_event("change")
            victim.get_by_role("link", name="Connect Pinterest", exact=True).click()
            victim.get_by_role("button", name="Allow").click()
            expect(victim.locator("#username")).to_have_text("sandbox_pinner")
            own = victim.request.get(f"{base}/me").json()
            own_cookies = victim.context.cookies()

            # The attacker mints a link for their own end user and sends it.
            attacker.goto(f"{base}/")
            attacker.get_by_label("End user id").fill("attacker")
            attacker.get_by_role("button", name="Mint connect session").click()
            link = attacker.get_by_role("link", name="Connect Pinterest as this end user")
            expect(link).to_be_visible()
            connect_url = link.get_attribute("href")
            assert connect_url is not None

            # The victim approves on the genuine consent page, with their own account.
            victim.goto(connect_url)
            expect(victim.get_by_role("heading", name="Connect to Pinterest")).to_be_visible()
            victim.get_by_label("sandbox_pinner").check()
            victim.get_by_role("button", name="Allow").click()
            expect(victim.locator("#message")).to_contain_text("connect_result_mismatch")
            expect(victim.locator("#backend-exchanges")).to_contain_text(
                "/v1/connections/confirm → 403"
            )
            expect(victim.locator("#username")).to_have_text("sandbox_pinner")
            after = victim.request.get(f"{base}/me").json()
            after_cookies = victim.context.cookies()

            # The attacker's side finds nothing, whatever they try.
            attacker.get_by_role("button", name="List connections").click()
            expect(attacker.locator("#backend-no-connections")).to_be_visible()
        finally:
            browser.close()

        of_attacker = backend.get("/v1/connections", params={"end_user_id": "attacker"})
        pending = backend.get("/v1/connections", params={"status": "pending"})
        everything = backend.get("/v1/connections")

    assert after == own
    assert [c for c in after_cookies if c["name"] == "pinauth_session"] == [
        c for c in own_cookies if c["name"] == "pinauth_session"
    ]
    assert of_attacker.json()["items"] == []
    assert pending.json()["items"] == []
    assert [c["id"] for c in everything.json()["items"]] == [own["connection_id"]]
