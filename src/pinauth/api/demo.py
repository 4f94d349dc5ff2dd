"""GET /: the demo page (a reference frontend using only pinauth's public API) in demo
mode, else a short index of where things are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from pinauth import __version__
from pinauth.api.deps import PublicHostOnly, ServicesDep
from pinauth.demo import DEMO_RECEIVER_PATH, DemoReceiver
from pinauth.security_headers import DEMO_PAGE_CSP
from pinauth.webhooks import SIGNATURE_HEADER

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


# Mounted in demo mode only (create_app with a sandbox).
receiver_router = APIRouter(include_in_schema=False)


@receiver_router.post(DEMO_RECEIVER_PATH)
async def receive_webhook(request: Request) -> Response:
    """The demo's built-in webhook receiver."""
    receiver: DemoReceiver = request.app.state.demo_receiver
    if not receiver.receive(await request.body(), request.headers.get(SIGNATURE_HEADER)):
        return JSONResponse(
            {"error": "invalid_signature", "message": "Pinauth-Signature does not verify."},
            status_code=400,
        )
    return Response(status_code=204)


# The page's own origin only: a DNS-rebinding page would read connection ids, usernames
# and end user ids. (The receiver above is pinauth's dispatcher calling itself on
# loopback; it keeps only what its signature verifies.)
@receiver_router.get("/demo/webhook-events", dependencies=[PublicHostOnly])
async def received_webhooks(request: Request) -> dict[str, Any]:
    """What the demo's receiver got, newest first, for the demo page."""
    receiver: DemoReceiver = request.app.state.demo_receiver
    return {"items": receiver.events()}
