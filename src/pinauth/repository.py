"""Every database query pinauth makes. Repositories flush; the unit of work's owner commits."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select, text, update
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, joinedload

from pinauth.models import (
    ApiKey,
    AuthSession,
    Connection,
    ConnectionStatus,
    ConnectionSummary,
    ConnectResult,
    ConnectSession,
    LoginState,
    ProxyToken,
    WebhookAttempt,
    WebhookEvent,
    WebhookEventStatus,
)

# Lease and token writes go through Core: an ORM UPDATE would bump `version` for the
# lease too, and would need the row loaded in this session.
_connections = Connection.metadata.tables[Connection.__tablename__]
# A listing reads these columns only, in ConnectionSummary's order, and no tokens.
_summary_columns = [_connections.c[f.name] for f in fields(ConnectionSummary)]


class ConnectionRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def get(self, public_id: str) -> Connection | None:
        stmt = select(Connection).where(Connection.public_id == public_id)
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def get_by_id(self, key: int) -> Connection | None:
        return await self._db.get(Connection, key)

    async def versions(self, public_ids: list[str]) -> dict[str, int]:
        """Public id -> row version of those of `public_ids` that exist."""
        stmt = select(Connection.public_id, Connection.version).where(
            Connection.public_id.in_(public_ids)
        )
        return {public_id: version for public_id, version in await self._db.execute(stmt)}

    async def claim_refresh_lease(
        self,
        public_id: str,
        version: int,
        owner: str,
        now: datetime,
        until: datetime,
        *,
        lock_timeout: float,
        status: ConnectionStatus = ConnectionStatus.ACTIVE,
    ) -> bool:
        """Take the row's refresh lease if the row is still at `version`, in `status`
        (active; reauthorization_required for a recheck), and nobody holds a live lease;
        True if this call took it. Leaves `version` alone.

        One UPDATE whose WHERE is the whole decision, so it is atomic on every backend:
        on SQLite it is the transaction's first statement and takes the database's write
        lock before anything is read (waiting out other writers with the busy timeout);
        on PostgreSQL it re-checks the WHERE against the newest row version, waiting at
        most `lock_timeout` for a row lock somebody else holds. Read the row after it, in
        the same transaction, to learn why a claim failed.
        """
        if self._db.get_bind().dialect.name == "postgresql":
            # SET does not take bind parameters; the value is a float we formatted.
            await self._db.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'"))
        result = await self._db.execute(
            update(_connections)
            .where(
                _connections.c.public_id == public_id,
                _connections.c.version == version,
                _connections.c.status == status,
                or_(
                    _connections.c.refresh_lease_until.is_(None),
                    _connections.c.refresh_lease_until < now,
                ),
            )
            .values(refresh_lease_owner=owner, refresh_lease_until=until)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def renew_refresh_lease(self, public_id: str, owner: str, until: datetime) -> bool:
        """Extend `owner`'s lease to `until`; False if it is no longer `owner`'s."""
        result = await self._db.execute(
            update(_connections)
            .where(
                _connections.c.public_id == public_id, _connections.c.refresh_lease_owner == owner
            )
            .values(refresh_lease_until=until)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def release_refresh_lease(self, public_id: str, owner: str) -> None:
        await self._db.execute(
            update(_connections)
            .where(
                _connections.c.public_id == public_id, _connections.c.refresh_lease_owner == owner
            )
            .values(refresh_lease_owner=None, refresh_lease_until=None)
        )

    async def replace_version(
        self, public_id: str, version: int, values: dict[str, Any], *, over_rejection: bool = False
    ) -> bool:
        """Write `values` and clear the lease, if the row is still at `version`; bumps it.

        The compare-and-swap is on the version, not the lease, so it never wins over a
        newer login or refresh. `over_rejection` is for storing a refresh's answer: that
        write also wins over a row another process marked reauthorization_required at
        `version + 1`, because the token that process found dead is the one this answer
        replaced (it could only get there after an outage outlived this refresh's lease).
        """
        c = _connections.c
        current = c.version == version
        if over_rejection:
            current = or_(
                current,
                and_(
                    c.version == version + 1,
                    c.status == ConnectionStatus.REAUTHORIZATION_REQUIRED,
                ),
            )
        result = await self._db.execute(
            update(_connections)
            .where(c.public_id == public_id, current)
            .values(
                {
                    **values,
                    "version": c.version + 1,
                    "refresh_lease_owner": None,
                    "refresh_lease_until": None,
                    "updated_at": func.now(),
                }
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def get_by_owner(
        self, end_user_id: str | None, pinterest_user_id: str
    ) -> Connection | None:
        """The connection of this end user (None: a browser-only login) to this account."""
        owner = (
            Connection.end_user_id.is_(None)
            if end_user_id is None
            else Connection.end_user_id == end_user_id
        )
        stmt = select(Connection).where(owner, Connection.pinterest_user_id == pinterest_user_id)
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def page(
        self,
        *,
        limit: int,
        after: int | None = None,
        end_user_id: str | None = None,
        status: ConnectionStatus | None = None,
    ) -> list[ConnectionSummary]:
        """Up to `limit` connections in creation order, after the key `after`.

        Keyset-paginated on the key, so a page is an index range scan however deep it is,
        and deleting the row a cursor came from does not lose the place.
        """
        stmt = self.page_query(limit=limit, after=after, end_user_id=end_user_id, status=status)
        return [ConnectionSummary(*row) for row in (await self._db.execute(stmt))]

    @staticmethod
    def page_query(
        *,
        limit: int,
        after: int | None = None,
        end_user_id: str | None = None,
        status: ConnectionStatus | None = None,
    ) -> Select[Any]:
        """The statement behind `page`; each combination of filters has an index that
        returns its rows in key order (tests/test_list_indexes.py reads the plans)."""
        stmt = select(*_summary_columns).order_by(Connection.id).limit(limit)
        if end_user_id is not None:
            stmt = stmt.where(Connection.end_user_id == end_user_id)
        if status is not None:
            stmt = stmt.where(Connection.status == status)
        else:
            # Unconfirmed connections are listed only when asked for by their status.
            stmt = stmt.where(Connection.status != ConnectionStatus.PENDING)
        if after is not None:
            stmt = stmt.where(Connection.id > after)
        return stmt

    async def add(self, connection: Connection) -> Connection:
        self._db.add(connection)
        await self._db.flush()
        return connection

    async def delete(self, connection: Connection) -> None:
        await self._db.delete(connection)
        await self._db.flush()

    async def next_webhook_sequence(self, connection_id: int) -> int | None:
        """Count one more webhook event for the connection and return the count (None if
        the row is gone). The UPDATE takes the row lock until the transaction ends, so
        concurrent transactions get consecutive numbers in commit order. Leaves
        `version` and `updated_at` alone: an event is not a change of the connection."""
        c = _connections.c
        result = await self._db.execute(
            update(_connections)
            .where(c.id == connection_id)
            .values(webhook_sequence=c.webhook_sequence + 1, updated_at=c.updated_at)
            .returning(c.webhook_sequence)
        )
        sequence: int | None = result.scalar_one_or_none()
        return sequence

    async def count_by_status(self) -> dict[ConnectionStatus, int]:
        stmt = select(Connection.status, func.count()).group_by(Connection.status)
        return {status: count for status, count in (await self._db.execute(stmt)).all()}

    async def marked_since(self, since: datetime, event_type: str) -> list[str]:
        """Public ids of the connections still reauthorization_required whose `event_type`
        event (the one recorded with the marking, in its transaction) is from `since` on;
        oldest connection first. As far back as the outbox keeps events."""
        marked = select(WebhookEvent.connection_id).where(
            WebhookEvent.type == event_type, WebhookEvent.created_at >= since
        )
        stmt = (
            select(Connection.public_id)
            .where(
                Connection.status == ConnectionStatus.REAUTHORIZATION_REQUIRED,
                Connection.public_id.in_(marked),
            )
            .order_by(Connection.id)
        )
        return list((await self._db.execute(stmt)).scalars())


class SchemaRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def version(self) -> str | None:
        """The Alembic revision the database is at (None before any migration)."""
        try:
            result = await self._db.execute(text("SELECT version_num FROM alembic_version"))
        except ProgrammingError:  # the table does not exist yet (PostgreSQL)
            return None
        except OperationalError as e:  # the same on SQLite; anything else is real trouble
            if "no such table" in str(e):
                return None
            raise
        return result.scalar_one_or_none()


class SessionRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, session: AuthSession) -> AuthSession:
        self._db.add(session)
        await self._db.flush()
        return session

    async def get_active(self, id_hash: str, now: datetime) -> AuthSession | None:
        stmt = (
            select(AuthSession)
            .options(joinedload(AuthSession.connection))
            .where(AuthSession.id_hash == id_hash, AuthSession.expires_at > now)
        )
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def versions(self, id_hashes: list[str], now: datetime) -> dict[str, tuple[str, int]]:
        """Id hash -> (its connection's public id, row version) of those of `id_hashes`
        that are live sessions."""
        stmt = (
            select(AuthSession.id_hash, Connection.public_id, Connection.version)
            .join(AuthSession.connection)
            .where(AuthSession.id_hash.in_(id_hashes), AuthSession.expires_at > now)
        )
        return {
            id_hash: (public_id, version)
            for id_hash, public_id, version in await self._db.execute(stmt)
        }

    async def delete(self, id_hash: str) -> bool:
        result = await self._db.execute(delete(AuthSession).where(AuthSession.id_hash == id_hash))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def delete_expired(self, now: datetime) -> int:
        result = await self._db.execute(delete(AuthSession).where(AuthSession.expires_at <= now))
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def evict_oldest(self, connection_id: int, *, keep: int) -> list[str]:
        """Delete the connection's sessions beyond its `keep` newest; their id hashes.

        Sessions all live equally long, so the newest are the last to expire. SKIP
        LOCKED (PostgreSQL) leaves rows another transaction is deleting to it, so
        concurrent evictions and purges never wait on, or deadlock with, each other.
        """
        excess = (
            select(AuthSession.id_hash)
            .where(AuthSession.connection_id == connection_id)
            .order_by(AuthSession.expires_at.desc(), AuthSession.id_hash.desc())
            .offset(keep)
            .with_for_update(skip_locked=True)
        )
        evicted = list((await self._db.execute(excess)).scalars())
        if evicted:
            await self._db.execute(delete(AuthSession).where(AuthSession.id_hash.in_(evicted)))
        return evicted


class LoginStateRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, state: LoginState) -> None:
        self._db.add(state)
        await self._db.flush()

    async def consume(self, nonce_hash: str, now: datetime) -> LoginState | None:
        """Delete the pending login and return it; None for everyone but the one caller
        that deleted a live row.

        A single DELETE is atomic on every backend, so two callbacks racing with the
        same state (or two replicas) cannot both succeed.
        """
        stmt = (
            delete(LoginState)
            .where(LoginState.nonce_hash == nonce_hash, LoginState.expires_at > now)
            .returning(LoginState.end_user_id)
        )
        row = (await self._db.execute(stmt)).one_or_none()
        if row is None:
            return None
        return LoginState(nonce_hash=nonce_hash, end_user_id=row.end_user_id)

    async def delete_expired(self, now: datetime) -> int:
        result = await self._db.execute(delete(LoginState).where(LoginState.expires_at <= now))
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def evict_oldest(self, *, keep: int) -> int:
        """Delete every pending login but the `keep` newest (all live equally long).

        SKIP LOCKED (PostgreSQL): logins started at once each trim what no other is
        trimming, instead of queueing or deadlocking on the same rows; the table may
        pass `keep` by the number of logins in flight, until the next one trims it.
        """
        excess = (
            select(LoginState.nonce_hash)
            .order_by(LoginState.expires_at.desc(), LoginState.nonce_hash.desc())
            .offset(keep)
            .with_for_update(skip_locked=True)
        )
        result = await self._db.execute(delete(LoginState).where(LoginState.nonce_hash.in_(excess)))
        return int(result.rowcount)  # type: ignore[attr-defined]


class ApiKeyRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, key: ApiKey) -> ApiKey:
        self._db.add(key)
        await self._db.flush()
        return key

    async def get_active(self, key_hash: str) -> ApiKey | None:
        stmt = select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def all(self) -> list[ApiKey]:
        return list((await self._db.execute(select(ApiKey).order_by(ApiKey.id))).scalars())

    async def revoke(self, name: str, now: datetime) -> bool:
        result = await self._db.execute(
            update(ApiKey)
            .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def touch(self, key_hash: str, now: datetime) -> None:
        await self._db.execute(
            update(ApiKey).where(ApiKey.key_hash == key_hash).values(last_used_at=now)
        )


class ConnectSessionRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, session: ConnectSession) -> None:
        self._db.add(session)
        await self._db.flush()

    async def consume(self, token_hash: str, now: datetime) -> ConnectSession | None:
        """Delete a live connect session and return it; None for everyone but the one
        caller that deleted it (a single DELETE … RETURNING is atomic everywhere)."""
        stmt = (
            delete(ConnectSession)
            .where(ConnectSession.token_hash == token_hash, ConnectSession.expires_at > now)
            .returning(ConnectSession.end_user_id, ConnectSession.return_to)
        )
        row = (await self._db.execute(stmt)).one_or_none()
        if row is None:
            return None
        return ConnectSession(
            token_hash=token_hash, end_user_id=row.end_user_id, return_to=row.return_to
        )

    async def delete_expired(self, now: datetime) -> int:
        result = await self._db.execute(
            delete(ConnectSession).where(ConnectSession.expires_at <= now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


class ConnectResultRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, result: ConnectResult) -> None:
        self._db.add(result)
        await self._db.flush()

    async def consume(self, result_hash: str, now: datetime) -> ConnectResult | None:
        """Delete a live result and return it; None for everyone but the one caller that
        deleted it (a single DELETE … RETURNING is atomic everywhere)."""
        r = ConnectResult
        stmt = (
            delete(r)
            .where(r.result_hash == result_hash, r.expires_at > now)
            .returning(
                r.end_user_id,
                r.connection_id,
                r.expires_at,
                r.username,
                r.scopes,
                r.access_token_encrypted,
                r.refresh_token_encrypted,
                r.access_token_expires_at,
                r.refresh_token_expires_at,
            )
        )
        row = (await self._db.execute(stmt)).one_or_none()
        if row is None:
            return None
        return ConnectResult(result_hash=result_hash, **row._asdict())

    async def delete_expired(self, now: datetime) -> tuple[int, int]:
        """Delete the pending connections no live result can confirm any more (with their
        tokens, sessions-free by construction), then the expired results; both counts.

        A pending row another login is renewing meanwhile comes with a new live result
        in the same transaction, so it is either seen with it or not seen at all.
        """
        live = (
            select(ConnectResult.result_hash)
            .where(
                ConnectResult.connection_id == Connection.id,
                ConnectResult.expires_at > now,
            )
            .exists()
        )
        connections = await self._db.execute(
            delete(Connection)
            .where(Connection.status == ConnectionStatus.PENDING, ~live)
            .execution_options(synchronize_session=False)
        )
        results = await self._db.execute(
            delete(ConnectResult).where(ConnectResult.expires_at <= now)
        )
        return (
            int(connections.rowcount),  # type: ignore[attr-defined]
            int(results.rowcount),  # type: ignore[attr-defined]
        )


class ProxyTokenRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, token: ProxyToken) -> None:
        self._db.add(token)
        await self._db.flush()

    async def get_active(self, token_hash: str, now: datetime) -> ProxyToken | None:
        """The live token with its connection (one query); None if unknown or expired.

        A deleted connection took its tokens with it (ON DELETE CASCADE), so a token
        found here always has its connection.
        """
        stmt = (
            select(ProxyToken)
            .options(joinedload(ProxyToken.connection))
            .where(ProxyToken.token_hash == token_hash, ProxyToken.expires_at > now)
        )
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def delete_expired(self, now: datetime) -> int:
        result = await self._db.execute(delete(ProxyToken).where(ProxyToken.expires_at <= now))
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def revoke(self, connection_id: int, public_id: str) -> str | None:
        """Delete the connection's token named `public_id`; its hash, or None if the
        connection has no such token."""
        stmt = select(ProxyToken.token_hash).where(
            ProxyToken.public_id == public_id, ProxyToken.connection_id == connection_id
        )
        token_hash = (await self._db.execute(stmt)).scalar_one_or_none()
        if token_hash is None:
            return None
        await self._db.execute(delete(ProxyToken).where(ProxyToken.token_hash == token_hash))
        return token_hash

    async def revoke_all(self, connection_id: int) -> int:
        """Delete every token of the connection; how many there were."""
        stmt = delete(ProxyToken).where(ProxyToken.connection_id == connection_id)
        result = await self._db.execute(stmt)
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def live(self, token_hashes: list[str], now: datetime) -> dict[str, str]:
        """Of `token_hashes`, the tokens still stored and unexpired, as hash -> their
        connection's public id (one query): what revalidation confirms."""
        stmt = (
            select(ProxyToken.token_hash, Connection.public_id)
            .join(Connection, ProxyToken.connection_id == Connection.id)
            .where(ProxyToken.token_hash.in_(token_hashes), ProxyToken.expires_at > now)
        )
        return {token_hash: public_id for token_hash, public_id in await self._db.execute(stmt)}


class KeeperRepository:
    """The keeper's queries (keeper.py). None of them bumps a row's version."""

    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def claim_due(
        self, now: datetime, horizon: datetime, claim_until: datetime, limit: int
    ) -> list[Connection]:
        """Claim up to `limit` active connections whose refresh token expires by `horizon`
        and that no keeper holds or has put off; the soonest to expire first.

        One UPDATE, so it is atomic on every backend. SKIP LOCKED (PostgreSQL) lets keepers
        on other replicas claim other rows instead of queueing behind these; a row another
        keeper claimed meanwhile fails the re-checked WHERE.
        """
        c = _connections.c
        free = or_(c.keeper_not_before.is_(None), c.keeper_not_before <= now)
        due = (
            select(c.id)
            .where(
                c.status == ConnectionStatus.ACTIVE,
                c.refresh_token_expires_at.is_not(None),
                c.refresh_token_expires_at <= horizon,
                free,
            )
            .order_by(c.refresh_token_expires_at, c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claimed = (
            await self._db.execute(
                update(_connections)
                .where(c.id.in_(due.scalar_subquery()), free)
                .values(keeper_not_before=claim_until)
                .returning(c.id)
            )
        ).scalars()
        ids = list(claimed)
        if not ids:
            return []
        stmt = select(Connection).where(Connection.id.in_(ids))
        return list((await self._db.execute(stmt)).scalars())

    async def dead_leases(self, now: datetime, limit: int) -> list[Connection]:
        """Active connections whose refresh lease ran out with no result stored: every
        outcome its holder stores, and its holder letting go, clears the lease."""
        c = _connections.c
        stmt = (
            select(Connection)
            .where(
                Connection.status == ConnectionStatus.ACTIVE,
                Connection.refresh_lease_owner.is_not(None),
                Connection.refresh_lease_until < now,
            )
            .order_by(c.refresh_lease_until, c.id)
            .limit(limit)
        )
        return list((await self._db.execute(stmt)).scalars())

    async def soonest_lease_end(self, now: datetime) -> datetime | None:
        """When the first refresh lease still running on an active connection runs out."""
        c = _connections.c
        stmt = select(func.min(c.refresh_lease_until)).where(
            c.status == ConnectionStatus.ACTIVE,
            c.refresh_lease_owner.is_not(None),
            c.refresh_lease_until >= now,
        )
        end: datetime | None = (await self._db.execute(stmt)).scalar_one()
        return end

    async def restore_dead_lease(self, seen: Connection) -> None:
        """Put back the dead lease `seen` had, if nothing happened to the row since but a
        lease taken and let go (so the next pass tries again)."""
        c = _connections.c
        await self._db.execute(
            update(_connections)
            .where(
                c.public_id == seen.public_id,
                c.version == seen.version,
                c.refresh_lease_owner.is_(None),
            )
            .values(
                refresh_lease_owner=seen.refresh_lease_owner,
                refresh_lease_until=seen.refresh_lease_until,
            )
        )

    async def schedule(self, public_id: str, not_before: datetime | None, **values: Any) -> None:
        """Put the connection off until `not_before` (None: until it is due again)."""
        await self._db.execute(
            update(_connections)
            .where(_connections.c.public_id == public_id)
            .values(keeper_not_before=not_before, **values)
        )

    async def soonest(self, limit: int) -> list[Connection]:
        """The active connections whose refresh tokens expire first."""
        stmt = (
            select(Connection)
            .where(
                Connection.status == ConnectionStatus.ACTIVE,
                Connection.refresh_token_expires_at.is_not(None),
            )
            .order_by(Connection.refresh_token_expires_at)
            .limit(limit)
        )
        return list((await self._db.execute(stmt)).scalars())


class SecretRepository:
    """Key rotation's queries (rotation.py): the encrypted columns, page by page."""

    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    _COLUMNS = (
        _connections.c.id,
        _connections.c.public_id,
        _connections.c.version,
        _connections.c.status,
        _connections.c.access_token_encrypted,
        _connections.c.refresh_token_encrypted,
    )

    async def page(self, after: int, limit: int) -> list[Any]:
        c = _connections.c
        stmt = select(*self._COLUMNS).where(c.id > after).order_by(c.id).limit(limit)
        return list((await self._db.execute(stmt)).all())

    async def by_public_ids(self, public_ids: list[str]) -> list[Any]:
        stmt = select(*self._COLUMNS).where(_connections.c.public_id.in_(public_ids))
        return list((await self._db.execute(stmt)).all())

    async def reencrypt(self, public_id: str, version: int, values: dict[str, Any]) -> bool:
        """Write re-encrypted ciphertexts if the row is still at `version`.

        The version is compared but not bumped: the tokens are the same, so a refresh that
        started from this version must still be able to store its answer over it.
        """
        c = _connections.c
        result = await self._db.execute(
            update(_connections)
            .where(c.public_id == public_id, c.version == version)
            .values(values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


class WebhookEventRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def add(self, event: WebhookEvent) -> WebhookEvent:
        self._db.add(event)
        await self._db.flush()
        return event

    async def claim_due(
        self, now: datetime, owner: str, until: datetime, limit: int
    ) -> list[WebhookEvent]:
        """Lease up to `limit` due events to `owner`, each the oldest pending one of its
        connection (so one connection's events go out in order), and return them.

        SKIP LOCKED (PostgreSQL): replicas scanning together each take what no other is
        taking instead of queueing; the UPDATE's WHERE re-checks the lease, so an event
        is leased to one dispatcher at a time on every backend.
        """
        e = WebhookEvent
        older = aliased(WebhookEvent)
        # Behind an earlier undelivered event of its connection (in flight, waiting for a
        # retry, or due), or beside one of its connection in flight (a later one, when an
        # earlier one was sent again): one delivery per connection at a time, in order.
        blocked = (
            select(older.id)
            .where(
                older.connection_id == e.connection_id,
                older.status == WebhookEventStatus.PENDING,
                or_(older.id < e.id, older.lease_until >= now),
            )
            .exists()
        )
        free = or_(e.lease_until.is_(None), e.lease_until < now)
        due = (
            select(e.id)
            .where(e.status == WebhookEventStatus.PENDING, e.next_attempt_at <= now, free, ~blocked)
            .order_by(e.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ids = list((await self._db.execute(due)).scalars())
        if not ids:
            return []
        await self._db.execute(
            update(e)
            .where(e.id.in_(ids), e.status == WebhookEventStatus.PENDING, free)
            .values(lease_owner=owner, lease_until=until)
            .execution_options(synchronize_session=False)
        )
        claimed = select(e).where(e.id.in_(ids), e.lease_owner == owner).order_by(e.id)
        return list((await self._db.execute(claimed)).scalars())

    async def finish_attempt(
        self, event_id: int, owner: str, values: dict[str, Any], attempt: WebhookAttempt
    ) -> None:
        """Record an attempt and its outcome on the event, and let the lease go."""
        self._db.add(attempt)
        await self._db.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id, WebhookEvent.lease_owner == owner)
            .values(
                {**values, "attempts": WebhookEvent.attempts + 1, "lease_owner": None}
                | {"lease_until": None}
            )
            .execution_options(synchronize_session=False)
        )
        await self._db.flush()

    async def get(self, public_id: str) -> WebhookEvent | None:
        stmt = select(WebhookEvent).where(WebhookEvent.public_id == public_id)
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def attempts(self, event_id: int) -> list[WebhookAttempt]:
        stmt = (
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id == event_id)
            .order_by(WebhookAttempt.id)
        )
        return list((await self._db.execute(stmt)).scalars())

    async def page(
        self, *, limit: int, before: int | None = None, status: WebhookEventStatus | None = None
    ) -> list[WebhookEvent]:
        """Up to `limit` events, newest first, older than the key `before`."""
        stmt = select(WebhookEvent).order_by(WebhookEvent.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(WebhookEvent.status == status)
        if before is not None:
            stmt = stmt.where(WebhookEvent.id < before)
        return list((await self._db.execute(stmt)).scalars())

    async def delete_retired(self, before: datetime) -> int:
        """Delete events (and their attempts) that could last be retried before `before`."""
        result = await self._db.execute(
            delete(WebhookEvent).where(WebhookEvent.retry_until < before)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def redeliver_failed(
        self, since: datetime | None, now: datetime, retry_until: datetime
    ) -> tuple[int, int]:
        """Make every failed event (created at or after `since`) due now with a fresh
        retry window; how many events, of how many connections. The dispatcher sends
        each connection's in id order: a later one waits while an earlier one is pending."""
        e = WebhookEvent
        which = e.status == WebhookEventStatus.FAILED
        if since is not None:
            which = and_(which, e.created_at >= since)
        rows = (
            await self._db.execute(
                update(e)
                .where(which)
                .values(
                    status=WebhookEventStatus.PENDING,
                    next_attempt_at=now,
                    retry_until=retry_until,
                    last_error=None,
                )
                .returning(e.connection_id)
                .execution_options(synchronize_session=False)
            )
        ).scalars()
        connections = list(rows)
        return len(connections), len(set(connections))

    async def redeliver(self, public_id: str, now: datetime, retry_until: datetime) -> bool:
        """Make the event due now, with a fresh retry window; False if there is none."""
        result = await self._db.execute(
            update(WebhookEvent)
            .where(WebhookEvent.public_id == public_id)
            .values(
                status=WebhookEventStatus.PENDING,
                next_attempt_at=now,
                retry_until=retry_until,
                last_error=None,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]
