"""Calling Pinterest for a connection: its rate limits, fresh tokens, one retry after a 401."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import httpx

from pinauth.errors import Busy, UpstreamUnavailable
from pinauth.governor import RateGovernor
from pinauth.models import Connection
from pinauth.pinterest.client import PinterestClient, UpstreamRequest
from pinauth.tokens import TokenManager

log = logging.getLogger(__name__)

# Pinterest's error code for a token lacking a scope: a new token has the same scopes,
# so refreshing on it would only turn every such call into a refresh.
INSUFFICIENT_SCOPE_CODE = 3


def _token_rejected(response: httpx.Response) -> bool:
    if response.status_code != 401:
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and body.get("code") == INSUFFICIENT_SCOPE_CODE)


class ProxyService:
    def __init__(
        self, tokens: TokenManager, client: PinterestClient, governor: RateGovernor
    ) -> None:
        self._tokens = tokens
        self._client = client
        self._governor = governor

    async def call(self, connection: Connection, request: UpstreamRequest) -> httpx.Response:
        # Before the token: a call Pinterest asked us to hold back needs neither.
        held = self._governor.held(connection, request)
        if held is not None:
            return held
        credential = await self._tokens.usable_credential(connection)
        response = await self._client.send(request, credential.access_token, connection)
        # A 401 means Pinterest did not act on the request, so sending it again is safe
        # for every method, POST included. Pinterest's 401 never reaches the client: the
        # call ends with Pinterest's answer to a token issued after the rejection, or in
        # pinauth's own reauthorization_required or 503. A row that had already moved on
        # (another replica refreshed) offers its newer token first, which saves spending
        # a refresh token; if that is rejected too, only a fresh token is tried.
        fresh = False
        for offered in (False, True):
            if not _token_rejected(response) or fresh:
                break
            log.info("Pinterest rejected connection %s's token", connection.public_id)
            credential, fresh = await self._tokens.replace_rejected(
                credential, datetime.now(UTC), fresh_only=offered
            )
            response = await self._client.send(request, credential.access_token, connection)
        if _token_rejected(response):
            # Pinterest refused a token it issued after the rejection: nothing newer can
            # be had, and its 401 would read as the caller's own failure.
            log.warning(
                "Pinterest rejected connection %s's freshly issued token", connection.public_id
            )
            raise UpstreamUnavailable(
                "Pinterest rejected a token it had just issued; retry shortly."
            )
        return response


class InflightBodies:
    """The proxied request bodies this process holds, in bytes, kept under a cap.

    A body is in memory from its first byte read until Pinterest has answered (a retry
    sends it again), so each request reserves its bytes before reading them, all of a
    declared Content-Length at once, a chunked body's as its chunks arrive, and gives
    them back when its call ends. Past the cap the request is refused with 503 busy
    rather than read. Every request of a process runs on its one event loop and nothing
    awaits between the check and the reservation, so no lock is needed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def reservation(self) -> BodyReservation:
        return BodyReservation(self)


class BodyReservation:
    """One request's share of InflightBodies; `release` (in a finally) gives it all back."""

    __slots__ = ("_bodies", "size")

    def __init__(self, bodies: InflightBodies) -> None:
        self._bodies = bodies
        self.size = 0

    def grow(self, size: int) -> None:
        """Reserve `size` more bytes, or raise Busy (reserving nothing) if they do not fit."""
        bodies = self._bodies
        if bodies.in_flight + size > bodies.limit:
            raise Busy()
        bodies.in_flight += size
        self.size += size

    def release(self) -> None:
        self._bodies.in_flight -= self.size
        self.size = 0
