"""/docs and /redoc: the API documentation pages, each with a policy for exactly what it loads.

FastAPI renders the pages; these routes replace its own only to add a
Content-Security-Policy. Swagger UI and ReDoc still come from jsDelivr: each policy names
the exact files, so self-hosting them means changing the URLs below and nothing else.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

SWAGGER_JS_URL = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"
SWAGGER_CSS_URL = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"
REDOC_JS_URL = "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"
REDOC_LOGO_URL = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # in its "API docs by" footer
FAVICON_URL = "https://fastapi.tiangolo.com/img/favicon.png"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

# Both pages fetch the schema from pinauth, submit nothing and are never framed. (Each
# policy was checked in Chromium against npm's copies of these files: no violation
# while rendering, expanding, searching and trying out operations.)
_COMMON = "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"


def inline_script_hashes(html: str) -> str:
    """CSP hash sources for the inline scripts in `html`."""
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(html)
    )


def docs_router(*, title: str, openapi_url: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    # root_path comes from the server's configuration, not from clients: a handful at most.
    @functools.lru_cache(maxsize=4)
    def swagger_ui(root_path: str) -> tuple[str, str]:
        rendered = get_swagger_ui_html(
            openapi_url=root_path + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=SWAGGER_JS_URL,
            swagger_css_url=SWAGGER_CSS_URL,
            swagger_favicon_url=FAVICON_URL,
            # The validator badge would send the schema's URL to swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        html = bytes(rendered.body).decode()
        policy = (
            "default-src 'none'; "
            # The bundle, and FastAPI's inline call that starts it.
            f"script-src {SWAGGER_JS_URL} {inline_script_hashes(html)}; "
            f"style-src {SWAGGER_CSS_URL}; "
            # The stylesheet draws its icons as data: SVGs.
            f"img-src {FAVICON_URL} data:; "
            f"{_COMMON}"
        )
        return html, policy

    @functools.lru_cache(maxsize=4)
    def redoc(root_path: str) -> tuple[str, str]:
        rendered = get_redoc_html(
            openapi_url=root_path + openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=REDOC_JS_URL,
            redoc_favicon_url=FAVICON_URL,
        )
        html = bytes(rendered.body).decode()
        policy = (
            "default-src 'none'; "
            f"script-src {REDOC_JS_URL}; "
            # ReDoc styles itself with styled-components, which inserts <style> elements:
            # it renders nothing without 'unsafe-inline' here (never for scripts, though).
            "style-src 'unsafe-inline' https://fonts.googleapis.com; "
            "font-src https://fonts.gstatic.com; "
            # Its search index runs in a worker made from a blob; it fails without one.
            "worker-src blob:; "
            f"img-src {FAVICON_URL} {REDOC_LOGO_URL} data:; "
            f"{_COMMON}"
        )
        return html, policy

    @router.get("/docs")
    async def swagger_ui_page(request: Request) -> HTMLResponse:
        """Swagger UI."""
        html, policy = swagger_ui(request.scope.get("root_path", "").rstrip("/"))
        return HTMLResponse(html, headers={"Content-Security-Policy": policy})

    @router.get("/redoc")
    async def redoc_page(request: Request) -> HTMLResponse:
        """ReDoc."""
        html, policy = redoc(request.scope.get("root_path", "").rstrip("/"))
        return HTMLResponse(html, headers={"Content-Security-Policy": policy})

    return router
