"""Connections by public id: what the connections API and the server-side proxy act on."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pinauth.cache import ConnectionCache
from pinauth.crypto import CursorCodec, cursor_binding
from pinauth.errors import ConnectionNotFound, InvalidCursor
from pinauth.models import Connection, ConnectionStatus, ConnectionSummary
from pinauth.repository import ConnectionRepository
from pinauth.webhooks import EventType, record_event

log = logging.getLogger(__name__)


class ConnectionService:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        cache: ConnectionCache,
        cursors: CursorCodec,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._cache = cache
        # Cursors carry a position in the key order, encrypted: the integer key never
        # leaves the process, and a cursor survives the deletion of the row it came from.
        self._cursors = cursors

    async def get(self, public_id: str) -> Connection:
        """The connection to act for, from the cache on the hot path; ConnectionNotFound if
        none, or if it is pending (nobody may act for it before the backend confirms it)."""
        cached = self._cache.cached_connection(public_id)
        if cached is not None:
            return cached
        async with self._sessionmaker() as db:
            connection = await ConnectionRepository(db).get(public_id)
        if connection is None or connection.status is ConnectionStatus.PENDING:
            raise ConnectionNotFound()
        self._cache.remember_connection(connection)
        return connection

    async def read(self, public_id: str) -> Connection:
        """The connection as stored now (no cache): what the API shows."""
        async with self._sessionmaker() as db:
            connection = await ConnectionRepository(db).get(public_id)
        if connection is None:
            raise ConnectionNotFound()
        return connection

    async def page(
        self,
        *,
        limit: int,
        cursor: str | None,
        end_user_id: str | None,
        status: ConnectionStatus | None,
    ) -> tuple[list[ConnectionSummary], str | None]:
        """A page of connections and the cursor of the next (None on the last page)."""
        # The next page's cursor is for this listing with these very filters.
        binding = cursor_binding(
            "connections", end_user_id=end_user_id, status=None if status is None else status.value
        )
        after = None if cursor is None else self._position(cursor, binding)
        async with self._sessionmaker() as db:
            rows = await ConnectionRepository(db).page(
                limit=limit + 1, after=after, end_user_id=end_user_id, status=status
            )
        if len(rows) > limit:
            return rows[:limit], self._cursors.dumps(rows[limit - 1].id, binding)
        return rows, None

    def _position(self, cursor: str, binding: str) -> int:
        position = self._cursors.loads(cursor, binding)
        if position is None:
            raise InvalidCursor()
        return position

    async def delete(self, public_id: str) -> None:
        """Delete the connection's tokens and end every session that used it."""
        async with self._sessionmaker() as db, db.begin():
            connections = ConnectionRepository(db)
            stored = await connections.get(public_id)
            if stored is None:
                raise ConnectionNotFound()
            # The app never heard of a pending connection (no connection.created). The
            # event goes first: its sequence is counted on the row the delete removes.
            if stored.status is not ConnectionStatus.PENDING:
                await record_event(db, EventType.DELETED, stored)
            await connections.delete(stored)
        # After the commit, so that a load or refresh that read the row before the delete
        # is older than the forgetting; the tombstone stops it caching the row again.
        self._cache.forget_connection(public_id)
        log.info("connection %s deleted", public_id)
