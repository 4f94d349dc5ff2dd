"""/docs, /redoc and /openapi.json: the API documentation, served whole by pinauth.

Swagger UI and ReDoc come from the fastapi-offline package, served from /docs/… by pinauth
itself: the pages work without internet, and no third party's script runs on the origin
that holds the session cookie. FastAPI renders the pages; these routes replace its own to
add a Content-Security-Policy naming exactly what each page runs (its inline start-up
script by hash).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from pinauth.api.schemas import ErrorResponse, PinterestErrorResponse
from pinauth.auth import HOST_PREFIX, SESSION_COOKIE

ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
ASSET_PREFIX = "/docs/"
# Served under ASSET_PREFIX; the package's own names.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# The files change only when the package does; a day saves a reload 2.8 MB.
_ASSET_CACHE = "public, max-age=86400"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

# Both pages load their script from pinauth ('self': anything else pinauth serves is JSON
# under nosniff, or locked down itself), fetch the schema from it, submit nothing and are
# never framed. The stylesheets draw their icons as data: SVGs.
_COMMON = (
    "img-src 'self' data:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


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
        assets = root_path + ASSET_PREFIX
        rendered = get_swagger_ui_html(
            openapi_url=root_path + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=assets + "swagger-ui-bundle.js",
            swagger_css_url=assets + "swagger-ui.css",
            swagger_favicon_url=assets + "favicon.png",
            # The validator badge would send the schema's URL to swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        html = bytes(rendered.body).decode()
        policy = (
            "default-src 'none'; "
            # The bundle, and FastAPI's inline call that starts it.
            f"script-src 'self' {inline_script_hashes(html)}; "
            "style-src 'self'; "
            f"{_COMMON}"
        )
        return html, policy

    @functools.lru_cache(maxsize=4)
    def redoc(root_path: str) -> tuple[str, str]:
        assets = root_path + ASSET_PREFIX
        rendered = get_redoc_html(
            openapi_url=root_path + openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=assets + "redoc.standalone.js",
            redoc_favicon_url=assets + "favicon.png",
            with_google_fonts=False,
        )
        html = bytes(rendered.body).decode()
        policy = (
            "default-src 'none'; "
            "script-src 'self'; "
            # ReDoc styles itself with styled-components, which inserts <style> elements:
            # it renders nothing without 'unsafe-inline' here (never for scripts, though).
            "style-src 'unsafe-inline'; "
            # Its search index runs in a worker made from a blob; it fails without one.
            "worker-src blob:; "
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

    for name, media_type in ASSETS.items():
        router.add_api_route(ASSET_PREFIX + name, _asset(name, media_type), methods=["GET"])
    return router


def _asset(name: str, media_type: str) -> Callable[[], Any]:
    path = ASSETS_DIR / name

    async def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": _ASSET_CACHE})

    asset.__name__ = f"docs_asset_{name.replace('-', '_').replace('.', '_')}"
    return asset


def session_cookie_scheme(name: str) -> dict[str, str]:
    """The session cookie as a security scheme: routes that act for a browser name it."""
    return {
        "type": "apiKey",
        "in": "cookie",
        "name": name,
        "description": "The HttpOnly session cookie set by /auth/callback; browsers send it "
        "themselves (same origin, or cross-origin with credentials from an allowed origin). "
        f"Named `{HOST_PREFIX}{SESSION_COOKIE}` when pinauth is served over https. A request "
        "carrying it twice is refused with 400 `ambiguous_session`.",
    }


def install_openapi(app: FastAPI, session_cookie: str = SESSION_COOKIE) -> None:
    """Make /openapi.json describe the wire: pinauth's error shape, the cookie scheme.

    FastAPI documents a 422 `{"detail": […]}` on every route with parameters, but pinauth
    answers validation errors as `{"error": "invalid_request", "message": …}`: routes that
    can fail validation declare that 422 themselves, and FastAPI's own is dropped here.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _finish(schema, session_cookie)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _finish(schema: dict[str, Any], session_cookie: str) -> None:
    fastapi_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json", {})
            if validation.get("schema") == fastapi_422:
                del responses["422"]
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    # Referenced from oneOf and `default` entries, which FastAPI does not collect.
    for model in (ErrorResponse, PinterestErrorResponse):
        schemas.setdefault(
            model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}")
        )
    components.setdefault("securitySchemes", {})["sessionCookie"] = session_cookie_scheme(
        session_cookie
    )
