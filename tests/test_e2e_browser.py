"""The demo end to end in a real browser: `pinauth serve --demo` and Debian's Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import free_port, wait_until_serving

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
    if os.environ.get("PINAUTH_REQUIRE_E2E") == "1":
        pytest.fail(f"PINAUTH_REQUIRE_E2E=1 but {CHROMIUM} is missing", pytrace=False)
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

playwright_sync = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env["PINAUTH_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
    process = subprocess.Popen(
        [sys.executable, "-m", "pinauth", "serve", "--demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/healthz", process)
        yield f"http://localhost:{port}"
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        # Shown by pytest only when the test failed.
        print(output)


def sandbox(base: str, method: str, control: str) -> httpx.Response:
    response = httpx.request(
        method, f"{base.replace('localhost', '127.0.0.1')}/sandbox/_sandbox/{control}"
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
