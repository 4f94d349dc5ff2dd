"""Pinterest's OAuth 2.0 endpoints: the authorize URL and the token endpoint."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ValidationError

from pinauth.errors import (
    PinauthError,
    PinterestClientRejected,
    UpstreamError,
    UpstreamUnavailable,
)
from pinauth.observability import Metrics
from pinauth.pinterest.client import retry_after_seconds
from pinauth.pinterest.http import pinterest_error_message, translate_transport_errors
from pinauth.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5


class TokenRejected(PinauthError):
    """Pinterest refused the grant itself (bad code; refresh token spent, revoked or
    expired): retrying with it cannot help. Never raised for the app's own credentials
    being refused: that is PinterestClientRejected, and says nothing about the grant."""

    status_code = 400
    code = "authorization_failed"
    default_message = "Pinterest rejected the authorization grant."

    def __init__(self, message: str) -> None:
        super().__init__(message or self.default_message)


class _TokenPayload(BaseModel):
    # Lax mode coerces "2592000" to 2592000: Pinterest has sent expires_in as both.
    access_token: str
    expires_in: int
    refresh_token: str | None = None
    refresh_token_expires_in: int | None = None
    refresh_token_expires_at: int | None = None
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    access_token_expires_at: datetime
    refresh_token: str | None
    refresh_token_expires_at: datetime | None
    scopes: list[str] | None

    def __repr__(self) -> str:
        # Keep tokens out of tracebacks and debug logs.
        return f"TokenSet(access_token_expires_at={self.access_token_expires_at!r}, ...)"


def split_scopes(scope: str) -> list[str]:
    return [s for s in re.split(r"[,\s]+", scope) if s]


class PinterestOAuth:
    def __init__(self, http: httpx.AsyncClient, settings: Settings, metrics: Metrics) -> None:
        self._http = http
        self._settings = settings
        self._metrics = metrics
        self._auth = httpx.BasicAuth(settings.client_id, settings.client_secret.get_secret_value())

    def authorize_url(self, state: str) -> str:
        query = urlencode(
            {
                "client_id": self._settings.client_id,
                "redirect_uri": self._settings.redirect_uri,
                "response_type": "code",
                "scope": ",".join(self._settings.scopes),
                "state": state,
            }
        )
        separator = "&" if "?" in self._settings.authorize_url else "?"
        return f"{self._settings.authorize_url}{separator}{query}"

    async def exchange_code(self, code: str) -> TokenSet:
        return await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self._settings.redirect_uri,
                # Apps created before 2025-09-25 otherwise get a non-renewable refresh token.
                "continuous_refresh": "true",
            }
        )

    async def refresh(self, refresh_token: str) -> TokenSet:
        return await self._token_request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )

    async def check_client(self) -> None:
        """Whether the token endpoint authenticates this app's client, spending no grant.

        A refresh grant with a refresh token that cannot be valid: raises TokenRejected
        if the client got through (the grant refused), PinterestClientRejected if not;
        see clientstate.ClientCredentialsProbe for why that is sound. Answered with
        tokens (it never should be), they are dropped unused.
        """
        await self._token_request(
            {"grant_type": "refresh_token", "refresh_token": CLIENT_CHECK_REFRESH_TOKEN}
        )

    async def _token_request(self, form: dict[str, str]) -> TokenSet:
        grant = form["grant_type"]
        started = time.perf_counter()
        async with translate_transport_errors("the token request"):
            response = await self._http.post(
                self._settings.token_url,
                data=form,
                auth=self._auth,
                headers={"Accept": "application/json"},
            )
        self._metrics.observe_upstream("oauth", time.perf_counter() - started)
        now = datetime.now(UTC)
        if _client_rejected(response):
            log.warning(
                "token endpoint refused the app's client credentials (HTTP %s)",
                response.status_code,
            )
            raise PinterestClientRejected()
        if response.status_code in (400, 403):
            log.warning("token endpoint rejected %s grant (HTTP %s)", grant, response.status_code)
            raise TokenRejected(pinterest_error_message(response))
        if response.status_code == 429 or response.status_code >= 500:
            log.warning(
                "token endpoint unavailable for %s grant (HTTP %s)", grant, response.status_code
            )
            raise UpstreamUnavailable(
                "Pinterest's token endpoint is unavailable; retry later.",
                retry_after=_retry_after(response),
            )
        if response.status_code != 200:
            raise UpstreamError(f"Pinterest's token endpoint answered HTTP {response.status_code}.")
        try:
            payload = _TokenPayload.model_validate_json(response.content)
        except ValidationError as e:
            raise UpstreamError("Pinterest's token endpoint sent an unreadable response.") from e
        return _token_set(payload, now)


# Not a refresh token Pinterest could have issued (theirs start `pinr.`): checks the client
# credentials without touching any user's grant.
CLIENT_CHECK_REFRESH_TOKEN = "pinauth-client-credentials-check"

# RFC 6749's error codes that blame the client, not the grant (§5.2): `invalid_client`
# (authentication failed) and `unauthorized_client` (this client may not use this grant
# type). A provider answering in RFC style may send either with 400.
CLIENT_ERRORS = frozenset({"invalid_client", "unauthorized_client"})


def _client_rejected(response: httpx.Response) -> bool:
    """Whether the token endpoint refused the app's own credentials, not the grant.

    The two mean opposite things for a connection: a refused grant (a refresh token
    spent, revoked or expired) kills that one connection; refused client credentials (a
    wrong PINTEREST_CLIENT_SECRET, a rotated or revoked app secret) say nothing about any
    grant, which Pinterest did not even look at, and must kill none.

    - RFC 6749 §5.2: `invalid_client` is answered with 401 when the client authenticated
      with HTTP Basic (as pinauth does, per the spec's `security: basic`), and
      `invalid_grant` (an invalid, expired or revoked refresh token or code) with 400.
    - Pinterest's vendored spec (spec/pinterest/openapi.yaml) documents only `200` and a
      `default` Error for POST /oauth/token, but for POST /oauth/token/revoke, which
      authenticates the client the same way, it documents `401: Client authentication
      error` with `{"code": 2, "message": "Authentication failed."}`; a public report
      (github.com/pinterest/pinterest-python-sdk issue 110: a malformed Basic header sent
      to v5/oauth/token) got exactly a 401. So on Pinterest a 401 from the token endpoint
      means the client credentials, whatever its body says.
    - A 400 or 403 is the grant's, unless its body names an RFC client error.
    """
    if response.status_code == 401:
        return True
    if response.status_code not in (400, 403):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("error") in CLIENT_ERRORS


# Pinterest documents lifetimes of days to a year; a larger one is a broken answer, but its
# tokens are real and the refresh token it replaces is already dead, so the answer is kept
# and the lifetime clamped rather than rejected (an unbounded one overflows datetime). A
# negative lifetime, or an expiry already past, is taken as expiring now: the next use
# refreshes (or, for the refresh token, asks the user to reconnect) instead of trusting it.
MAX_TOKEN_LIFETIME = timedelta(days=3650)


def _expiry_in(now: datetime, seconds: int) -> datetime:
    max_seconds = int(MAX_TOKEN_LIFETIME.total_seconds())
    return now + timedelta(seconds=min(max(seconds, 0), max_seconds))


def _expiry_at(now: datetime, timestamp: int) -> datetime:
    latest = now + MAX_TOKEN_LIFETIME
    if timestamp >= latest.timestamp():
        return latest
    if timestamp <= now.timestamp():
        return now
    return datetime.fromtimestamp(timestamp, UTC)


def _token_set(payload: _TokenPayload, now: datetime) -> TokenSet:
    refresh_expires_at: datetime | None = None
    if payload.refresh_token_expires_at is not None:
        refresh_expires_at = _expiry_at(now, payload.refresh_token_expires_at)
    elif payload.refresh_token_expires_in is not None:
        refresh_expires_at = _expiry_in(now, payload.refresh_token_expires_in)
    return TokenSet(
        access_token=payload.access_token,
        access_token_expires_at=_expiry_in(now, payload.expires_in),
        refresh_token=payload.refresh_token,
        refresh_token_expires_at=refresh_expires_at,
        scopes=split_scopes(payload.scope) if payload.scope else None,
    )


def _retry_after(response: httpx.Response) -> int:
    seconds = retry_after_seconds(response)
    return DEFAULT_RETRY_AFTER if seconds is None else math.ceil(seconds)
