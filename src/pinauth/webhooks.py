"""Lifecycle webhooks: a durable outbox, signed deliveries, and verification for receivers.

An event is a row written in the same transaction as the change it reports (`record_event`),
so a change is never committed without its event, nor an event without its change. A
dispatcher in each `pinauth serve` process delivers the outbox afterwards, at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth import __version__
from pinauth.api.schemas import ConnectionObject
from pinauth.crypto import CursorCodec, cursor_binding
from pinauth.errors import InvalidCursor, WebhookEventNotFound
from pinauth.models import (
    Connection,
    WebhookAttempt,
    WebhookEvent,
    WebhookEventStatus,
    new_event_id,
)
from pinauth.numbers import ascii_int
from pinauth.observability import Metrics
from pinauth.repository import WebhookEventRepository
from pinauth.schedule import Schedule
from pinauth.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Pinauth-Signature"
EVENT_ID_HEADER = "Pinauth-Event-Id"


class EventType(enum.StrEnum):
    CREATED = "connection.created"
    UPDATED = "connection.updated"
    REAUTHORIZATION_REQUIRED = "connection.reauthorization_required"
    RECOVERED = "connection.recovered"
    DELETED = "connection.deleted"
    EXPIRING = "connection.expiring"


# What the connection object is built from; a row fresh from an INSERT or UPDATE has some
# of them expired (server defaults, onupdate) and they are read back in the transaction.
_SHOWN = (frozenset(ConnectionObject.model_fields) - {"id"}) | {"public_id"}


async def record_event(
    session: AsyncSession,
    event_type: EventType | str,
    connection: Connection,
    *,
    schedule: Schedule | None = None,
    now: datetime | None = None,
) -> WebhookEvent:
    """Add an outbox row reporting `event_type` for `connection`, in the caller's transaction.

    Call it after the change is flushed, in the same transaction, and let the caller commit:
    on PostgreSQL the row lock of the change then orders the events of one connection by
    id in commit order. `connection` must be attached to `session` (or deleted in it, or
    fully loaded). The body is the /v1 connection object, `next_refresh_at` from
    `schedule` (PINAUTH_KEEPALIVE_DAYS) as the API shows it: never a token.
    """
    event_type = EventType(event_type)
    state = inspect(connection)
    if state.persistent and _SHOWN & (state.unloaded | state.expired_attributes):
        await session.refresh(connection)
    created_at = (now or datetime.now(UTC)).astimezone(UTC)
    public_id = new_event_id()
    body = {
        "id": public_id,
        "type": event_type.value,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "data": {
            "connection": ConnectionObject.of(
                connection,
                next_refresh_at=None if schedule is None else schedule.next_refresh_at(connection),
            ).model_dump(mode="json")
        },
    }
    return await WebhookEventRepository(session).add(
        WebhookEvent(
            public_id=public_id,
            type=event_type.value,
            connection_id=connection.public_id,
            body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
            created_at=created_at,
            next_attempt_at=created_at,
            retry_until=created_at + RETRY_WINDOW,
            attempts=0,
        )
    )


# --- signing ----------------------------------------------------------------------


def sign(body: bytes, secrets: Sequence[str], timestamp: int) -> str:
    """The Pinauth-Signature header: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, one
    v1 per secret, the signing secret first."""
    signed = str(timestamp).encode() + b"." + body
    macs = (hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets)
    return ",".join([f"t={timestamp}", *(f"v1={mac}" for mac in macs)])


def verify(
    body: bytes | str,
    header: str | None,
    secrets: Sequence[str | bytes] | str | bytes,
    tolerance: int = 300,
    *,
    now: float | None = None,
) -> bool:
    """For receivers: True if `header` (Pinauth-Signature) signs `body` (the raw request
    body, exactly as received) with one of `secrets`, within `tolerance` seconds of now.
    A secret is a str, or its UTF-8 bytes.

    Any v1 may match any secret, so both sides can rotate secrets one at a time. The
    timestamp check bounds how long a captured request can be replayed; receivers that
    must never act twice also remember Pinauth-Event-Id (delivery is at least once).
    """
    if not header:
        return False
    if isinstance(body, str):
        body = body.encode()
    if isinstance(secrets, str | bytes):
        secrets = [secrets]
    keys: list[bytes] = []
    for s in secrets:
        if not isinstance(s, str | bytes):
            raise TypeError(f"a webhook secret is a str (or bytes), not {type(s).__name__}")
        # An empty secret (a trailing comma split off "a,b,") would let anyone sign: an
        # HMAC key everyone knows. It never verifies anything.
        if s:
            keys.append(s.encode() if isinstance(s, str) else s)
    if not keys:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    # In integers: a float of a 400-digit timestamp overflows.
    if abs(int(time.time() if now is None else now) - timestamp) > tolerance:
        return False
    signed = str(timestamp).encode() + b"." + body
    expected = [hmac.new(key, signed, hashlib.sha256).hexdigest().encode() for key in keys]
    # Every comparison runs, so the time taken does not say which secret matched. In
    # bytes: compare_digest refuses str with non-ASCII characters (a TypeError), and a
    # header may hold anything.
    matched = False
    for candidate in candidates:
        given = candidate.encode("utf-8", "surrogatepass")
        for mac in expected:
            matched |= hmac.compare_digest(given, mac)
    return matched


# --- delivery ---------------------------------------------------------------------

# What a delivery is retried on: the receiver is down, slow, or asks for time.
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
RETRY_WINDOW = timedelta(hours=24)
BACKOFF_FIRST_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 3600.0
# Events leased per pass, delivered concurrently: bounded, so a pass is bounded too.
BATCH_SIZE = 8
POLL_INTERVAL_SECONDS = 1.0
# The longest a receiver's Retry-After is believed (beyond it, the retry window decides).
MAX_RETRY_AFTER_SECONDS = 6 * 3600
_ERROR_LENGTH = 255
LEASE_MARGIN_SECONDS = 5.0
BACKOFF_MAX = timedelta(seconds=BACKOFF_MAX_SECONDS)


def utc_now() -> datetime:
    return datetime.now(UTC)


def backoff(attempt: int, jitter: float) -> float:
    """Seconds before retry number `attempt` (1-based): doubling, capped, jittered to
    between half and all of it so receivers that failed together are not hit together."""
    delay: float = min(BACKOFF_FIRST_SECONDS * 2.0 ** min(attempt - 1, 30), BACKOFF_MAX_SECONDS)
    return delay * (0.5 + jitter / 2)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if (seconds := ascii_int(value)) is not None:
        return float(min(seconds, MAX_RETRY_AFTER_SECONDS))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a year of 30 digits overflows
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER_SECONDS)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to."""

    response_code: int | None
    error: str | None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.response_code is not None and 200 <= self.response_code < 300

    @property
    def retryable(self) -> bool:
        return self.response_code is None or self.response_code in RETRYABLE_STATUSES


