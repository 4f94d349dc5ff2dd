"""/docs and /redoc work without internet: Chromium with every other host blocked."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, live_server, require_chromium

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Route

REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"

require_chromium()

playwright_async = pytest.importorskip("playwright.async_api")


async def test_the_docs_assets_are_pinauths_own(client: httpx.AsyncClient) -> None:
    for path, media_type in [
        ("/docs/swagger-ui-bundle.js", "text/javascript"),
        ("/docs/swagger-ui.css", "text/css"),
        ("/docs/redoc.standalone.js", "text/javascript"),
        ("/docs/favicon.png", "image/png"),
    ]:
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media_type), path
        assert response.headers["cache-control"] == "public, max-age=86400"
        assert len(response.content) > 1000


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        # Swagger UI: one block per operation; its id names the operation.
        ("/docs", "#operations-account-me_me_get"),
        # ReDoc: an operation's description, rendered in the main column.
        ("/redoc", "text=The Pinterest account connected to this session."),
    ],
)
async def test_docs_render_with_only_pinauth_reachable(
    app: FastAPI, path: str, rendered: str
) -> None:
    """Guards the self-hosted assets: with every request to another host aborted, the
    page still renders its operations, and its own policy blocks nothing it needs."""
    async with live_server(app) as base, playwright_async.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(30_000)
            origin = urlsplit(base).netloc
            blocked: list[str] = []
            console_errors: list[str] = []

            async def only_pinauth(route: Route) -> None:
                url = route.request.url
                if urlsplit(url).netloc == origin or url.startswith(("data:", "blob:")):
                    await route.continue_()
                else:
                    blocked.append(url)
                    await route.abort()

            def note(message: ConsoleMessage) -> None:
                # ReDoc's "API docs by Redocly" footer names a logo on Redocly's CDN; the
                # policy refuses it, so it is never even requested. Nothing else may fail.
                if message.type == "error" and REDOC_LOGO not in message.text:
                    console_errors.append(message.text)

            await page.route("**/*", only_pinauth)
            page.on("console", note)
            await page.goto(base + path)
            expect = playwright_async.expect
            # Rendering a 1-2 MB bundle on a busy machine takes a while.
            await expect(page.locator(rendered).first).to_be_visible(timeout=60_000)
            # The proxy's operations are there too.
            await expect(page.get_by_text("/pinterest/{path}").first).to_be_attached()
            assert blocked == []
            assert console_errors == []
        finally:
            await browser.close()
