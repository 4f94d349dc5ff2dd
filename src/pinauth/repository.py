"""Every database query pinauth makes. Repositories flush; the unit of work's owner commits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from pinauth.models import AuthSession, Connection, ConnectionStatus, LoginState


class ConnectionRepository:
    def __init__(self, db: AsyncSession) -> None:
        self._db = db

    async def get(self, public_id: str) -> Connection | None:
        stmt = select(Connection).where(Connection.public_id == public_id)
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def get_for_update(self, public_id: str, *, lock_timeout: float) -> Connection | None:
        """Read the row under a lock held until commit: the cross-replica refresh arbiter.

        On PostgreSQL this is `SELECT … FOR UPDATE` with a bounded wait; SQLite has no
        row locks (and is single-process), so there the version counter's
        compare-and-swap on UPDATE is the guard.
        """
        if self._db.get_bind().dialect.name == "postgresql":
            # SET does not take bind parameters; the value is a float we formatted.
            await self._db.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'"))
        stmt = (
            select(Connection)
            .where(Connection.public_id == public_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def get_by_pinterest_user(self, pinterest_user_id: str) -> Connection | None:
        stmt = select(Connection).where(Connection.pinterest_user_id == pinterest_user_id)
        return (await self._db.execute(stmt)).scalar_one_or_none()

    async def add(self, connection: Connection) -> Connection:
        self._db.add(connection)
        await self._db.flush()
        return connection

    async def delete(self, connection: Connection) -> None:
        await self._db.delete(connection)
        await self._db.flush()

    async def count_by_status(self) -> dict[ConnectionStatus, int]:
        stmt = select(Connection.status, func.count()).group_by(Connection.status)
        return {status: count for status, count in (await self._db.execute(stmt)).all()}


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

    async def consume(self, nonce_hash: str, now: datetime) -> bool:
        """Delete the pending login; True only for the one caller that deleted a live row.

        A single DELETE is atomic on every backend, so two callbacks racing with the
        same state (or two replicas) cannot both succeed.
        """
        result = await self._db.execute(
            delete(LoginState).where(
                LoginState.nonce_hash == nonce_hash, LoginState.expires_at > now
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

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