def create_webhook_client(settings: Settings) -> httpx.AsyncClient:
    """The dispatcher's one HTTP client: its own pool, apart from Pinterest's, so a slow
    receiver can never hold the connections the request path needs."""
    timeout = settings.webhook_timeout_seconds
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=BATCH_SIZE, max_keepalive_connections=BATCH_SIZE),
        follow_redirects=False,
        headers={"User-Agent": f"pinauth-webhooks/{__version__}"},
    )


class WebhookDispatcher:
    """Delivers the outbox to PINAUTH_WEBHOOK_URL, at least once, from every replica.

    Each pass leases due events (a committed lease, like the refresh lease: no
    transaction is open while a receiver answers), POSTs them, and records each attempt.
    A process killed mid-delivery leaves a lease that runs out; the event then goes
    again, from whichever replica comes first.
    """

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], datetime] = utc_now,
        jitter: Callable[[], float] = random.random,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._url = settings.webhook_url
        self._secrets = [s.get_secret_value() for s in settings.webhook_secrets]
        self._timeout = settings.webhook_timeout_seconds
        self._sessionmaker = sessionmaker
        self._http = http
        self._clock = clock
        self._jitter = jitter
        self._poll_interval = poll_interval
        # Longer than any attempt can take (it is cut off at the timeout), plus the write
        # of its outcome. A dead holder's events wait this long to go again.
        self._lease = timedelta(seconds=self._timeout + LEASE_MARGIN_SECONDS)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        # Set after every pass: what tests wait on instead of sleeping.
        self.passes = 0
        self.pass_done = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook dispatcher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping.set()
        self._wake.set()
        # An attempt in flight is bounded by the timeout; cut it short and its lease
        # runs out, so the event goes again: at least once, never lost.
        try:
            async with asyncio.timeout(self._timeout + 5):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                delivered = await self.run_once()
            except Exception as e:  # a database outage: try again at the next poll
                log.warning("webhook dispatch pass failed: %s", type(e).__name__)
                delivered = 0
            if delivered:
                continue  # there may be more, and each connection's next is due now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def run_once(self) -> int:
        """One pass: lease what is due, deliver it, record it. How many were attempted."""
        try:
            now = self._clock()
            owner = secrets.token_hex(16)
            async with self._sessionmaker() as db, db.begin():
                events = await WebhookEventRepository(db).claim_due(
                    now, owner, now + self._lease, BATCH_SIZE
                )
            if events:
                outcomes = await asyncio.gather(
                    *(self._deliver(event, owner) for event in events), return_exceptions=True
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        # Its lease runs out and the event goes again: at least once.
                        log.warning("recording a webhook delivery failed: %r", outcome)
            return len(events)
        finally:
            self.passes += 1
            self.pass_done.set()

    async def _deliver(self, event: WebhookEvent, owner: str) -> None:
        attempted_at = self._clock()
        started = time.monotonic()
        outcome = await self._post(event, attempted_at)
        duration_ms = int((time.monotonic() - started) * 1000)
        attempt_number = event.attempts + 1
        try:
            verdict, values = self._verdict(event, outcome, attempted_at, attempt_number)
        except Exception as e:
            # Unrecorded, the event would be leased again at once, for ever, with no
            # backoff and no cut-off, and its connection's later events behind it.
            log.exception("deciding a webhook delivery's outcome failed: %s", type(e).__name__)
            verdict, values = "retry", {"next_attempt_at": attempted_at + BACKOFF_MAX}
            if values["next_attempt_at"] > event.retry_until:
                verdict, values = "failed", {"status": WebhookEventStatus.FAILED}
            values["last_error"] = outcome.error
        if self._metrics is not None:
            self._metrics.webhook_deliveries.labels(verdict).inc()
        log.log(
            logging.INFO if outcome.delivered else logging.WARNING,
            "webhook %s %s (%s, attempt %d): %s",
            event.public_id,
            verdict,
            event.type,
            attempt_number,
            outcome.response_code or outcome.error,
        )
        async with self._sessionmaker() as db, db.begin():
            await WebhookEventRepository(db).finish_attempt(
                event.id,
                owner,
                values,
                WebhookAttempt(
                    event_id=event.id,
                    attempted_at=attempted_at,
                    duration_ms=duration_ms,
                    response_code=outcome.response_code,
                    outcome=verdict,
                    error=outcome.error,
                ),
            )

    def _verdict(
        self, event: WebhookEvent, outcome: Outcome, attempted_at: datetime, attempt_number: int
    ) -> tuple[str, dict[str, Any]]:
        """What the attempt came to, and the event's columns that record it."""
        values: dict[str, Any]
        if outcome.delivered:
            return "delivered", {
                "status": WebhookEventStatus.DELIVERED,
                "delivered_at": attempted_at,
            }
        delay = backoff(attempt_number, self._jitter())
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        next_at = attempted_at + timedelta(seconds=delay)
        if outcome.retryable and next_at <= event.retry_until:
            verdict, values = "retry", {"next_attempt_at": next_at}
        else:
            verdict, values = "failed", {"status": WebhookEventStatus.FAILED}
        values["last_error"] = outcome.error
        return verdict, values

    async def _post(self, event: WebhookEvent, now: datetime) -> Outcome:
        body = event.body.encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event.public_id,
            SIGNATURE_HEADER: sign(body, self._secrets, int(now.timestamp())),
        }
        try:
            # Absolute: httpx's read timeout is per read, and a receiver trickling bytes
            # would otherwise hold the attempt open for ever.
            async with asyncio.timeout(self._timeout):
                # Streamed and never read: only the status line and headers are needed,
                # so a receiver answering with a huge body costs no memory.
                async with self._http.stream("POST", self._url, content=body, headers=headers) as r:
                    code = r.status_code
                    retry_after_header = r.headers.get("retry-after")
        except TimeoutError:
            return Outcome(None, f"no answer within {self._timeout:g} s")
        except httpx.TimeoutException:
            return Outcome(None, f"no answer within {self._timeout:g} s")
        except httpx.HTTPError as e:
            return Outcome(None, f"{type(e).__name__}: {e}"[:_ERROR_LENGTH])
        if 200 <= code < 300:
            return Outcome(code, None)
        retry_after = None
        if code in (429, 503):
            try:
                retry_after = retry_after_seconds(retry_after_header, now)
            except Exception as e:
                # The receiver's Retry-After, whatever it holds, is a hint: without it the
                # attempt is still recorded and backs off as usual.
                log.warning("unusable Retry-After from the webhook receiver: %r", e)
        return Outcome(code, f"HTTP {code}", retry_after)


