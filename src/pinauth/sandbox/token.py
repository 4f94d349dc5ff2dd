"""The sandbox's token endpoint, and the controls that make it misbehave like Pinterest can.

Rotation is Pinterest's: a refresh token dies the moment it is used. The sandbox also
remembers the dead ones, so a test can count how often a client spent one twice, and it
can hold an answer after rotating (the client's process may die or stop meanwhile).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from pinauth.sandbox.errors import error
from pinauth.sandbox.state import SandboxConfig, SandboxState, now


class TokenHold(BaseModel):
    seconds: float = Field(gt=0, le=60, description="how long each answer is held")
    times: int = Field(1, ge=1, le=10_000, description="how many refresh answers to hold")


def add_token_routes(
    app: FastAPI, config: SandboxConfig, current: Callable[[], SandboxState]
) -> None:
    @app.post("/v5/oauth/token", tags=["oauth"])
    async def token(request: Request) -> Response:
        """Exchange a code, or a refresh token, for tokens (HTTP Basic, form body)."""
        state = current()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        form = await request.form() if content_type == "application/x-www-form-urlencoded" else {}
        grant_type = str(form.get("grant_type", ""))
        state.token_requests[grant_type or "(none)"] += 1
        if not client_authenticated(config, request.headers.get("authorization")):
            return error(401, 2, "Authentication failed: use HTTP Basic client authentication.")
        if content_type != "application/x-www-form-urlencoded":
            return error(400, 1, "The body must be application/x-www-form-urlencoded.")
        if grant_type == "authorization_code":
            code = state.codes.pop(str(form.get("code", "")), None)
            if code is None or code.expires_at < now():
                return error(400, 1, "Invalid authorization code.")
            if form.get("redirect_uri") != code.redirect_uri:
                return error(400, 1, "redirect_uri does not match the authorization request.")
            body = state.issue_tokens(code.user, code.scopes)
            return JSONResponse(body | {"response_type": "authorization_code"})
        if grant_type == "refresh_token":
            refresh = str(form.get("refresh_token", ""))
            # Rotation: the refresh token used here dies, whatever happens next.
            grant = state.refresh_tokens.pop(refresh, None)
            if grant is None or grant.expires_at < now():
                if refresh in state.spent_refresh_tokens:
                    state.refresh_token_reuses += 1
                return error(400, 1, "Invalid refresh token.")
            state.spent_refresh_tokens.add(refresh)
            body = state.issue_tokens(grant.user, grant.scopes)
            if state.token_holds:
                # Rotated already: whoever does not get this answer has lost the grant.
                await asyncio.sleep(state.token_holds.pop(0))
            return JSONResponse(body | {"response_type": "refresh_token"})
        return error(400, 1, f"Unsupported grant_type {grant_type!r}.")

    @app.put("/_sandbox/token-hold", tags=["controls"])
    async def hold_token_answers(hold: TokenHold) -> dict[str, int]:
        """Hold each of the next `times` refresh answers `seconds` after rotating."""
        holds = current().token_holds
        holds.extend([hold.seconds] * hold.times)
        return {"held": len(holds)}

    @app.get("/_sandbox/refresh-token-reuse", tags=["controls"])
    async def refresh_token_reuse() -> dict[str, int]:
        """How often a refresh token was presented again after it had been spent."""
        return {"reused": current().refresh_token_reuses}


def client_authenticated(config: SandboxConfig, header: str | None) -> bool:
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(client_id, config.client_id) and secrets.compare_digest(
        secret, config.client_secret
    )
