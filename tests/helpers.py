"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import respx

from pinauth.settings import Settings


class ManualClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def account_tokens(account_id: str) -> tuple[str, str]:
    """(access, refresh) tokens that name their account, so a request shows whose it is."""
    return f"pina_ACCESS-{account_id}", f"pinr_REFRESH-{account_id}"


async def connect_as(
    client: httpx.AsyncClient,
    pinterest: respx.MockRouter,
    settings: Settings,
    account: dict[str, Any],
) -> str:
    """Log `client` in as Pinterest `account` through the real flow; returns its access token.

    Pinterest's recorded calls are reset afterwards, so tests count only their own. (A
    later route for the same method and URL replaces the login's.)
    """
    access, refresh = account_tokens(account["id"])
    pinterest.post(settings.token_url).respond(
        200,
        json={
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "bearer",
            "expires_in": 2592000,
            "refresh_token_expires_in": 5184000,
            "scope": ",".join(settings.scopes),
        },
    )
    pinterest.get(f"{settings.api_url}/user_account").respond(200, json=account)
    login = await client.get("/auth/login")
    state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
    callback = await client.get("/auth/callback", params={"code": "code", "state": state})
    assert callback.status_code == 303, callback.text
    pinterest.reset()
    return access