# --- the events, for the CLI and the API -------------------------------------------

# "evt_" and 26 base32 characters (models.new_event_id); looser in length, as the client
# is for connection ids, and within the column's 40.
_EVENT_ID = re.compile(r"evt_[a-z0-9]{1,36}")


def looks_like_event_id(value: str) -> bool:
    """Whether `value` can be an event's id: checked before a query, so that bytes no
    database column can hold are refused in words, not with a driver's error."""
    return _EVENT_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class EventDetail:
    event: WebhookEvent
    attempts: list[WebhookAttempt]


class WebhookEvents:
    """Reading the outbox and asking for redelivery: what the CLI and /v1 share."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cursors: CursorCodec | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._sessionmaker = sessionmaker
        # Cursors carry a database key, encrypted, as the connections API's do.
        self._cursors = cursors
        self._clock = clock

    async def page(
        self, *, limit: int, cursor: str | None = None, status: WebhookEventStatus | None = None
    ) -> tuple[list[WebhookEvent], str | None]:
        """Newest first, and the cursor of the next page (None on the last page)."""
        binding = cursor_binding("webhook-events", status=None if status is None else status.value)
        before = None
        if cursor is not None:
            before = None if self._cursors is None else self._cursors.loads(cursor, binding)
            if before is None:
                raise InvalidCursor()
        async with self._sessionmaker() as db:
            rows = await WebhookEventRepository(db).page(
                limit=limit + 1, before=before, status=status
            )
        if len(rows) > limit and self._cursors is not None:
            return rows[:limit], self._cursors.dumps(rows[limit - 1].id, binding)
        return rows[:limit], None

    async def get(self, public_id: str) -> EventDetail:
        async with self._sessionmaker() as db:
            repository = WebhookEventRepository(db)
            event = await repository.get(public_id)
            if event is None:
                raise WebhookEventNotFound()
            return EventDetail(event, await repository.attempts(event.id))

    async def redeliver(self, public_id: str) -> EventDetail:
        """Send the event again (delivered or failed), at once and with a new retry window."""
        now = self._clock()
        async with self._sessionmaker() as db, db.begin():
            if not await WebhookEventRepository(db).redeliver(public_id, now, now + RETRY_WINDOW):
                raise WebhookEventNotFound()
        return await self.get(public_id)
