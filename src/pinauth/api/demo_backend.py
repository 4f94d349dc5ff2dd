"""/demo/backend/…: the demo page's backend panel (demo mode only; see demobackend.py).

Each route runs one step of what an app's backend does with pinauth and answers with
its result and the HTTP exchanges it took. They act with the demo's API key, so the
Origin check that guards cookie routes guards all of them, reads included.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pinauth.api.deps import PublicHostOnly, TrustedOrigin
from pinauth.api.v1 import PUBLIC_ID_PATTERN
from pinauth.demobackend import DemoBackend, DemoBackendFailed, Exchange

# Long enough for anything pinauth accepts, so that pinauth, not this route, refuses
# what it would refuse, and the panel shows that exchange.
_SOME_TEXT = Field(max_length=1_000)


class MintRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    end_user_id: Annotated[str, _SOME_TEXT]


class ConfirmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    result: Annotated[str, _SOME_TEXT]
    end_user_id: Annotated[str, _SOME_TEXT]


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    connection_id: Annotated[str, Field(min_length=1, max_length=64, pattern=PUBLIC_ID_PATTERN)]
    title: Annotated[str, Field(max_length=100)] = "Posted from the demo's backend"
    via: Literal["api_key", "proxy_token"]


def _ok(result: dict[str, Any], exchanges: list[Exchange], code: int = 200) -> JSONResponse:
    return JSONResponse({**result, "exchanges": [asdict(e) for e in exchanges]}, status_code=code)


def _failed(e: DemoBackendFailed) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def demo_backend_router(backend: DemoBackend) -> APIRouter:
    router = APIRouter(
        prefix="/demo/backend",
        include_in_schema=False,
        # The Host check first: a DNS-rebinding page passes the Origin check.
        dependencies=[PublicHostOnly, TrustedOrigin],
    )

    @router.get("")
    async def about() -> dict[str, str]:
        """Where the demo's backend reaches pinauth (the page shows the panel if this exists)."""
        return {"pinauth_url": backend.pinauth_url}

    @router.post("/connect-sessions")
    async def mint(body: MintRequest) -> JSONResponse:
        """Mint a connect session for an end user; the browser comes back to the panel.

        The end user is not in return_to: the page confirms the result for the end user
        logged in to the demo app in the browser that comes back (its own storage), so a
        link sent to someone else is refused, as it must be in any app."""
        return_to = "/#backend"
        try:
            session, exchanges = await backend.mint_connect_session(body.end_user_id, return_to)
        except DemoBackendFailed as e:
            return _failed(e)
        minted = {"connect_url": session.connect_url, "expires_at": session.expires_at.isoformat()}
        return _ok({"connect_session": minted}, exchanges, status.HTTP_201_CREATED)

    @router.post("/confirm")
    async def confirm(body: ConfirmRequest) -> JSONResponse:
        """Confirm the browser's `pinauth_connect_result` for the end user logged in to the
        app (in the demo, the one in the panel); anyone else gets 403 from pinauth."""
        try:
            connection, exchanges = await backend.confirm(body.result, body.end_user_id)
        except DemoBackendFailed as e:
            return _failed(e)
        confirmed = {"id": connection.id, "username": connection.username}
        return _ok({"connection": confirmed | {"status": connection.status}}, exchanges)

    @router.get("/connections")
    async def connections(
        end_user_id: Annotated[str, Query(max_length=1_000)],
    ) -> JSONResponse:
        """The end user's connections, every page."""
        try:
            found, exchanges = await backend.connections(end_user_id)
        except DemoBackendFailed as e:
            return _failed(e)
        items = [
            {"id": c.id, "username": c.username, "status": c.status, "scopes": c.scopes}
            for c in found
        ]
        return _ok({"connections": items}, exchanges)

    @router.post("/pins")
    async def post_pin(body: PinRequest) -> JSONResponse:
        """Post a pin for a connection, with the API key or with a proxy token."""
        try:
            pin, exchanges = await backend.post_pin(
                body.connection_id, body.title, with_proxy_token=body.via == "proxy_token"
            )
        except DemoBackendFailed as e:
            return _failed(e)
        return _ok({"pin": pin}, exchanges, status.HTTP_201_CREATED)

    return router
