"""Keeps each connection's tokens fresh: one refresh at a time, even across processes,
and no token Pinterest sent is ever dropped.

Pinterest rotates the refresh token on every refresh and kills the old one, so two
refreshes racing with the same refresh token, or a refresh whose answer is not stored,
log the user out for good. Hence:

- Within a process, concurrent callers share one refresh task per connection.
- Across processes, a refresh lease on the row is claimed by a compare-and-swap UPDATE
  and committed before the call. No transaction or
  connection is held while Pinterest answers: a cancelled request, a dead pool or a
  failed commit cannot roll the answer back with it, and a waiting process polls the row
  instead of queueing on a lock. The lease is short (PINAUTH_REFRESH_LEASE, 15 s) and its
  holder renews it every third of it while the token call is in flight, so a live holder
  keeps it for as long as the call takes and a dead one (kill -9) frees it within one
  lease.
- The task is owned by the TokenManager, not the request (callers wait through
  `asyncio.shield`), and shutdown waits for it.
- The answer is written with a compare-and-swap on the version the refresh started from.
  If the database will not take it, the process keeps and serves the new tokens and
  retries the write until it lands.

What no code can close: the process dies (kill -9) after Pinterest rotated the token and
before the write. The lease then runs out, the next refresh spends the dead refresh
token, Pinterest rejects it, and the connection asks for a new login (401 with
login_url); meanwhile callers get 503 with Retry-After. The keeper does not wait for a
call to find this out: it tries the stored refresh token of every connection whose lease
ran out with no result stored (keeper.py, `resolve_dead_leases`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from cachetools import LRUCache
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from pinauth.cache import MAX_ENTRIES, ConnectionCache
from pinauth.clientstate import ClientCredentials
from pinauth.crypto import TokenCipher, TokenDecryptionError
from pinauth.errors import (
    DatabaseUnavailable,
    NotAuthenticated,
    PinterestClientRejected,
    ReauthorizationRequired,
    UndecryptableToken,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from pinauth.models import Connection, ConnectionStatus
from pinauth.observability import Metrics, about_connection
from pinauth.pinterest.oauth import PinterestOAuth, TokenRejected, TokenSet
from pinauth.repository import ConnectionRepository
from pinauth.schedule import Schedule
from pinauth.settings import Settings
from pinauth.webhooks import EventType, record_event

log = logging.getLogger(__name__)

# Seconds to wait before calling a failing token endpoint again for the same connection,
# at least: longer if Pinterest's Retry-After asks for longer.
TRANSIENT_FAILURE_COOLDOWN = 10
# PostgreSQL's "lock_not_available", raised when lock_timeout runs out.
LOCK_NOT_AVAILABLE = "55P03"
# What a database that is down, restarting or unreachable raises; anything else is a bug
# that retrying would only repeat.
# What a failed write of new tokens looks like: the engine turns a lost or refused
# database into DatabaseUnavailable (see outage.py); anything else the driver raises
# (a trigger, a constraint) still means the tokens are not stored.
DATABASE_DOWN = (DatabaseUnavailable, DBAPIError, OSError)
# The longest token call is waited for this much longer at shutdown: the write of its
# answer.
LEASE_MARGIN_SECONDS = 5.0
# A lease is renewed this many times per lease length while its token call is in flight:
# two renewals can fail (a database hiccup) before it runs out under a live holder.
LEASE_RENEWALS_PER_LEASE = 3
# Polling another process's lease: first pause and the longest one.
LEASE_POLL_FIRST = 0.02
LEASE_POLL_MAX = 0.5
# Attempts at a token issued after a rejection: each either refreshes or finds the row
# moved on; two reach a fresh token unless the row keeps changing under the caller.
REPLACEMENT_STEPS = 3
# Retrying the write of tokens the database would not take.
WRITE_RETRY_FIRST = 0.25
WRITE_RETRY_MAX = 5.0


def apply_token_set(connection: Connection, tokens: TokenSet, cipher: TokenCipher) -> None:
    """Write a token pair onto the row; the caller commits both halves together."""
    connection.access_token_encrypted = cipher.encrypt(tokens.access_token)
    connection.access_token_expires_at = tokens.access_token_expires_at
    # Pinterest rotates the refresh token; keep the old one only if none came back.
    if tokens.refresh_token is not None:
        connection.refresh_token_encrypted = cipher.encrypt(tokens.refresh_token)
    if tokens.refresh_token_expires_at is not None:
        connection.refresh_token_expires_at = tokens.refresh_token_expires_at
    if tokens.scopes is not None:
        connection.scopes = ",".join(tokens.scopes)
    connection.status = ConnectionStatus.ACTIVE
    connection.last_refreshed_at = datetime.now(UTC)


class _StillRefused(Exception):
    """A recheck's refresh grant refused again: nothing to change (the connection is
    marked and reported already). Control flow between `_refresh_once` and `recheck`, so
    that no route's refresh can surface a refused grant as an answer of its own."""


