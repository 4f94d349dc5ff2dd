"""Calls to the Pinterest v5 API on a user's behalf, with careful retries."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Protocol

import httpx

from pinauth.errors import UpstreamError, UpstreamTimeout
from pinauth.numbers import ascii_int
from pinauth.observability import Metrics
from pinauth.pinterest.http import USER_AGENT, http_timeout
from pinauth.settings import Settings

if TYPE_CHECKING:
    from pinauth.models import Connection

log = logging.getLogger(__name__)

# Methods where sending twice means the same as once; only these are retried blindly.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# Answers in which Pinterest may ask to be left alone for a while (see governor.py).
WAIT_STATUSES = frozenset({429, 503})
# Network failures where Pinterest cannot have acted on the request, or (for idempotent
# methods) where acting twice is harmless.
RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 4.0
# A Retry-After date already past means "now" to everyone who got it: spread them out.
PAST_RETRY_AFTER_SECONDS = (1.0, 3.0)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    path: str  # already confined by pinterest.paths.confine
    query: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds, from either its delta-seconds or HTTP-date form.

    A date in the past is a short jittered delay, not zero: every client that got it
    would otherwise come back at the same instant.
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if (delta := ascii_int(value)) is not None:
        return float(delta)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a year of 30 digits overflows
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - datetime.now(UTC)).total_seconds()
    return seconds if seconds > 0 else random.uniform(*PAST_RETRY_AFTER_SECONDS)


class RateLimitListener(Protocol):
    """Told of every answer in which Pinterest may be asking a connection to wait."""

    def pinterest_asked_to_wait(
        self,
        connection: Connection,
        request: UpstreamRequest,
        status: int,
        retry_after: float | None,
    ) -> None: ...


class PinterestClient:
    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        rate_limits: RateLimitListener | None = None,
    ) -> None:
        self._metrics = metrics
        self._rate_limits = rate_limits
        # The shared client's own transport (same connection pool), driven directly:
        # proxied calls want none of AsyncClient's per-request features (auth flows,
        # redirects, cookies, hooks are all off for Pinterest), and skipping them
        # halves the client-side cost of a call (see bench/ and the README).
        self._transport = transport
        self._timeout = http_timeout(settings).as_dict()
        self._base = settings.api_url + "/"
        self._max_retries = settings.max_retries
        self._budget = settings.retry_budget_seconds

    def url_for(self, request: UpstreamRequest) -> httpx.URL:
        # Plain concatenation is safe: the path is confined to unreserved characters and
        # the raw query cannot reach past the "?". (httpx's copy_with re-parses twice.)
        url = self._base + request.path
        if request.query:
            url += "?" + request.query.decode("latin-1")
        return httpx.URL(url)

    async def send(
        self, request: UpstreamRequest, access_token: str, connection: Connection | None = None
    ) -> httpx.Response:
        """Send once, retrying idempotent methods on transient failures within the budget.

        Under a 429 at most one retry, and only after the Retry-After Pinterest gave, if it
        fits the budget: a rate limit is not transient, and every retry counts against it.
        The rate-limit listener hears of each 429 and 503 as it arrives, before any wait,
        so that other calls for `connection` hold back meanwhile.
        """
        url = self.url_for(request)
        headers = [
            *request.headers,
            ("Authorization", f"Bearer {access_token}"),
            ("User-Agent", USER_AGENT),
            ("Accept-Encoding", "gzip, deflate"),
        ]
        retryable = request.method in IDEMPOTENT_METHODS
        deadline = time.monotonic() + self._budget
        attempt = 0
        retried_429 = False
        while True:
            started = time.perf_counter()
            try:
                response = await self._send_once(request.method, url, headers, request.body)
            except httpx.TimeoutException as e:
                raise UpstreamTimeout() from e
            except RETRYABLE_ERRORS as e:
                if retryable and await self._wait_before_retry(attempt, None, deadline):
                    attempt += 1
                    continue
                raise UpstreamError("Pinterest could not be reached.") from e
            except httpx.TransportError as e:
                raise UpstreamError("Pinterest could not be reached.") from e
            finally:
                if self._metrics is not None:
                    self._metrics.observe_upstream(request.path, time.perf_counter() - started)
            status = response.status_code
            if status not in RETRYABLE_STATUSES:
                return response
            retry_after = retry_after_seconds(response)
            if status in WAIT_STATUSES and connection is not None and self._rate_limits is not None:
                self._rate_limits.pinterest_asked_to_wait(connection, request, status, retry_after)
            if status == 429:
                if retried_429 or retry_after is None:
                    return response
                retried_429 = True
            if retryable and await self._wait_before_retry(attempt, retry_after, deadline):
                attempt += 1
                continue
            return response

    async def _send_once(
        self, method: str, url: httpx.URL, headers: list[tuple[str, str]], body: bytes
    ) -> httpx.Response:
        outgoing = httpx.Request(
            method,
            url,
            headers=headers,
            content=body or None,
            extensions={"timeout": self._timeout},
        )
        response = await self._transport.handle_async_request(outgoing)
        try:
            await response.aread()
        finally:
            await response.aclose()
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
        await asyncio.sleep(delay)
        return True
