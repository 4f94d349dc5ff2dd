"""Calls pinauth itself makes to the Pinterest v5 API."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from pydantic import BaseModel, ValidationError

from pinauth.errors import UpstreamError
from pinauth.pinterest.http import pinterest_error_message, translate_transport_errors
from pinauth.settings import Settings


class _AccountPayload(BaseModel):
    id: str | None = None
    username: str | None = None


@dataclass(frozen=True, slots=True)
class PinterestAccount:
    id: str
    username: str


class PinterestAPI:
    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        self._http = http
        self._base = settings.api_url

    async def user_account(self, access_token: str) -> PinterestAccount:
        async with translate_transport_errors("the user account request"):
            response = await self._http.get(
                f"{self._base}/user_account",
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            )
        if response.status_code != 200:
            detail = pinterest_error_message(response)
            raise UpstreamError(
                f"Pinterest answered HTTP {response.status_code} for the user account"
                + (f": {detail}" if detail else ".")
            )
        try:
            payload = _AccountPayload.model_validate_json(response.content)
        except ValidationError as e:
            raise UpstreamError("Pinterest sent an unreadable user account.") from e
        # The spec marks `id` optional; the username is unique too, so it is a safe fallback.
        user_id = payload.id or payload.username
        if not user_id:
            raise UpstreamError("Pinterest's user account has neither an id nor a username.")
        return PinterestAccount(id=user_id, username=payload.username or user_id)
