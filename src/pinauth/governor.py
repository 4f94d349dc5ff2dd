"""The rate governor: when Pinterest asks a connection to wait, pinauth waits for it.

Pinterest limits each user's calls per rate-limit category (the `x-ratelimit-category`
of every operation in its spec). When it answers a proxied call with 429, or with 503
and a `Retry-After`, further calls for that connection in that category are answered
here, with a 429 in Pinterest's own error shape and the remaining `Retry-After`, until
the time has passed; Pinterest never sees them. Other categories and other connections
go on as before.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import httpx
from cachetools import LRUCache

from pinauth.cache import MAX_ENTRIES
from pinauth.models import Connection
from pinauth.observability import Metrics
from pinauth.pinterest.client import UpstreamRequest
from pinauth.pinterest.endpoints import CATEGORIES, OTHER, rate_limit_category

log = logging.getLogger(__name__)

# Pinterest's error code for "This request exceeded a rate limit" (its spec's 429 examples).
RATE_LIMIT_CODE = 8
# A 429 without Retry-After (Pinterest often omits it). Its limits count per minute, so a
# window ends within 60 s; waiting 10 s costs a limited scope at most six upstream calls a
# minute, and a user whose window has reset waits no more than 10 s for it.
DEFAULT_WAIT_SECONDS = 10.0
# Beyond this a hold is renewed by one upstream call rather than trusted: it bounds what a
# mistaken Retry-After can cost, and how long an entry has to stay in memory.
MAX_WAIT_SECONDS = 3600.0

ScopeKey = str


def scope_key(connection: Connection) -> ScopeKey:
    """What a hold is remembered by: the connection's public id, which is never reused,
    so no other connection can come to inherit a hold."""
    return connection.public_id


def _no_holds() -> LRUCache[ScopeKey, dict[str, float]]:
    # Per connection, and connections are unbounded: the least recently used go first.
    return LRUCache(MAX_ENTRIES)


def _body(category: str) -> bytes:
    message = (
        "This request exceeded a rate limit. Pinterest asked this account to wait "
        f"before more calls in the {category} category; retry after the time in Retry-After."
    )
    return json.dumps({"code": RATE_LIMIT_CODE, "message": message}).encode()


class RateGovernor:
    """Remembers Pinterest's "wait" per (connection, rate-limit category).

    `held` sits on every proxied call's path: past the last hold it costs one clock
    read, otherwise one dict lookup for the connection; only a connection that has a
    hold pays for working out its call's category. Memory is bounded: at most
    `MAX_ENTRIES` connections (least recently used go first), each with at most one
    entry per category, and everything is dropped once the last hold has ended.
    """

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._holds = _no_holds()
        # Every hold ends by then; before it nothing is held and nothing is looked up.
        self._horizon = -math.inf
        categories = (*sorted(CATEGORIES), OTHER)
        self._bodies = {category: _body(category) for category in categories}
        self._governed = {c: metrics.governed_calls.labels(c) for c in categories}
        self._asked = {
            (c, status): metrics.upstream_rate_limits.labels(c, str(status))
            for c in categories
            for status in (429, 503)
        }

    def remembered_connections(self) -> int:
        """How many connections have an entry (some of which may have ended)."""
        return len(self._holds)

    def held(self, connection: Connection, request: UpstreamRequest) -> httpx.Response | None:
        """Pinterest's 429 for `request` if its scope is on hold, else None (call Pinterest)."""
        now = self._clock()
        if now >= self._horizon:
            return None
        holds = self._holds.get(scope_key(connection))
        if holds is None:
            return None
        category = rate_limit_category(request.method, request.path)
        until = holds.get(category)
        if until is None or until <= now:
            return None
        self._governed[category].inc()
        return httpx.Response(
            429,
            headers=(
                ("content-type", "application/json"),
                ("retry-after", str(math.ceil(until - now))),
            ),
            content=self._bodies[category],
        )

    def pinterest_asked_to_wait(
        self,
        connection: Connection,
        request: UpstreamRequest,
        status: int,
        retry_after: float | None,
    ) -> None:
        """Note Pinterest's 429 or 503 to `request`: hold its scope for as long as it asked.

        A 503 without Retry-After says nothing about when to come back, so it holds
        nothing; a 429 without one holds for `DEFAULT_WAIT_SECONDS`.
        """
        if status == 429:
            seconds = DEFAULT_WAIT_SECONDS if retry_after is None else retry_after
        elif status == 503 and retry_after is not None:
            seconds = retry_after
        else:
            return
        category = rate_limit_category(request.method, request.path)
        self._asked[category, status].inc()
        now = self._clock()
        until = now + min(seconds, MAX_WAIT_SECONDS)
        if until <= now:
            return  # "Retry-After: 0": go ahead
        if now >= self._horizon:
            # Every earlier hold has ended: start afresh rather than keep dead entries.
            self._holds = _no_holds()
        key = scope_key(connection)
        holds = self._holds.get(key)
        if holds is None:
            holds = self._holds[key] = {}
        # Answers to calls sent concurrently can arrive out of order: keep the later end.
        if until > holds.get(category, -math.inf):
            holds[category] = until
        self._horizon = max(self._horizon, until)
        log.info(
            "Pinterest answered %s to connection %s's %s call: holding %s calls for %.0f s",
            status,
            connection.public_id,  # never the row id: logs name connections as the API does
            request.method,
            category,
            until - now,
        )
