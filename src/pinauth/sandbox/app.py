"""A local Pinterest that speaks v5's real wire format, for demos and tests.

Mounted by `pinauth serve --demo` at /sandbox, or standalone with `pinauth sandbox`.
Test controls live under /_sandbox/ and exist only here, never in pinauth itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import json
import secrets
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from pinauth.sandbox.pages import html_page, page_policy
from pinauth.sandbox.state import (
    V5_SCOPES,
    Board,
    Fault,
    Grant,
    Pin,
    SandboxConfig,
    SandboxState,
    decode_bookmark,
    encode_bookmark,
    now,
)

AUTHENTICATION_FAILED = "Authentication failed."
INSUFFICIENT_SCOPE = (
    "Your token does not have sufficient permissions to perform this operation. "
    "Please ensure your token is authorized with the correct set of scopes."
)


class PinterestError(Exception):
    """An error answer in Pinterest's `{"code", "message"}` shape."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


class _Holder:
    """The current state; /_sandbox/reset swaps in a fresh one."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.state = SandboxState(config)


class FaultSpec(BaseModel):
    path_prefix: str = Field(description="e.g. /v5/boards or /v5/oauth/token")
    status: int = Field(ge=100, le=599)
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)
    delay: float = Field(0.0, ge=0, le=60)
    times: int = Field(1, ge=1, le=10_000)


class TokenToInspect(BaseModel):
    token: str


class Lifetime(BaseModel):
    seconds: int = Field(ge=0)


def create_sandbox_app(config: SandboxConfig | None = None) -> FastAPI:
    holder = _Holder(config or SandboxConfig())
    app = FastAPI(
        title="pinauth sandbox",
        summary="A local Pinterest API v5 for demos and tests.",
        version="5.23.0",
        # A trailing-slash redirect would take its host from the Host header.
        redirect_slashes=False,
    )
    policy = page_policy(holder.config.redirect_uris)

    def current() -> SandboxState:
        return holder.state

    @app.exception_handler(PinterestError)
    async def pinterest_error(_request: Request, exc: PinterestError) -> Response:
        return error(exc.status, exc.code, exc.message)

    @app.middleware("http")
    async def count_and_inject_faults(request: Request, call_next: Any) -> Response:
        path = request.url.path[len(request.scope.get("root_path", "")) :]
        state = current()
        if path.startswith("/v5/"):
            if path != "/v5/oauth/token":
                state.api_requests[f"{request.method} {path}"] += 1
            fault = state.take_fault(path)
            if fault is not None:
                return await _fault_response(fault)
        response: Response = await call_next(request)
        return response

    # --- OAuth: consent page -----------------------------------------------------------

    @app.get("/oauth/", response_class=HTMLResponse, include_in_schema=False)
    async def consent(request: Request) -> Response:
        q = request.query_params
        problem = _authorize_problem(holder.config, q.get("client_id"), q.get("redirect_uri"))
        if problem:
            # Never redirect to an unregistered URI: show the error here, like Pinterest.
            return html_page(
                "Cannot authorize", f"<p>{html.escape(problem)}</p>", policy=policy, status_code=400
            )
        redirect_uri = q["redirect_uri"]
        state = q.get("state", "")
        if q.get("response_type") != "code":
            return _redirect(redirect_uri, error="unsupported_response_type", state=state)
        scopes = [s for s in q.get("scope", "").split(",") if s]
        unknown = [s for s in scopes if s not in V5_SCOPES]
        if not scopes or unknown:
            return _redirect(redirect_uri, error="invalid_scope", state=state)
        fields = "".join(
            f'<input type="hidden" name="{name}" value="{html.escape(q.get(name, ""))}">'
            for name in ("client_id", "redirect_uri", "scope", "state")
        )
        scope_items = "".join(f"<li><code>{html.escape(s)}</code></li>" for s in scopes)
        body = f"""
        <p class="lead">App <strong>{html.escape(holder.config.client_id)}</strong> wants to
        access the Pinterest account <strong>{html.escape(holder.config.username)}</strong>.</p>
        <p>It asks for:</p><ul>{scope_items}</ul>
        <form method="post" action="">{fields}
          <button name="decision" value="allow" class="allow">Allow</button>
          <button name="decision" value="deny" class="deny">Deny</button>
        </form>
        <p class="note">This is pinauth's sandbox: no real Pinterest account is involved.</p>"""
        return html_page("Connect to Pinterest", body, policy=policy)

    @app.post("/oauth/", include_in_schema=False)
    async def decide(request: Request) -> Response:
        form = await request.form()
        values = {k: str(v) for k, v in form.items()}
        problem = _authorize_problem(
            holder.config, values.get("client_id"), values.get("redirect_uri")
        )
        if problem:
            return html_page(
                "Cannot authorize", f"<p>{html.escape(problem)}</p>", policy=policy, status_code=400
            )
        redirect_uri, state = values["redirect_uri"], values.get("state", "")
        if values.get("decision") != "allow":
            return _redirect(redirect_uri, error="access_denied", state=state)
        scopes = frozenset(s for s in values.get("scope", "").split(",") if s in V5_SCOPES)
        code = current().issue_code(redirect_uri, scopes)
        return _redirect(redirect_uri, code=code, state=state)

    # --- OAuth: token endpoint --------------------------------------------------------

    @app.post("/v5/oauth/token", tags=["oauth"])
    async def token(request: Request) -> Response:
        """Exchange a code, or a refresh token, for tokens (HTTP Basic, form body)."""
        state = current()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        form = await request.form() if content_type == "application/x-www-form-urlencoded" else {}
        grant_type = str(form.get("grant_type", ""))
        state.token_requests[grant_type or "(none)"] += 1
        if not _client_authenticated(holder.config, request.headers.get("authorization")):
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
                return error(400, 1, "Invalid refresh token.")
            body = state.issue_tokens(grant.user, grant.scopes)
            return JSONResponse(body | {"response_type": "refresh_token"})
        return error(400, 1, f"Unsupported grant_type {grant_type!r}.")

    # --- API ---------------------------------------------------------------------------

    def authorize(request: Request, *needed: str) -> Grant:
        header = request.headers.get("authorization", "")
        scheme, _, token_value = header.partition(" ")
        grant = current().access_tokens.get(token_value) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires_at <= now():
            raise PinterestError(401, 2, AUTHENTICATION_FAILED)
        if not set(needed) <= grant.scopes:
            raise PinterestError(401, 3, INSUFFICIENT_SCOPE)
        return grant

    def own_board(grant: Grant, board_id: str) -> Board:
        board = current().boards.get(board_id)
        if board is None or board.owner != grant.user:
            raise PinterestError(404, 404, "Board not found.")
        return board

    def own_pin(grant: Grant, pin_id: str) -> Pin:
        pin = current().pins.get(pin_id)
        if pin is None or pin.owner != grant.user:
            raise PinterestError(404, 404, "Pin not found.")
        return pin

    def page(request: Request, items: list[dict[str, Any]]) -> Response:
        raw_size = request.query_params.get("page_size", "25")
        if not raw_size.isdigit() or not 1 <= int(raw_size) <= 250:
            return error(400, 1, "page_size must be an integer from 1 to 250.")
        offset = 0
        if bookmark := request.query_params.get("bookmark"):
            decoded = decode_bookmark(bookmark)
            if decoded is None:
                return error(400, 1, "Invalid bookmark.")
            offset = decoded
        size = int(raw_size)
        end = offset + size
        return JSONResponse(
            {
                "items": items[offset:end],
                "bookmark": encode_bookmark(end) if end < len(items) else None,
            }
        )

    @app.get("/v5/user_account", tags=["user_account"])
    async def user_account(request: Request) -> Response:
        grant = authorize(request, "user_accounts:read")
        state = current()
        return JSONResponse(
            {
                "account_type": "PINNER",
                "id": state.user_id,
                "username": grant.user,
                "profile_image": "https://i.pinimg.com/75x75_RS/sandbox.jpg",
                "website_url": "",
                "about": "A sandbox account",
                "board_count": sum(1 for b in state.boards.values() if b.owner == grant.user),
                "pin_count": sum(1 for p in state.pins.values() if p.owner == grant.user),
                "follower_count": 0,
                "following_count": 0,
                "monthly_views": 0,
            }
        )

    @app.get("/v5/boards", tags=["boards"])
    async def list_boards(request: Request) -> Response:
        grant = authorize(request, "boards:read")
        state = current()
        boards = [b for b in state.boards.values() if b.owner == grant.user]
        return page(request, [b.as_json(state.pin_count(b.id)) for b in reversed(boards)])

    @app.post("/v5/boards", tags=["boards"], status_code=201)
    async def create_board(request: Request) -> Response:
        grant = authorize(request, "boards:write")
        body = await _json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 180:
            return error(400, 1, "A board needs a name of 1 to 180 characters.")
        privacy = body.get("privacy", "PUBLIC")
        if privacy not in ("PUBLIC", "PROTECTED", "SECRET"):
            return error(400, 1, "privacy must be PUBLIC, PROTECTED or SECRET.")
        description = body.get("description") or ""
        board = current().add_board(grant.user, name.strip(), str(description), privacy)
        return JSONResponse(board.as_json(0), status_code=201)

    @app.get("/v5/boards/{board_id}", tags=["boards"])
    async def get_board(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:read")
        board = own_board(grant, board_id)
        return JSONResponse(board.as_json(current().pin_count(board_id)))

    @app.patch("/v5/boards/{board_id}", tags=["boards"])
    async def update_board(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:write")
        board = own_board(grant, board_id)
        body = await _json_object(request)
        if "name" in body:
            if not isinstance(body["name"], str) or not body["name"].strip():
                return error(400, 1, "A board needs a name.")
            board.name = body["name"].strip()
        if "description" in body:
            board.description = str(body["description"] or "")
        if "privacy" in body:
            if body["privacy"] not in ("PUBLIC", "PROTECTED", "SECRET"):
                return error(400, 1, "privacy must be PUBLIC, PROTECTED or SECRET.")
            board.privacy = body["privacy"]
        return JSONResponse(board.as_json(current().pin_count(board_id)))

    @app.delete("/v5/boards/{board_id}", tags=["boards"], status_code=204)
    async def delete_board(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:write")
        own_board(grant, board_id)
        state = current()
        del state.boards[board_id]
        for pin_id in [p.id for p in state.pins.values() if p.board_id == board_id]:
            del state.pins[pin_id]
        return Response(status_code=204)

    @app.get("/v5/boards/{board_id}/pins", tags=["boards"])
    async def board_pins(board_id: str, request: Request) -> Response:
        grant = authorize(request, "boards:read", "pins:read")
        own_board(grant, board_id)
        state = current()
        pins = [p.as_json() for p in state.pins.values() if p.board_id == board_id]
        return page(request, pins[::-1])

    @app.get("/v5/pins", tags=["pins"])
    async def list_pins(request: Request) -> Response:
        grant = authorize(request, "pins:read")
        pins = [p.as_json() for p in current().pins.values() if p.owner == grant.user]
        return page(request, pins[::-1])

    @app.post("/v5/pins", tags=["pins"], status_code=201)
    async def create_pin(request: Request) -> Response:
        grant = authorize(request, "pins:write")
        body = await _json_object(request)
        state = current()
        board_id = body.get("board_id")
        board = state.boards.get(board_id) if isinstance(board_id, str) else None
        if board is None or board.owner != grant.user:
            return error(400, 1, "board_id must name one of your boards.")
        source = body.get("media_source")
        if (
            not isinstance(source, dict)
            or source.get("source_type") != "image_url"
            or not isinstance(source.get("url"), str)
        ):
            return error(400, 1, "media_source must be {source_type: image_url, url: ...}.")
        pin = state.add_pin(
            grant.user,
            board.id,
            title=str(body.get("title") or ""),
            description=str(body.get("description") or ""),
            link=body.get("link"),
            alt_text=body.get("alt_text"),
            image_url=source["url"],
        )
        return JSONResponse(pin.as_json(), status_code=201)

    @app.get("/v5/pins/{pin_id}", tags=["pins"])
    async def get_pin(pin_id: str, request: Request) -> Response:
        grant = authorize(request, "pins:read")
        return JSONResponse(own_pin(grant, pin_id).as_json())

    @app.delete("/v5/pins/{pin_id}", tags=["pins"], status_code=204)
    async def delete_pin(pin_id: str, request: Request) -> Response:
        grant = authorize(request, "pins:write")
        own_pin(grant, pin_id)
        del current().pins[pin_id]
        return Response(status_code=204)

    @app.api_route(
        "/v5/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def not_implemented(rest: str) -> Response:
        return error(404, 404, f"The sandbox does not implement /v5/{rest}.")

    # --- test controls -----------------------------------------------------------------

    @app.post("/_sandbox/reset", tags=["controls"])
    async def reset() -> dict[str, str]:
        """Forget every token, code, fault and counter; restore the sample boards."""
        holder.state = SandboxState(holder.config)
        return {"status": "reset"}

    @app.put("/_sandbox/access-token-lifetime", tags=["controls"])
    async def set_lifetime(lifetime: Lifetime) -> dict[str, int]:
        """Set the lifetime (expires_in) of access tokens issued from now on."""
        current().access_token_lifetime = lifetime.seconds
        return {"seconds": lifetime.seconds}

    @app.post("/_sandbox/expire-access-tokens", tags=["controls"])
    async def expire_access_tokens() -> dict[str, int]:
        """Make every access token issued so far expired."""
        return {"expired": current().expire_access_tokens()}

    @app.post("/_sandbox/revoke-refresh-tokens", tags=["controls"])
    async def revoke_refresh_tokens() -> dict[str, int]:
        """Make every refresh token issued so far invalid."""
        return {"revoked": current().revoke_refresh_tokens()}

    @app.post("/_sandbox/faults", tags=["controls"], status_code=201)
    async def add_fault(spec: FaultSpec) -> dict[str, int]:
        """Queue a canned response for the next `times` requests under `path_prefix`."""
        state = current()
        state.faults.append(
            Fault(spec.path_prefix, spec.status, spec.body, spec.headers, spec.delay, spec.times)
        )
        return {"queued": len(state.faults)}

    @app.delete("/_sandbox/faults", tags=["controls"])
    async def clear_faults() -> dict[str, int]:
        """Drop every queued fault."""
        state = current()
        count = len(state.faults)
        state.faults.clear()
        return {"cleared": count}

    @app.post("/_sandbox/introspect", tags=["controls"])
    async def introspect(token: TokenToInspect) -> dict[str, object]:
        """Whether a token is live (RFC 7662-style), e.g. to check which refresh token won."""
        state = current()
        for kind, grants in (
            ("access_token", state.access_tokens),
            ("refresh_token", state.refresh_tokens),
        ):
            grant = grants.get(token.token)
            if grant is not None:
                return {"active": grant.expires_at > now(), "token_type": kind}
        return {"active": False, "token_type": None}

    @app.get("/_sandbox/counters", tags=["controls"])
    async def counters() -> dict[str, dict[str, int]]:
        """Token requests by grant type, and API requests by method and path."""
        state = current()
        return {
            "token_requests": dict(state.token_requests),
            "api_requests": dict(state.api_requests),
        }

    return app


def _authorize_problem(
    config: SandboxConfig, client_id: str | None, redirect_uri: str | None
) -> str:
    if client_id != config.client_id:
        return f"Unknown client_id {client_id!r}."
    if redirect_uri not in config.redirect_uris:
        return f"redirect_uri {redirect_uri!r} is not registered for this app."
    return ""


def _client_authenticated(config: SandboxConfig, header: str | None) -> bool:
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


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise PinterestError(400, 1, "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise PinterestError(400, 1, "The body must be a JSON object.")
    return body


async def _fault_response(fault: Fault) -> Response:
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.body is None:
        content = b""
    elif isinstance(fault.body, str):
        content = fault.body.encode()
    else:
        content = json.dumps(fault.body).encode()
    headers = {"content-type": "application/json"} | fault.headers
    return Response(content, status_code=fault.status, headers=headers)


def _redirect(redirect_uri: str, **params: str) -> RedirectResponse:
    separator = "&" if "?" in redirect_uri else "?"
    return RedirectResponse(f"{redirect_uri}{separator}{urlencode(params)}", status_code=302)
