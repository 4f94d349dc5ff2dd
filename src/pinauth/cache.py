"""In-process caches that keep the database and Fernet off the proxy's hot path.

Every entry is keyed by a connection's public id, which is random and never reused, so no
entry can ever answer for another connection's row. Entries are dropped on logout,
disconnect and delete, and a load that was already running when that happened cannot put
them back.
"""

from __future__ import annotations

from cachetools import LRUCache, TTLCache

from pinauth.models import Connection

MAX_ENTRIES = 10_000
# How long a deleted connection's id stays on the list of the dead: far longer than any
# load, refresh or request can be in flight. Public ids are never reused, so a tombstone
# that outlives this would only ever match the same dead connection.
TOMBSTONE_SECONDS = 3600


class ConnectionCache:
    """Session → connection, connection → newest row seen, and decrypted access tokens.

    Sessions and rows expire after `ttl` seconds, which bounds how long another replica's
    logout, disconnect or refresh can go unnoticed here. Each decrypted access token is
    kept beside the ciphertext it came from and served only for a row carrying that very
    ciphertext, so a refresh anywhere makes the old entry unusable.
    """

    def __init__(self, ttl: float) -> None:
        self._enabled = ttl > 0
        ttl = max(ttl, 0.001)
        self._sessions: TTLCache[str, str] = TTLCache(MAX_ENTRIES, ttl)
        self._connections: TTLCache[str, Connection] = TTLCache(MAX_ENTRIES, ttl)
        self._tokens: LRUCache[str, tuple[str, str]] = LRUCache(MAX_ENTRIES)
        self._deleted: TTLCache[str, bool] = TTLCache(MAX_ENTRIES, TOMBSTONE_SECONDS)
        # Bumped by every logout and disconnect. A session load remembers its result only
        # if nothing was forgotten while it ran: it may have read a row just deleted.
        self._generation = 0

    # --- sessions ----------------------------------------------------------------------

    def connection_for_session(self, session_hash: str) -> Connection | None:
        public_id = self._sessions.get(session_hash)
        return None if public_id is None else self._connections.get(public_id)

    def generation(self) -> int:
        """Take before a session load; pass to `remember_session` after it."""
        return self._generation

    def remember_session(self, session_hash: str, connection: Connection, generation: int) -> None:
        if not self._enabled or generation != self._generation:
            return
        if self.remember_connection(connection):
            self._sessions[session_hash] = connection.public_id

    def forget_session(self, session_hash: str) -> None:
        self._generation += 1
        self._sessions.pop(session_hash, None)

    # --- connections -------------------------------------------------------------------

    def remember_connection(self, connection: Connection) -> bool:
        """Keep the newest version seen; an older row read late must not win.

        False if the connection was deleted: nothing may bring it back.
        """
        public_id = connection.public_id
        if not self._enabled or public_id in self._deleted:
            return False
        cached = self._connections.get(public_id)
        if cached is None or cached.version <= connection.version:
            self._connections[public_id] = connection
        return True

    def cached_connection(self, public_id: str) -> Connection | None:
        return self._connections.get(public_id)

    def forget_connection(self, public_id: str) -> None:
        """The connection is gone: drop its row and token, and refuse to cache it again.

        Its sessions' entries now resolve to nothing and are re-read (and found deleted).
        """
        self._generation += 1
        self._deleted[public_id] = True
        self._connections.pop(public_id, None)
        self._tokens.pop(public_id, None)

    def is_deleted(self, public_id: str) -> bool:
        return public_id in self._deleted

    # --- tokens ------------------------------------------------------------------------

    def access_token(self, connection: Connection) -> str | None:
        entry = self._tokens.get(connection.public_id)
        if entry is None or entry[0] != connection.access_token_encrypted:
            return None
        return entry[1]

    def remember_access_token(self, connection: Connection, token: str) -> None:
        if connection.public_id not in self._deleted:
            self._tokens[connection.public_id] = (connection.access_token_encrypted, token)
