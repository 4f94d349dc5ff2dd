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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy.event
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

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
from pinauth.observability import Metrics, about_connection
from pinauth.repository import ConnectionRepository, WebhookEventRepository
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
    id in commit order. `connection` must be attached to `session` (or fully loaded), and
    its row must still exist: record a deletion before deleting. The
    body is the /v1 connection object, `next_refresh_at` from `schedule`
    (PINAUTH_KEEPALIVE_DAYS) as the API shows it: never a token.

    `sequence` is the connection's count of events, this one included: the UPDATE that
    increments it takes the row lock (if the change has not already), so two replicas
    recording for one connection at once number their events one after the other, in
    commit order, and the event ids follow the same order.
    """
    event_type = EventType(event_type)
    state = inspect(connection)
    sequence = await ConnectionRepository(session).next_webhook_sequence(connection.id)
    if sequence is None:
        raise RuntimeError(
            "record a connection's event while its row exists (a deletion before the delete)"
        )
    if state.persistent and _SHOWN & (state.unloaded | state.expired_attributes):
        await session.refresh(connection)
    created_at = (now or datetime.now(UTC)).astimezone(UTC)
    public_id = new_event_id()
    body = {
        "id": public_id,
        "type": event_type.value,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "sequence": sequence,
        "data": {
            "connection": ConnectionObject.of(
                connection,
                next_refresh_at=None if schedule is None else schedule.next_refresh_at(connection),
            ).model_dump(mode="json")
        },
    }
    session.info[_RECORDED] = True  # wakes this process's dispatcher after the commit
    return await WebhookEventRepository(session).add(
        WebhookEvent(
            public_id=public_id,
            type=event_type.value,
            connection_id=connection.public_id,
            sequence=sequence,
            body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
            created_at=created_at,
            next_attempt_at=created_at,
            retry_until=created_at + RETRY_WINDOW,
            attempts=0,
        )
    )


# This process's running dispatchers, woken when a transaction that recorded an event
# commits, so an event goes out at once rather than at the next poll.
_running: weakref.WeakSet[WebhookDispatcher] = weakref.WeakSet()
_RECORDED = "pinauth.webhook_event_recorded"


@sqlalchemy.event.listens_for(Session, "after_commit")
def _wake_dispatchers(session: Session) -> None:
    if session.info.pop(_RECORDED, False):
        for dispatcher in list(_running):
            dispatcher.wake()


@sqlalchemy.event.listens_for(Session, "after_soft_rollback")
def _forget_recorded(session: Session, _previous: object) -> None:
    session.info.pop(_RECORDED, None)


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

# Every answer but a 2xx, and no answer at all, is retried on this schedule: a receiver
# moved behind a new redirect, or answering 404 for a minute of its deploy, is a receiver
# that is down, not a verdict on the event (redirects are still never followed).
RETRY_WINDOW = timedelta(hours=24)
BACKOFF_FIRST_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 3600.0
# How often a dispatcher looks for events recorded by other processes (or due for a
# retry); this process's own commits and finished deliveries wake it at once.
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


def create_webhook_client(settings: Settings) -> httpx.AsyncClient:
    """The dispatcher's one HTTP client: its own pool, apart from Pinterest's, so a slow
    receiver can never hold the connections the request path needs."""
    timeout = settings.webhook_timeout_seconds
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(
            max_connections=settings.webhook_concurrency,
            max_keepalive_connections=settings.webhook_concurrency,
        ),
        follow_redirects=False,
        headers={"User-Agent": f"pinauth-webhooks/{__version__}"},
    )


class WebhookDispatcher:
    """Delivers the outbox to PINAUTH_WEBHOOK_URL, at least once, from every replica.

    Each delivery is a task of its own, at most PINAUTH_WEBHOOK_CONCURRENCY at once: it
    is claimed (a committed lease, like the refresh lease: no transaction is open while
    a receiver answers), POSTed, and its attempt recorded; the moment one ends, its slot
    takes the next due event, so a receiver slow for one connection holds one slot and
    nobody else's events. A process killed mid-delivery leaves a lease that runs out;
    the event then goes again, from whichever replica comes first.
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
        self._concurrency = settings.webhook_concurrency
        self._sessionmaker = sessionmaker
        self._http = http
        self._clock = clock
        self._jitter = jitter
        self._poll_interval = poll_interval
        # Longer than any attempt can take (it is cut off at the timeout), plus the write
        # of its outcome. A dead holder's events wait this long to go again.
        self._lease = timedelta(seconds=self._timeout + LEASE_MARGIN_SECONDS)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        # Set when a delivery ends, when this process commits an event, and on stop.
        self._wake = asyncio.Event()
        # Set after every claim: what tests wait on instead of sleeping.
        self.passes = 0
        self.pass_done = asyncio.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _running.add(self)
        self._task = asyncio.create_task(self._run(), name="webhook dispatcher")

    async def stop(self) -> None:
        _running.discard(self)
        if self._task is None:
            return
        self._stopping.set()
        self._wake.set()
        # Attempts in flight are bounded by the timeout; cut them short and their leases
        # run out, so their events go again: at least once, never lost.
        try:
            async with asyncio.timeout(self._timeout + 5):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        """Look for due events now (thread-safe: called after a commit of this process)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                # Cleared before the claim: a delivery ending or an event committed while
                # it runs sets it again, and the wait below returns at once.
                self._wake.clear()
                free = self._concurrency - len(self._in_flight)
                if free > 0:
                    try:
                        self._start(await self._claim(free))
                    except Exception as e:  # a database outage: try again at the next poll
                        log.warning("webhook dispatch pass failed: %s", type(e).__name__)
                # Fewer than `free` claimed means nothing else is due; all slots busy means
                # waiting for one to end. Either way: until woken, or the next poll.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()
            if self._in_flight:
                await asyncio.wait(self._in_flight)
        finally:
            for task in self._in_flight:  # only when cancelled: cut short, leases run out
                task.cancel()

    def _start(self, claimed: tuple[str, list[WebhookEvent]]) -> None:
        owner, events = claimed
        for event in events:
            task = asyncio.create_task(self._deliver_logged(event, owner), name="webhook delivery")
            self._in_flight.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free, and the connection's next event may be due

    async def _claim(self, limit: int) -> tuple[str, list[WebhookEvent]]:
        """Lease up to `limit` due events (each the oldest undelivered of its connection)."""
        try:
            now = self._clock()
            owner = secrets.token_hex(16)
            async with self._sessionmaker() as db, db.begin():
                events = await WebhookEventRepository(db).claim_due(
                    now, owner, now + self._lease, limit
                )
            return owner, events
        finally:
            self.passes += 1
            self.pass_done.set()

    async def run_once(self) -> int:
        """Claim what is due (up to PINAUTH_WEBHOOK_CONCURRENCY), deliver it, record it,
        and return how many were attempted: one step, for tests and tools."""
        owner, events = await self._claim(self._concurrency)
        await asyncio.gather(*(self._deliver_logged(event, owner) for event in events))
        return len(events)

    async def _deliver_logged(self, event: WebhookEvent, owner: str) -> None:
        with about_connection(event.connection_id):
            try:
                await self._deliver(event, owner)
            except Exception as e:
                # Its lease runs out and the event goes again: at least once.
                log.warning("recording a webhook delivery failed: %r", e)

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
            "webhook %s %s (%s of connection %s, attempt %d): %s",
            event.public_id,
            verdict,
            event.type,
            event.connection_id,
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
        if next_at <= event.retry_until:
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
                    location = r.headers.get("location")
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
        error = f"HTTP {code}"
        if 300 <= code < 400 and location:
            # What the operator needs to fix PINAUTH_WEBHOOK_URL; never followed.
            error += f" to {location} (redirects are not followed)"
        return Outcome(code, error[:_ERROR_LENGTH], retry_after)


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

    async def redeliver_failed(self, since: datetime | None = None) -> tuple[int, int]:
        """Send every failed event (created at or after `since`) again, each with a new
        retry window, in order per connection; how many events, of how many connections."""
        now = self._clock()
        async with self._sessionmaker() as db, db.begin():
            return await WebhookEventRepository(db).redeliver_failed(since, now, now + RETRY_WINDOW)