class RecheckOutcome(enum.StrEnum):
    """What `TokenManager.recheck` found."""

    RECOVERED = "recovered"
    STILL_REJECTED = "still rejected"
    NOT_MARKED = "not reauthorization_required"
    CHANGED = "changed meanwhile"
    BUSY = "busy: another refresh of it is under way, run this again"


@dataclass(frozen=True, slots=True)
class Credential:
    """An access token ready to send, and the row version it came from."""

    connection: Connection
    access_token: str

    def __repr__(self) -> str:
        connection = self.connection
        return f"Credential(connection={connection.public_id}, version={connection.version})"


class TokenManager:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        oauth: PinterestOAuth,
        cipher: TokenCipher,
        cache: ConnectionCache,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._metrics = metrics
        # What times the cooldown after a failed token call (tests move it instead of waiting).
        self._clock = clock
        # Whether Pinterest accepts the app's own credentials (see clientstate.py).
        self.client_credentials = ClientCredentials(clock)
        # What stamps leases, and what paces their renewal (tests drive both).
        self._wall = wall_clock or _utc_now
        self._sleep = sleep
        self._settings = settings
        self._schedule = Schedule.of(settings)
        self._sessionmaker = sessionmaker
        self._oauth = oauth
        self._cipher = cipher
        self._cache = cache
        self._margin = timedelta(seconds=settings.refresh_margin_seconds)
        # The longest a token call can take: every phase of the request at its timeout.
        self._call_budget = (
            settings.http_pool_timeout
            + settings.http_connect_timeout
            + 2 * settings.http_read_timeout  # the write timeout is the read timeout
        )
        # Shutdown waits this long for token calls in flight and unsaved tokens' writes.
        self._longest_call = self._call_budget + LEASE_MARGIN_SECONDS
        self._lease = timedelta(seconds=settings.refresh_lease_seconds)
        # All keyed by public id, which is never reused.
        # The refresh in flight per connection; an entry lives only while its task runs.
        self._in_flight: dict[str, asyncio.Task[tuple[Connection, bool]]] = {}
        # Rows with tokens the database has not taken yet, and the tasks retrying them.
        self._unsaved: dict[str, Connection] = {}
        self._writers: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        # Bounded: both are per connection, and connections are unbounded.
        self._cooldown_until: LRUCache[str, float] = LRUCache(MAX_ENTRIES)
        # How long the access tokens this process last got for a connection were valid.
        self._lifetimes: LRUCache[str, timedelta] = LRUCache(MAX_ENTRIES)

    def reauthorization_required(self) -> ReauthorizationRequired:
        return ReauthorizationRequired(self._settings.login_url)

    def credential(self, connection: Connection) -> Credential:
        """The connection's access token, decrypted once per row version."""
        if connection.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
            raise self.reauthorization_required()
        token = self._cache.access_token(connection)
        if token is None:
            try:
                token = self._cipher.decrypt(connection.access_token_encrypted)
            except TokenDecryptionError:
                # The key that encrypted it was removed from PINAUTH_ENCRYPTION_KEYS.
                raise UndecryptableToken(self._settings.login_url, connection) from None
            self._cache.remember_access_token(connection, token)
        return Credential(connection, token)

    async def usable_credential(self, connection: Connection) -> Credential:
        """A credential to call Pinterest with, refreshed first if it is about to expire.

        If the proactive refresh fails only transiently and the token has not expired
        yet, the current token is still good: use it rather than fail the call.
        """
        if self._unsaved:
            # Tokens the database refused are the only good ones until their write lands;
            # with the cache off nothing else in this process holds them.
            connection = self._with_unsaved(connection)
        now = datetime.now(UTC)
        margin = self._margin
        lifetime = self._lifetimes.get(connection.public_id)
        if lifetime is not None:
            # Tokens that live shorter than the margin would otherwise be "expiring" from
            # the moment they are issued, and every call would refresh again.
            margin = min(margin, lifetime / 2)
        # A try costs nothing until something is raised: the hot path stays as it was.
        try:
            if connection.access_token_expires_at - now > margin:
                return self.credential(connection)
            try:
                return self.credential(await self.refresh(connection))
            except (UpstreamUnavailable, PinterestClientRejected):
                if connection.access_token_expires_at > now:
                    log.warning(
                        "using connection %s's current token until refresh recovers",
                        connection.public_id,
                    )
                    return self.credential(connection)
                raise
        except UndecryptableToken as e:
            await self._mark_undecryptable(e.connection)
            raise

    async def replace_rejected(
        self, rejected: Credential, since: datetime, *, fresh_only: bool = False
    ) -> tuple[Credential, bool]:
        """Pinterest refused `rejected` at `since`: a credential to retry with, and whether
        it is fresh.

        Fresh means Pinterest issued it after the rejection (this call's own refresh, one
        it joined, or another process's that answered after `since`). If the row had
        already moved on before (another request, replica or login changed the tokens),
        its token is offered instead of spending the refresh token, unless `fresh_only`:
        it is not fresh, and a caller it fails for comes back with `fresh_only`.
        When no such credential can be had (this process holds tokens the database has
        not taken yet, so nothing can be refreshed; or the row keeps changing), raises
        503: a rejected token is never the answer.
        """
        current = rejected.connection
        for _ in range(REPLACEMENT_STEPS):
            connection, refreshed = await self._refresh(current)
            fresh = refreshed or _issued_since(connection, since)
            if fresh or (not fresh_only and connection.version > rejected.connection.version):
                try:
                    return self.credential(connection), fresh
                except UndecryptableToken as e:
                    await self._mark_undecryptable(e.connection)
                    raise
            current = connection
        log.warning(
            "no token issued after Pinterest rejected connection %s's could be had",
            rejected.connection.public_id,
        )
        raise UpstreamUnavailable(
            "Pinterest rejected this connection's access token and no newer one can be had "
            "yet; retry shortly.",
            retry_after=1,
        )

    async def refresh(self, seen: Connection) -> Connection:
        """Refresh `seen`'s tokens, unless its row changed since it was read.

        Returns the connection as stored afterwards. Every concurrent caller that saw
        the same version gets the result of a single token request.
        """
        connection, _ = await self._refresh(seen)
        return connection

    async def refresh_reporting(self, seen: Connection) -> tuple[Connection, bool]:
        """`refresh`, also telling whether this very call's token request got new tokens
        (False when it joined another caller's refresh or found the row moved on)."""
        return await self._refresh(seen)

    async def _refresh(self, seen: Connection, *, recheck: bool = False) -> tuple[Connection, bool]:
        """`refresh`, also telling whether this call got new tokens from Pinterest.

        The refresh runs in a task this manager owns, and callers wait for it through
        `asyncio.shield`: a client that disconnects, or a request cancelled at shutdown,
        must not cancel a token call whose answer is the only valid refresh token.
        Concurrent callers share the one task in flight for the connection.
        `recheck`: `seen` is reauthorization_required (see `recheck`).
        """
        public_id = seen.public_id
        task = self._in_flight.get(public_id)
        if task is None:
            newer = self._newer_than(seen)
            if newer is not None:
                return newer, False
            task = asyncio.create_task(
                self._refresh_about(seen, recheck=recheck), name=f"refresh {public_id}"
            )
            self._in_flight[public_id] = task
            task.add_done_callback(partial(self._refresh_done, public_id))
            return await asyncio.shield(task)
        # Someone else's refresh: wait for it only so long, as for a lock.
        try:
            async with asyncio.timeout(self._settings.refresh_lock_timeout_seconds):
                connection, _ = await asyncio.shield(task)
        except TimeoutError:
            raise UpstreamUnavailable(
                "A token refresh for this connection is still in progress; retry shortly."
            ) from None
        return connection, False

    def _with_unsaved(self, connection: Connection) -> Connection:
        """`connection`, or this process's newer copy of it that is not stored yet.

        Only a strictly newer one: a row at the same version was written by someone else
        (a new login), and the write of the copy will never land over it.
        """
        pending = self._unsaved.get(connection.public_id)
        if pending is not None and pending.version > connection.version:
            return pending
        return connection

    def _newer_than(self, seen: Connection) -> Connection | None:
        """A version of the row newer than `seen` that this process already holds."""
        pending = self._unsaved.get(seen.public_id)
        if (
            pending is not None
            and pending.version >= seen.version
            and not self._cache.is_deleted(seen.public_id)
        ):
            # Its write is still being retried: the database holds the spent refresh
            # token, so these tokens are the only good ones.
            return pending
        cached = self._cache.cached_connection(seen.public_id)
        if cached is not None and cached.version > seen.version:
            return cached
        return None

    def _refresh_done(self, public_id: str, task: asyncio.Task[tuple[Connection, bool]]) -> None:
        if self._in_flight.get(public_id) is task:
            del self._in_flight[public_id]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone

    async def _refresh_about(
        self, seen: Connection, *, recheck: bool = False
    ) -> tuple[Connection, bool]:
        """`_refresh_once`, every line it logs naming the connection (a request's, the
        keeper's or a recheck's: the task has a context of its own)."""
        with about_connection(seen.public_id):
            return await self._refresh_once(seen, recheck=recheck)

    async def _refresh_once(
        self, seen: Connection, *, recheck: bool = False
    ) -> tuple[Connection, bool]:
        """Claim the lease, call the token endpoint with no transaction open, store.

        `recheck`: `seen` is reauthorization_required and this is `recheck`'s one try of
        its stored refresh token, under the same lease as every other refresh (so two at
        once spend it once). A lease someone holds is not waited for, and the row is
        returned as it is; a refused grant changes nothing and raises _StillRefused.
        """
        public_id = seen.public_id
        remaining = self._cooldown_until.get(public_id, 0.0) - self._clock()
        if remaining > 0:
            raise UpstreamUnavailable(
                "Pinterest's token endpoint failed moments ago; retry shortly.",
                retry_after=max(1, math.ceil(remaining)),
            )
        # While Pinterest refuses the app's credentials, no lease and no token call: the
        # refresh token is kept, and the connection stays as it is.
        self.client_credentials.admit()
        row, owner = await self._claim_lease(seen, recheck=recheck)
        if owner is None:
            if recheck:
                return row, False  # busy, or moved on: `recheck` tells which
            if row.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
                self._cache.remember_connection(row)
                raise self.reauthorization_required()
            log.debug("connection %s changed since it was read", public_id)
            self._cache.remember_connection(row)
            return row, False
        try:
            if row.refresh_token_encrypted is None:
                raise TokenRejected("no refresh token stored")
            expires = row.refresh_token_expires_at
            if expires is not None and expires <= datetime.now(UTC):
                # Pinterest would refuse it: no call, and the same one-time report.
                raise TokenRejected("the refresh token has expired")
            refresh_token = self._cipher.decrypt(row.refresh_token_encrypted)
            # Bounded absolutely (httpx's read timeout is per read); the lease is renewed
            # for as long as the answer may still come, and no longer.
            async with self._renewing(public_id, owner), asyncio.timeout(self._call_budget):
                try:
                    tokens = await self._oauth.refresh(refresh_token)
                except TokenRejected:
                    # Pinterest looked at the grant, so it authenticated the client first.
                    self.client_credentials.record_accepted()
                    raise
            self.client_credentials.record_accepted()
        except PinterestClientRejected:
            # The app's credentials, not this connection's grant: Pinterest did not look
            # at the refresh token, which stays good. Nothing is marked or reported.
            self._metrics.refreshes.labels("client_rejected").inc()
            await self._release_lease(public_id, owner)
            raise self.client_credentials.record_rejected() from None
        except (TokenRejected, TokenDecryptionError) as e:
            if recheck:
                # Already marked and reported: nothing to change but the lease.
                await self._release_lease(public_id, owner)
                raise _StillRefused() from None
            log.warning("connection %s needs reauthorization: %s", public_id, type(e).__name__)
            self._metrics.refreshes.labels("rejected").inc()
            try:
                return await self._mark_rejected(row, seen.version)
            except (ReauthorizationRequired, NotAuthenticated):
                raise  # marked (its write cleared the lease), or gone
            except BaseException:
                # The mark or its event was not written (the database refused it): the
                # lease is still this refresh's, and the sibling handler below does not
                # see what is raised here. Let it go, or every caller waits for it to run
                # out and gets 503; the next refresh meets the rejection and marks it.
                await asyncio.shield(self._release_lease(public_id, owner))
                raise
        except (UpstreamError, UpstreamTimeout, TimeoutError) as e:
            log.warning("refresh of connection %s failed transiently: %s", public_id, e)
            self._metrics.refreshes.labels("transient_error").inc()
            retry_after = e.retry_after if isinstance(e, UpstreamUnavailable) else 0
            cooldown = max(retry_after, TRANSIENT_FAILURE_COOLDOWN)
            self._cooldown_until[public_id] = self._clock() + cooldown
            await self._release_lease(public_id, owner)
            raise UpstreamUnavailable(
                "Pinterest's token endpoint is unavailable; retry later.", retry_after=cooldown
            ) from None
        except BaseException:
            # Cancelled only by shutdown giving up on it, or a bug: let the lease go now
            # rather than make every process wait for it to run out.
            await asyncio.shield(self._release_lease(public_id, owner))
            raise
        self._cooldown_until.pop(public_id, None)
        self._metrics.refreshes.labels("ok").inc()
        self._lifetimes[public_id] = tokens.access_token_expires_at - datetime.now(UTC)
        apply_token_set(row, tokens, self._cipher)
        log.info("refreshed tokens of connection %s", public_id)
        return await self._store(row, seen.version, owner, recovered=recheck)

    async def _claim_lease(
        self, seen: Connection, *, recheck: bool = False
    ) -> tuple[Connection, str | None]:
        """The row, and the lease owner id if this call may spend its refresh token.

        No owner means the row moved on (another process refreshed, the user logged in
        again, or the refresh token was rejected): use the row as it is. A live lease
        held by someone else is waited out by polling, at most PINAUTH_REFRESH_LOCK_TIMEOUT;
        its holder either stores a new version or its lease runs out and is taken over.
        `recheck` claims a reauthorization_required row, and does not wait.
        """
        status = ConnectionStatus.REAUTHORIZATION_REQUIRED if recheck else ConnectionStatus.ACTIVE
        public_id = seen.public_id
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + self._settings.refresh_lock_timeout_seconds
        pause = LEASE_POLL_FIRST
        lease_until: datetime | None = None
        while True:
            remaining = deadline - time.monotonic()
            now = self._wall()
            until = now + self._lease
            try:
                async with self._sessionmaker() as db, db.begin():
                    repository = ConnectionRepository(db)
                    claimed = await repository.claim_refresh_lease(
                        public_id,
                        seen.version,
                        owner,
                        now,
                        until,
                        lock_timeout=max(remaining, 0.05),
                        status=status,
                    )
                    row = await repository.get(public_id)
            except DBAPIError as e:
                # A PostgreSQL row lock held by someone else: as good as a live lease.
                if _sqlstate(e) != LOCK_NOT_AVAILABLE:
                    raise
                if recheck:
                    return seen, None
            else:
                if row is None:
                    raise NotAuthenticated("This Pinterest connection no longer exists.")
                if claimed:
                    return row, owner
                if row.version != seen.version or row.status is not status or recheck:
                    return row, None
                # Otherwise another process holds a live lease: wait for its outcome.
                lease_until = row.refresh_lease_until
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # A live holder stores its answer within moments; a holder that died
                # (kill -9) holds the connection until its lease runs out: say when.
                left = 1.0 if lease_until is None else (lease_until - now).total_seconds()
                raise UpstreamUnavailable(
                    "Another process is refreshing this connection; retry shortly.",
                    retry_after=max(
                        1, min(math.ceil(left), math.ceil(self._lease.total_seconds()))
                    ),
                )
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, LEASE_POLL_MAX)

    @contextlib.asynccontextmanager
    async def _renewing(self, public_id: str, owner: str) -> AsyncIterator[None]:
        """Renew the lease every third of its length while the body (the token call) runs.

        The renewal is its own task; leaving the block stops it between renewals (a
        renewal under way is finished, not cancelled mid-statement).
        """
        stop = asyncio.Event()
        renewer = asyncio.create_task(
            self._renew_until(public_id, owner, stop), name=f"renew lease {public_id}"
        )
        try:
            yield
        finally:
            stop.set()
            await asyncio.shield(renewer)

    async def _renew_until(self, public_id: str, owner: str, stop: asyncio.Event) -> None:
        period = self._lease.total_seconds() / LEASE_RENEWALS_PER_LEASE
        while True:
            pause = asyncio.ensure_future(self._sleep(period))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({pause, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (pause, stopped):
                waiter.cancel()
            if stop.is_set():
                return
            try:
                async with self._sessionmaker() as db, db.begin():
                    renewed = await ConnectionRepository(db).renew_refresh_lease(
                        public_id, owner, self._wall() + self._lease
                    )
            except Exception as e:
                # Two more tries before it runs out; the token call goes on regardless (and
                # nothing raised here may take the place of its answer).
                log.warning(
                    "could not renew connection %s's refresh lease: %s",
                    public_id,
                    type(e).__name__,
                )
                continue
            if not renewed:
                # It ran out before a renewal could land (the database was away for most
                # of a lease) and someone else took it, or the row moved on: nothing to keep.
                log.warning("connection %s's refresh lease was lost while renewing", public_id)
                return

    async def _release_lease(self, public_id: str, owner: str) -> None:
        try:
            async with self._sessionmaker() as db, db.begin():
                await ConnectionRepository(db).release_refresh_lease(public_id, owner)
        except DATABASE_DOWN as e:
            # The lease runs out by itself; waiting processes take it over then.
            log.warning(
                "could not release connection %s's refresh lease: %s", public_id, type(e).__name__
            )

    async def _mark_undecryptable(self, connection: Connection) -> None:
        """No configured key decrypts the row's access token: it needs a new login.

        Marked, and reported, by a compare-and-swap from the active version that failed
        to decrypt, so replicas that all find it report it once.
        """
        public_id = connection.public_id
        log.warning("connection %s needs reauthorization: no key decrypts it", public_id)
        try:
            async with self._sessionmaker() as db, db.begin():
                repository = ConnectionRepository(db)
                marked = await repository.replace_version(
                    public_id,
                    connection.version,
                    {"status": ConnectionStatus.REAUTHORIZATION_REQUIRED},
                )
                current = await repository.get(public_id)
                if marked and current is not None:
                    await record_event(db, EventType.REAUTHORIZATION_REQUIRED, current)
        except DATABASE_DOWN as e:
            # The next call that meets the row tries again; the caller gets its 401 now.
            log.warning("could not mark connection %s: %s", public_id, type(e).__name__)
            return
        if current is not None:
            self._cache.remember_connection(current)

    async def _mark_rejected(self, row: Connection, version: int) -> tuple[Connection, bool]:
        """Pinterest refused the refresh token: the row needs a new login, unless it has
        moved on meanwhile (a late write of this very token's successor, or a login)."""
        public_id = row.public_id
        async with self._sessionmaker() as db, db.begin():
            repository = ConnectionRepository(db)
            marked = await repository.replace_version(
                public_id, version, {"status": ConnectionStatus.REAUTHORIZATION_REQUIRED}
            )
            current = await repository.get(public_id)
            if marked and current is not None:
                # The compare-and-swap from the one active version this refresh claimed
                # is what makes this the only report of it.
                await record_event(db, EventType.REAUTHORIZATION_REQUIRED, current)
            current = row if marked else current
        if current is None:
            raise NotAuthenticated("This Pinterest connection no longer exists.")
        if marked:
            set_committed_value(row, "status", ConnectionStatus.REAUTHORIZATION_REQUIRED)
            _committed(row, version + 1)
        self._cache.remember_connection(current)
        if current.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
            raise self.reauthorization_required()
        return current, False

    async def _store(
        self, row: Connection, version: int, owner: str, *, recovered: bool = False
    ) -> tuple[Connection, bool]:
        """Store the new tokens; if the database will not take them, keep them here.

        They are then served from this process (the cache and `_unsaved`) while a
        background task retries the write until it lands. Returns the row to use and
        whether its tokens are this refresh's own (see `replace_rejected`). `recovered`:
        the row was reauthorization_required, and its write records connection.recovered.
        """
        public_id = row.public_id
        values = _token_columns(row)
        for key, value in values.items():
            set_committed_value(row, key, value)
        _committed(row, version + 1)
        try:
            stored = await self._write(public_id, version, values, recovered=recovered)
        except DATABASE_DOWN as e:
            # The type only: a driver's message may quote the SQL's parameters.
            log.error(
                "could not store connection %s's new tokens (%s); serving them from memory "
                "and retrying the write until the database takes it",
                public_id,
                type(e).__name__,
            )
            self._unsaved[public_id] = row
            self._cache.remember_connection(row)
            writer = asyncio.create_task(
                self._write_until_stored(row, version, values, recovered=recovered),
                name=f"store {public_id}",
            )
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
            return row, True
        if not stored:
            # Only a new login (or a delete) moves the row while this process holds the
            # lease; its tokens are at least as new as these, so callers use them. The
            # lease is let go, or the next refresh would wait for it to run out.
            await self._release_lease(public_id, owner)
            async with self._sessionmaker() as db:
                current = await ConnectionRepository(db).get(public_id)
            if current is None:
                raise NotAuthenticated("This Pinterest connection no longer exists.")
            self._cache.remember_connection(current)
            if current.status is ConnectionStatus.REAUTHORIZATION_REQUIRED:
                raise self.reauthorization_required()
            return current, False
        self._cache.remember_connection(row)
        return row, True

    async def _write(
        self, public_id: str, version: int, values: dict[str, Any], *, recovered: bool = False
    ) -> bool:
        async with self._sessionmaker() as db, db.begin():
            repository = ConnectionRepository(db)
            if await repository.replace_version(public_id, version, values):
                if recovered:
                    # A recheck's: the row was reauthorization_required at `version`.
                    current = await repository.get(public_id)
                    if current is not None:
                        await record_event(
                            db, EventType.RECOVERED, current, schedule=self._schedule
                        )
                return True
            # Versions only grow: if the row is not at `version` now, it never will be,
            # so a match here is the rejection this answer overrides.
            if not await repository.replace_version(
                public_id, version, values, over_rejection=True
            ):
                return False
            # The connection was reported as needing a new login; it works again.
            current = await repository.get(public_id)
            if current is not None:
                await record_event(db, EventType.RECOVERED, current, schedule=self._schedule)
            return True

    async def _write_until_stored(
        self, row: Connection, version: int, values: dict[str, Any], *, recovered: bool = False
    ) -> None:
        public_id = row.public_id
        pause = WRITE_RETRY_FIRST
        attempts = 1
        try:
            while True:
                if self._closing.is_set():
                    await asyncio.sleep(WRITE_RETRY_FIRST)
                else:
                    # Shutdown cuts the pause short: the last tries come before the exit.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await self._closing.wait()
                attempts += 1
                try:
                    stored = await self._write(public_id, version, values, recovered=recovered)
                except DATABASE_DOWN:
                    pause = min(pause * 2, WRITE_RETRY_MAX)
                    continue
                break
        except asyncio.CancelledError:
            log.error(
                "connection %s's new tokens were never stored; it must log in again", public_id
            )
            raise
        finally:
            if self._unsaved.get(public_id) is row:
                del self._unsaved[public_id]
        if stored:
            log.warning("stored connection %s's new tokens after %d attempts", public_id, attempts)
        else:
            log.warning("connection %s changed before its new tokens could be stored", public_id)

    async def recheck(self, public_id: str) -> RecheckOutcome:
        """Try a reauthorization_required connection's stored refresh token, once.

        For connections marked by mistake (before pinauth told a refused client from a
        refused grant, a wrong client secret marked every connection it touched): if
        Pinterest still takes the token, the new tokens are stored, the connection is
        active again and `connection.recovered` is recorded, in one transaction. If it
        refuses the grant, nothing changes. Refused client credentials raise
        PinterestClientRejected; an unavailable Pinterest raises its UpstreamError.

        It is a refresh like any other (`_refresh_once`): under the connection's refresh
        lease, renewed while the token call is in flight, its answer stored with a
        compare-and-swap on the version read (kept in memory and retried if the database
        refuses it). So two rechecks at once spend the token once: the other finds the
        lease held (BUSY) or the row moved on (CHANGED, or NOT_MARKED if read after),
        never a "still rejected" for a connection the first one revived.
        """
        async with self._sessionmaker() as db:
            row = await ConnectionRepository(db).get(public_id)
        if row is None:
            raise NotAuthenticated("This Pinterest connection no longer exists.")
        if row.status is not ConnectionStatus.REAUTHORIZATION_REQUIRED:
            return RecheckOutcome.NOT_MARKED
        expires = row.refresh_token_expires_at
        if row.refresh_token_encrypted is None or (
            expires is not None and expires <= datetime.now(UTC)
        ):
            return RecheckOutcome.STILL_REJECTED  # Pinterest would refuse it: no call
        try:
            current, refreshed = await self._refresh(row, recheck=True)
        except _StillRefused:
            log.info("connection %s: Pinterest still refuses its refresh token", public_id)
            return RecheckOutcome.STILL_REJECTED
        except ReauthorizationRequired:
            # Its answer could not be stored: the row moved on (to another version that
            # is marked) while the token call was in flight.
            log.warning("connection %s changed during its recheck; left as it is", public_id)
            return RecheckOutcome.CHANGED
        if refreshed:
            log.warning(
                "connection %s recovered: Pinterest still takes its refresh token", public_id
            )
            return RecheckOutcome.RECOVERED
        if current.version == row.version and current.status is row.status:
            log.warning("connection %s is being refreshed elsewhere; not rechecked", public_id)
            return RecheckOutcome.BUSY
        log.warning("connection %s changed during its recheck; left as it is", public_id)
        return RecheckOutcome.CHANGED

    async def aclose(self) -> None:
        """Wait for token calls in flight and for unsaved tokens' writes, then stop.

        Each token call is bounded by its own timeout; the writes get as long as the
        longest token call. A write still failing after that is logged, loudly: that user must
        log in again.
        """
        self._closing.set()
        waiting = {*self._in_flight.values(), *self._writers}
        if waiting:
            log.info("waiting for %d token refreshes and writes to finish", len(waiting))
            _, late = await asyncio.wait(waiting, timeout=self._longest_call)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _issued_since(connection: Connection, since: datetime) -> bool:
    """Whether the connection's tokens came from a token answer received after `since`
    (stamped by the process that received it; replicas' clocks are assumed close)."""
    issued = connection.last_refreshed_at
    return issued is not None and issued >= since


def _committed(row: Connection, version: int) -> None:
    """Record `version` on a detached row as stored state, not as a pending change."""
    set_committed_value(row, "version", version)
    set_committed_value(row, "refresh_lease_owner", None)
    set_committed_value(row, "refresh_lease_until", None)


def _token_columns(row: Connection) -> dict[str, Any]:
    return {
        "access_token_encrypted": row.access_token_encrypted,
        "access_token_expires_at": row.access_token_expires_at,
        "refresh_token_encrypted": row.refresh_token_encrypted,
        "refresh_token_expires_at": row.refresh_token_expires_at,
        "scopes": row.scopes,
        "status": row.status,
        # When Pinterest issued these (as this process saw it): tells a caller that met a
        # 401 whether a row that moved on holds a token issued after it (proxy.py).
        "last_refreshed_at": row.last_refreshed_at,
    }


def _sqlstate(error: DBAPIError) -> str | None:
    orig = error.orig
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
