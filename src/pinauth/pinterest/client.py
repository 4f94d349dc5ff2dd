"""Calls to the Pinterest v5 API on a user's behalf, with careful retries."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from pinauth.errors import UpstreamError, UpstreamTimeout
from pinauth.settings import Settings

log = logging.getLogger(__name__)

# Methods where sending twice means the same as once; only these are retried blindly.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# Network failures where Pinterest cannot have acted on the request, or (for idempotent
# methods) where acting twice is harmless.
RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    path: str  # already confined by pinterest.paths.confine
    query: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds, from either its delta-seconds or HTTP-date form."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class PinterestClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._http = http
        self._base = httpx.URL(settings.api_url + "/")
        self._max_retries = settings.max_retries
        self._budget = settings.retry_budget_seconds
        self._sleep = sleep

    def url_for(self, request: UpstreamRequest) -> httpx.URL:
        # httpx's raw_path is path and query together; setting it replaces both.
        raw_path = self._base.raw_path + request.path.encode("ascii")
        if request.query:
            raw_path += b"?" + request.query
        return self._base.copy_with(raw_path=raw_path)

    async def send(self, request: UpstreamRequest, access_token: str) -> httpx.Response:
        """Send once, retrying idempotent methods on transient failures within the budget."""
        url = self.url_for(request)
        headers = [*request.headers, ("Authorization", f"Bearer {access_token}")]
        retryable = request.method in IDEMPOTENT_METHODS
        deadline = time.monotonic() + self._budget
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    request.method, url, headers=headers, content=request.body or None
                )
            except httpx.TimeoutException as e:
                raise UpstreamTimeout() from e
            except RETRYABLE_ERRORS as e:
                if retryable and await self._wait_before_retry(attempt, None, deadline):
                    attempt += 1
                    continue
                raise UpstreamError("Pinterest could not be reached.") from e
            except httpx.TransportError as e:
                raise UpstreamError("Pinterest could not be reached.") from e
            if (
                retryable
                and response.status_code in RETRYABLE_STATUSES
                and await self._wait_before_retry(attempt, retry_after_seconds(response), deadline)
            ):
                attempt += 1
                continue
            return response

    async def _wait_before_retry(
        self, attempt: int, retry_after: float | None, deadline: float
    ) -> bool:
        """Sleep before the next attempt; False if no attempt or budget is left for it."""
        if attempt >= self._max_retries:
            return False
        if retry_after is None:
            # Exponential backoff with full jitter: replicas retrying together spread out.
            delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))
        else:
            delay = retry_after
        if time.monotonic() + delay > deadline:
            return False
        log.info("retrying Pinterest call in %.2fs (attempt %d)", delay, attempt + 2)
        await self._sleep(delay)
        return True
