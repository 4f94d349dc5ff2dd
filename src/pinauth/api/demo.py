"""GET /: the demo page (a reference frontend using only pinauth's public API) in demo
mode, else a short index of where things are."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from pinauth import __version__
from pinauth.api.deps import ServicesDep
from pinauth.security_headers import DEMO_PAGE_CSP

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)

INDEX = {
    "service": "pinauth",
    "version": __version__,
    "docs": "/docs",
    "openapi": "/openapi.json",
    "login": "/auth/login",
    "health": "/healthz",
}


@router.get("/")
async def index(request: Request, services: ServicesDep) -> Response:
    """The demo page in demo mode (PINAUTH_DEMO_PAGE), else an index pointing at /docs."""
    # The demo page starts logins: it has to be on the origin the login cookie is for.
    moved = services.auth.public_origin.redirect(request)
    if moved is not None:
        return moved
    if not services.settings.demo_page:
        return JSONResponse(INDEX)
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": DEMO_PAGE_CSP},
    )
