"""The sandbox's OAuth side: Pinterest's consent page and its token endpoint."""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import secrets
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pinauth.sandbox.errors import AUTHENTICATION_FAILED, error
from pinauth.sandbox.pages import html_page, page_policy
from pinauth.sandbox.state import V5_SCOPES, SandboxConfig, SandboxState, StateHolder, now


def oauth_router(holder: StateHolder) -> APIRouter:
    router = APIRouter()
    policy = page_policy((*holder.config.redirect_uris, *holder.config.landing_origins))

    def current() -> SandboxState:
        return holder.state

    # --- OAuth: consent page -----------------------------------------------------------

    @router.get("/oauth/", response_class=HTMLResponse, include_in_schema=False)
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
        accounts = "".join(
            f'<label><input type="radio" name="account" value="{html.escape(name)}"'
            f"{' checked' if name == holder.config.username else ''}> "
            f"{html.escape(name)}</label>"
            for name in holder.config.usernames
        )
        body = f"""
        <p class="lead">App <strong>{html.escape(holder.config.client_id)}</strong> wants to
        access your Pinterest account.</p>
        <p>It asks for:</p><ul>{scope_items}</ul>
        <form method="post" action="">{fields}
          <fieldset><legend>Approve as</legend>{accounts}</fieldset>
          <button name="decision" value="allow" class="allow">Allow</button>
          <button name="decision" value="deny" class="deny">Deny</button>
        </form>
        <p class="note">This is pinauth's sandbox: no real Pinterest account is involved.</p>"""
        return html_page("Connect to Pinterest", body, policy=policy)

    @router.post("/oauth/", include_in_schema=False)
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
        account = values.get("account", holder.config.username)
        if account not in holder.config.usernames:
            return html_page(
                "Cannot authorize", "<p>Unknown account.</p>", policy=policy, status_code=400
            )
        code = current().issue_code(redirect_uri, scopes, account)
        return _redirect(redirect_uri, code=code, state=state)

    # --- OAuth: token endpoint --------------------------------------------------------

    @router.post("/v5/oauth/token", tags=["oauth"])
    async def token(request: Request) -> Response:
        """Exchange a code, or a refresh token, for tokens (HTTP Basic, form body)."""
        state = current()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        form = await request.form() if content_type == "application/x-www-form-urlencoded" else {}
        grant_type = str(form.get("grant_type", ""))
        state.token_requests[grant_type or "(none)"] += 1
        if not _client_authenticated(holder.config, request.headers.get("authorization")):
            # As Pinterest: a client that fails HTTP Basic authentication gets 401 with
            # code 2 "Authentication failed." (the vendored spec's documented answer for
            # POST /oauth/token/revoke, which authenticates the client the same way; RFC
            # 6749 §5.2's invalid_client is 401 under HTTP Basic; pinterest-python-sdk
            # issue 110 got a 401 from v5/oauth/token for a malformed Basic header). It is
            # checked before the grant is looked at: a refresh token sent with a wrong
            # secret is neither spent nor rotated.
            return error(401, 2, AUTHENTICATION_FAILED)
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
                # A spent, revoked or expired refresh token is the grant's fault, not the
                # client's: 400, as RFC 6749 §5.2 answers invalid_grant.
                return error(400, 1, "Invalid refresh token.")
            state.spent_refresh_tokens.add(refresh)
            body = state.issue_tokens(grant.user, grant.scopes)
            if state.token_holds:
                # Rotated already: whoever does not get this answer has lost the grant.
                await asyncio.sleep(state.token_holds.pop(0))
            return JSONResponse(body | {"response_type": "refresh_token"})
        return error(400, 1, f"Unsupported grant_type {grant_type!r}.")

    return router


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


def _redirect(redirect_uri: str, **params: str) -> RedirectResponse:
    separator = "&" if "?" in redirect_uri else "?"
    return RedirectResponse(f"{redirect_uri}{separator}{urlencode(params)}", status_code=302)
