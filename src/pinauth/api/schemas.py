"""Response bodies, typed so /docs shows exactly what clients get."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from pinauth.models import ConnectionStatus


class ErrorResponse(BaseModel):
    error: str = Field(examples=["not_authenticated"])
    message: str = Field(examples=["No valid session: connect a Pinterest account first."])
    login_url: str | None = Field(
        None, description="Where to send the user to log in again (reauthorization_required)."
    )


class MeResponse(BaseModel):
    pinterest_user_id: str
    username: str
    scopes: list[str]
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    status: ConnectionStatus


class RefreshResponse(BaseModel):
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None


class BoardsPage(BaseModel):
    items: list[dict[str, Any]] = Field(description="Boards in Pinterest's own shape.")
    bookmark: str | None = Field(
        None, description="Pass back as `bookmark` for the next page; null on the last page."
    )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the pinauth errors a route can return."""
    return {status: {"model": ErrorResponse} for status in statuses}
