"""GET /: the demo page, a reference frontend that uses only pinauth's public API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from pinauth.security_headers import DEMO_PAGE_CSP

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def demo_page() -> FileResponse:
    """The demo page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": DEMO_PAGE_CSP},
    )
