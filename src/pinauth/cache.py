"""In-process caches that keep the database and Fernet off the proxy's hot path."""

from __future__ import annotations

from cachetools import LRUCache, TTLCache

from pinauth.models import Connection

MAX_ENTRIES = 10_000


class ConnectionCache:
    """Session → connection id, connection id → connection row, and decrypted tokens.

    Sessions and rows expire after `ttl` seconds, which bounds how long another replica's
    logout, disconnect or refresh can go unnoticed here. Decrypted access tokens are keyed
    by (connection id, version), so a refresh anywhere makes the old entry unreachable.
    """

    def __init__(self, ttl: float) -> None:
        self._enabled = ttl > 0
        ttl = max(ttl, 0.001)
        self._sessions: TTLCache[str, int] = TTLCache(MAX_ENTRIES, ttl)
        self._connections: TTLCache[int, Connection] = TTLCache(MAX_ENTRIES, ttl)
        self._tokens: LRUCache[tuple[int, int], str] = LRUCache(MAX_ENTRIES)

    def connection_for_session(self, session_hash: str) -> Connection | None:
        connection_id = self._sessions.get(session_hash)
        return None if connection_id is None else self._connections.get(connection_id)

    def remember_session(self, session_hash: str, connection: Connection) -> None:
        if self._enabled:
            self._sessions[session_hash] = connection.id
            self.remember_connection(connection)

    def remember_connection(self, connection: Connection) -> None:
        """Keep the newest version seen; an older row read late must not win."""
        if not self._enabled:
            return
        cached = self._connections.get(connection.id)
        if cached is None or cached.version <= connection.version:
            self._connections[connection.id] = connection

    def cached_connection(self, connection_id: int) -> Connection | None:
        return self._connections.get(connection_id)

    def forget_session(self, session_hash: str) -> None:
        self._sessions.pop(session_hash, None)

    def forget_connection(self, connection_id: int) -> None:
        self._connections.pop(connection_id, None)

    def access_token(self, connection: Connection) -> str | None:
        return self._tokens.get((connection.id, connection.version))

    def remember_access_token(self, connection: Connection, token: str) -> None:
        self._tokens[(connection.id, connection.version)] = token
