"""The keeper: refreshes connections before their refresh tokens die unused.

Pinterest's refresh tokens expire 60 days after they were issued. A user who connects and
then does not come back for two months would be logged out for good; the keeper refreshes
every active connection whose refresh token expires within PINAUTH_KEEPALIVE_DAYS.

- Every replica runs one. Keepers split the work through the database: each claims a
  batch of due rows with one UPDATE (SKIP LOCKED on PostgreSQL) that stamps
  `keeper_not_before`, so other keepers pass them by. A keeper that dies leaves its claim
  to run out.
- A refresh goes through the TokenManager, exactly as a request's would: the same
  single-flight within the process and the same lease on the row across processes. A
  keeper racing a request, or another keeper whose claim ran out, still makes one token
  request per refresh token.
- Jitter: each connection is due a fixed, pseudo-random part of a spread (a day, at most
  half the window) before its refresh token enters the window, so connections made
  together are refreshed apart, and stay apart.
- Transient failures back off per connection, exponentially with jitter, in the row (so
  every replica honours it): a token endpoint that is down sees a handful of calls per
  connection, not one per wake-up. When fewer than EXPIRING_WARNING remain, one
  `connection.expiring` event goes out per refresh token.
- A refresh token already past expiry cannot be refreshed: the connection is marked
  reauthorization_required without calling Pinterest.
- While Pinterest refuses the app's own client credentials (clientstate.py), the keeper
  claims nothing; a connection whose refresh met that refusal is handed back untouched (no
  failure counted, no event), to be taken again by the first pass after it ends. Only the
  one try per cooldown that checks the credentials is made.
- Dead leases: a refresh lease that ran out with no result stored means its holder died
  mid-refresh (kill -9) and nobody knows whether Pinterest rotated the refresh token. The
  keeper finds out at start and on every pass instead of waiting for a call: it tries the
  stored refresh token (the only move: only the holder's call may have spent it). Rejected:
  the connection becomes reauthorization_required with its event; accepted: the new tokens
  are stored. See `_resolve_dead_leases` for what "no result stored" means.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter, Gauge
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.background import BackgroundLoop
from pinauth.errors import (
    DatabaseUnavailable,
    NotAuthenticated,
    PinauthError,
    PinterestClientRejected,
    ReauthorizationRequired,
)
from pinauth.models import Connection, ConnectionStatus
from pinauth.observability import Metrics
from pinauth.repository import ConnectionRepository, KeeperRepository
from pinauth.schedule import Schedule
from pinauth.settings import Settings
from pinauth.tokens import WRITE_RETRY_MAX, TokenManager
from pinauth.webhooks import EventType, record_event

log = logging.getLogger(__name__)

# A claimed batch is the keeper's for this long; if it dies, another keeper takes over then.
CLAIM_DURATION = timedelta(minutes=15)
# Back-off after a transient failure: the first pause, doubled per failure up to the cap.
BACKOFF_FIRST = timedelta(minutes=1)
BACKOFF_MAX = timedelta(hours=6)
# Fewer than this left on a refresh token the keeper could not refresh: tell the app.
EXPIRING_WARNING = timedelta(days=3)
# Rows claimed at once per keeper, per unit of concurrency.
BATCH_PER_WORKER = 8
# How many of the soonest-expiring rows the next-due gauge looks at.
NEXT_DUE_SAMPLE = 50
# Wake-ups are spread by this fraction of the interval, so replicas drift apart.
INTERVAL_JITTER = 0.1
# Dead leases looked at per pass, at most.
DEAD_LEASE_BATCH = 500


def utc_now() -> datetime:
    return datetime.now(UTC)


class KeeperMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.refreshes = Counter(
            "pinauth_keeper_refreshes",
            "Connections the keeper looked after, by outcome: refreshed, failed (transient; "
            "retried after a back-off), reauthorization_required.",
            ["outcome"],
            registry=metrics.registry,
        )
        for outcome in ("refreshed", "failed", "reauthorization_required"):
            self.refreshes.labels(outcome)
        self.next_due = Gauge(
            "pinauth_keeper_next_due_timestamp_seconds",
            "When the next connection is due for the keeper (unix time; 0 if none is).",
            registry=metrics.registry,
        )
        self.passes = Counter(
            "pinauth_keeper_passes", "Keeper wake-ups completed.", registry=metrics.registry
        )


@dataclass(slots=True)
class KeeperPass:
    """What one pass did, for logs and tests."""

    refreshed: int = 0
    failed: int = 0
    reauthorization_required: int = 0
    scheduled: int = 0
    # Handed back untouched because Pinterest refuses the app's client credentials.
    client_rejected: int = 0
    # Dead leases resolved: the stored refresh token tried (its outcome is counted above).
    dead_leases: int = 0
    seen: set[str] = field(default_factory=set)


class Keeper(BackgroundLoop):
    """Refreshes due connections every `interval` seconds, until stopped."""

    task_name = "pinauth-keeper"

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        tokens: TokenManager,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self._sessionmaker = sessionmaker
        self._tokens = tokens
        self._metrics = KeeperMetrics(metrics)
        self._schedule = Schedule.of(settings)
        self._interval = settings.keeper_interval_seconds
        self._concurrency = settings.keeper_concurrency
        self._batch = settings.keeper_concurrency * BATCH_PER_WORKER
        self._clock = clock
        self._random = rng or random.Random()
        self.passes = 0
        # Set after each pass: what a test waits on instead of sleeping.
        self.pass_done = asyncio.Event()
        # Dead leases seen, by (connection, lease owner, version): when first seen.
        self._dead_seen: dict[tuple[str, str, int], datetime] = {}
        # Long enough for a live process holding unsaved tokens to store them once the
        # database answers again: its write retries pause WRITE_RETRY_MAX at most, and one
        # attempt may wait PINAUTH_DATABASE_TIMEOUT for a connection.
        self._lease_grace = timedelta(seconds=WRITE_RETRY_MAX + settings.database_timeout_seconds)
        # When the soonest dead lease seen but not yet resolved may be resolved.
        self._next_dead_lease: datetime | None = None

    # --- running ---------------------------------------------------------------------
    # start, stop and request_stop come from BackgroundLoop. `stop` waits for the refreshes
    # under way: cancelling one would not cancel its token call (the TokenManager owns it),
    # only the keeper's bookkeeping of it.

    async def run_forever(self) -> None:
        """`pinauth keeper`: run until cancelled."""
        self.start()
        assert self._task is not None
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                done = await self.run_once()
            except DatabaseUnavailable:
                log.info("keeper pass skipped: the database is unavailable")
            except Exception:
                # A database that is down or not yet migrated must not end the task.
                log.warning("keeper pass failed; next try in %ss", self._interval, exc_info=True)
            else:
                if done.refreshed or done.failed or done.reauthorization_required:
                    log.info(
                        "keeper: %d refreshed, %d failed, %d need reauthorization",
                        done.refreshed,
                        done.failed,
                        done.reauthorization_required,
                    )
                if done.client_rejected:
                    log.info(
                        "keeper: %d connections left as they were: Pinterest refuses the "
                        "app's client credentials",
                        done.client_rejected,
                    )
            self.passes += 1
            self.pass_done.set()
            pause = self._interval * (1 + self._random.uniform(-1, 1) * INTERVAL_JITTER)
            if self._next_dead_lease is not None:
                # Back when a dead lease seen in this pass may be resolved, not a whole
                # interval later.
                until = (self._next_dead_lease - self._clock()).total_seconds()
                pause = min(pause, max(until, 0.0) + 0.1)
            await self._pause(pause)

    # --- one pass --------------------------------------------------------------------

    async def run_once(self) -> KeeperPass:
        """Claim due connections batch by batch and look after each; then set the gauge."""
        done = KeeperPass()
        limit = asyncio.Semaphore(self._concurrency)
        await self._resolve_dead_leases(limit, done)
        while not self._stopping.is_set():
            if self._tokens.client_credentials.waiting():
                # Every refresh would be refused: leave the rows for a pass after it ends.
                break
            now = self._clock()
            async with self._sessionmaker() as db, db.begin():
                batch = await KeeperRepository(db).claim_due(
                    now, self._schedule.horizon(now), now + CLAIM_DURATION, self._batch
                )
            if not batch:
                break
            handed_back = done.client_rejected
            async with asyncio.TaskGroup() as group:
                for connection in batch:
                    group.create_task(self._guarded(connection, limit, done))
            # Rows handed back while one try found the credentials working again: take
            # them now rather than a whole interval later.
            again = (
                done.client_rejected > handed_back and not self._tokens.client_credentials.rejected
            )
            if len(batch) < self._batch and not again:
                break
        await self._update_next_due()
        self._metrics.passes.inc()
        return done

    async def _guarded(
        self, connection: Connection, limit: asyncio.Semaphore, done: KeeperPass
    ) -> None:
        async with limit:
            if self._stopping.is_set():
                # Shutting down: finish the refreshes under way, start none. The rest of
                # the batch waits for its claim to run out, then another pass takes it.
                return
            try:
                await self._look_after(connection, done)
            except (DatabaseUnavailable, DBAPIError, OSError) as e:
                # Its claim runs out and a later pass takes it again.
                log.warning(
                    "keeper could not look after connection %s: %s",
                    connection.public_id,
                    type(e).__name__,
                )

    async def _look_after(self, connection: Connection, done: KeeperPass) -> None:
        public_id = connection.public_id
        done.seen.add(public_id)
        now = self._clock()
        due = self._schedule.due_at(connection)
        expires = connection.refresh_token_expires_at
        if due is None or expires is None:  # not claimable; the query excludes it
            return
        if expires <= now:
            await self._expired(connection, done)
            return
        if due > now:
            # Within the spread but not its turn yet: come back at its own time.
            async with self._sessionmaker() as db, db.begin():
                await KeeperRepository(db).schedule(public_id, due)
            done.scheduled += 1
            return
        try:
            fresh, refreshed = await self._tokens.refresh_reporting(connection)
        except ReauthorizationRequired:
            # The TokenManager marked the row (and recorded its event) or found it marked.
            self._metrics.refreshes.labels("reauthorization_required").inc()
            done.reauthorization_required += 1
            return
        except NotAuthenticated:
            return  # deleted meanwhile
        except PinterestClientRejected:
            # Nothing is wrong with this connection: free it for the next pass, as it was.
            async with self._sessionmaker() as db, db.begin():
                await KeeperRepository(db).schedule(public_id, None)
            done.client_rejected += 1
            return
        except PinauthError as e:
            # Pinterest's token endpoint failing, or another process's refresh of the
            # same row outlasting our wait: transient either way.
            await self._failed(connection, now, e, done)
            return
        # A refresh whose answer left the token still due (Pinterest sent no new expiry)
        # must not be repeated on every wake-up.
        again = self._schedule.due_at(fresh)
        not_before = None if again is None or again > now else now + BACKOFF_MAX
        async with self._sessionmaker() as db, db.begin():
            await KeeperRepository(db).schedule(public_id, not_before, keeper_failures=0)
        if refreshed:
            self._metrics.refreshes.labels("refreshed").inc()
            done.refreshed += 1

    # --- dead leases ------------------------------------------------------------------

    async def _resolve_dead_leases(self, limit: asyncio.Semaphore, done: KeeperPass) -> None:
        """Try the stored refresh token of each connection whose lease ran out unresolved.

        A lease is cleared by every outcome its holder stores (new tokens, a rejection) and
        by the holder letting it go (a transient failure, shutdown). One still set after
        it ran out means no result was stored: the holder died mid-refresh, or it is alive
        but the database refused the write of its new tokens, which it then keeps in
        memory (and serves) while retrying the write (tokens.py, `_write_until_stored`).
        Trying the stored token in the second case would spend nothing (it is already
        spent) but would mark a working connection reauthorization_required until that
        write lands over the mark. So "no result stored" means: still unresolved after the
        database has answered this keeper for `_lease_grace`, the longest a live holder
        takes to land its write once the database answers (its retries pause at most
        WRITE_RETRY_MAX). A dead lease is therefore resolved on the first pass at least
        that long after it was first seen. Tokens held in this very process are found by
        the TokenManager itself (its unsaved rows), which makes no call for them. Left
        open: a holder cut off from a database that answers everyone else, for longer
        than a lease and the grace; its write still wins over the mark when it lands
        (with `connection.recovered`).
        """
        now = self._clock()
        async with self._sessionmaker() as db:
            keeper = KeeperRepository(db)
            dead = await keeper.dead_leases(now, DEAD_LEASE_BATCH)
            # A lease still running may be a dead process's too (a restart quicker than a
            # lease): come back when it runs out rather than a whole interval later.
            live_until = await keeper.soonest_lease_end(now)
        seen: dict[tuple[str, str, int], datetime] = {}
        ripe: list[Connection] = []
        for connection in dead:
            assert connection.refresh_lease_owner is not None
            key = (connection.public_id, connection.refresh_lease_owner, connection.version)
            first = seen[key] = self._dead_seen.get(key, now)
            if now - first >= self._lease_grace:
                ripe.append(connection)
        # Forget leases resolved meanwhile, by anyone: the map stays as small as the batch.
        self._dead_seen = seen
        # Those that failed to resolve wait for the next interval, as any failure does.
        waiting = [at for first in seen.values() if (at := first + self._lease_grace) > now]
        if live_until is not None:
            waiting.append(live_until)
        self._next_dead_lease = min(waiting) if waiting else None
        if not ripe:
            return
        log.warning("keeper: resolving %d refresh leases left by dead processes", len(ripe))
        async with asyncio.TaskGroup() as group:
            for connection in ripe:
                group.create_task(self._resolve_guarded(connection, limit, done))

    async def _resolve_guarded(
        self, connection: Connection, limit: asyncio.Semaphore, done: KeeperPass
    ) -> None:
        async with limit:
            if self._stopping.is_set():
                return
            try:
                await self._resolve(connection, done)
            except (DatabaseUnavailable, DBAPIError, OSError) as e:
                # Still unresolved in the database: a later pass finds it again.
                log.warning(
                    "keeper could not resolve connection %s's dead lease: %s",
                    connection.public_id,
                    type(e).__name__,
                )

    async def _resolve(self, connection: Connection, done: KeeperPass) -> None:
        public_id = connection.public_id
        done.dead_leases += 1
        try:
            _, refreshed = await self._tokens.refresh_reporting(connection)
        except ReauthorizationRequired:
            # Pinterest rejected it: the holder's call had spent it. The TokenManager
            # marked the row and recorded its event in one transaction.
            log.warning("connection %s's refresh was lost with its process", public_id)
            self._metrics.refreshes.labels("reauthorization_required").inc()
            done.reauthorization_required += 1
            return
        except NotAuthenticated:
            return  # deleted meanwhile
        except PinauthError as e:
            # Pinterest's token endpoint failing (the TokenManager let its lease go), or
            # another process's refresh outlasting our wait: still unresolved, so the row
            # is put back as it was found, unless it moved on meanwhile. The TokenManager's
            # cooldown keeps the next passes from calling a failing endpoint at once.
            async with self._sessionmaker() as db, db.begin():
                await KeeperRepository(db).restore_dead_lease(connection)
            log.warning(
                "keeper could not resolve connection %s's dead lease: %s",
                public_id,
                type(e).__name__,
            )
            self._metrics.refreshes.labels("failed").inc()
            done.failed += 1
            return
        if refreshed:
            log.warning("connection %s's refresh lost with its process is recovered", public_id)
            self._metrics.refreshes.labels("refreshed").inc()
            done.refreshed += 1

    async def _expired(self, connection: Connection, done: KeeperPass) -> None:
        """Past expiry: no refresh can work, so none is tried. One event, by the row's
        compare-and-swap: only the keeper (or request) that marks it records it."""
        async with self._sessionmaker() as db, db.begin():
            repository = ConnectionRepository(db)
            marked = await repository.replace_version(
                connection.public_id,
                connection.version,
                {"status": ConnectionStatus.REAUTHORIZATION_REQUIRED, "keeper_not_before": None},
            )
            current = await repository.get(connection.public_id) if marked else None
            if current is not None:
                await record_event(db, EventType.REAUTHORIZATION_REQUIRED, current)
        if marked:
            log.warning(
                "connection %s's refresh token expired unused; it needs a new login",
                connection.public_id,
            )
            self._metrics.refreshes.labels("reauthorization_required").inc()
            done.reauthorization_required += 1

    async def _failed(
        self, connection: Connection, now: datetime, error: PinauthError, done: KeeperPass
    ) -> None:
        public_id = connection.public_id
        failures = connection.keeper_failures + 1
        pause = min(BACKOFF_FIRST * 2 ** min(failures - 1, 20), BACKOFF_MAX)
        # Full pause at most, half at least: connections failing together drift apart.
        pause *= self._random.uniform(0.5, 1.0)
        retry_after = getattr(error, "retry_after", 0)
        pause = max(pause, timedelta(seconds=retry_after))
        expires = connection.refresh_token_expires_at
        assert expires is not None
        warn = expires - now < EXPIRING_WARNING and connection.keeper_expiring_for != expires
        async with self._sessionmaker() as db, db.begin():
            repository = KeeperRepository(db)
            values: dict[str, object] = {"keeper_failures": failures}
            if warn:
                values["keeper_expiring_for"] = expires
            await repository.schedule(public_id, now + pause, **values)
            if warn:
                await record_event(db, EventType.EXPIRING, connection, schedule=self._schedule)
        log.warning(
            "keeper could not refresh connection %s (%s, %d in a row); next try in %ds",
            public_id,
            type(error).__name__,
            failures,
            pause.total_seconds(),
        )
        self._metrics.refreshes.labels("failed").inc()
        done.failed += 1

    async def _update_next_due(self) -> None:
        async with self._sessionmaker() as db:
            soonest = await KeeperRepository(db).soonest(NEXT_DUE_SAMPLE)
        times = [t for c in soonest if (t := self._schedule.next_refresh_at(c)) is not None]
        self._metrics.next_due.set(min(times).timestamp() if times else 0)
