"""In-process caches that keep the database and Fernet off the proxy's hot path.

Every entry is keyed by a connection's public id, which is random and never reused, so no
entry can ever answer for another connection's row. Entries are dropped on logout,
disconnect and delete, and a load that was already running when that happened cannot put
them back.

Entries in use are kept alive by revalidation (revalidation.py): one query per batch of
them confirms each is still what the database holds, instead of one query per entry as
each expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import LRUCache, TTLCache

from pinauth.models import Connection

MAX_ENTRIES = 10_000
# How long a deleted connection's id stays on the list of the dead: far longer than any
# load, refresh or request can be in flight. Public ids are never reused, so a tombstone
# that outlives this would only ever match the same dead connection.
TOMBSTONE_SECONDS = 3600


class ConnectionCache:
    """Session → connection, connection → newest row seen, proxy token → connection, and
    decrypted access tokens.

    Sessions and rows expire after `ttl` seconds, which bounds how long another replica's
    logout, disconnect or refresh can go unnoticed here. Each decrypted access token is
    kept beside the ciphertext it came from and served only for a row carrying that very
    ciphertext, so a refresh anywhere makes the old entry unusable.
    """

    def __init__(self, ttl: float, *, timer: Callable[[], float] = time.monotonic) -> None:
        self._enabled = ttl > 0
        ttl = max(ttl, 0.001)
        self._sessions: TTLCache[str, str] = TTLCache(MAX_ENTRIES, ttl, timer)
        self._connections: TTLCache[str, Connection] = TTLCache(MAX_ENTRIES, ttl, timer)
        self._tokens: LRUCache[str, tuple[str, str]] = LRUCache(MAX_ENTRIES)
        self._deleted: TTLCache[str, bool] = TTLCache(MAX_ENTRIES, TOMBSTONE_SECONDS, timer)
        # Proxy token hash -> (its connection's public id, the token's expiry as Unix
        # seconds). Kept a TTL like the rest, so that a token revoked on another replica
        # is refused here within the TTL; revalidation renews the entries in use.
        self._proxy_tokens: TTLCache[str, tuple[str, float]] = TTLCache(MAX_ENTRIES, ttl, timer)
        # Bumped by every logout and disconnect. A session load remembers its result only
        # if nothing was forgotten while it ran: it may have read a row just deleted.
        self._generation = 0
        # Entries served since the last revalidation: only these are worth confirming.
        self._used_sessions: set[str] = set()
        self._used_connections: set[str] = set()
        self._used_proxy_tokens: set[str] = set()

    # --- sessions ----------------------------------------------------------------------

    def connection_for_session(self, session_hash: str) -> Connection | None:
        public_id = self._sessions.get(session_hash)
        if public_id is None:
            return None
        connection = self._connections.get(public_id)
        if connection is not None:
            self._used_sessions.add(session_hash)
        return connection

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
        connection = self._connections.get(public_id)
        if connection is not None:
            self._used_connections.add(public_id)
        return connection

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

    # --- proxy tokens ------------------------------------------------------------------

    def proxy_token(self, token_hash: str) -> tuple[str, float] | None:
        """(connection's public id, expiry) of a token verified within the TTL."""
        entry = self._proxy_tokens.get(token_hash)
        if entry is not None:
            self._used_proxy_tokens.add(token_hash)
        return entry

    def remember_proxy_token(
        self, token_hash: str, connection: Connection, expires_at: float, generation: int
    ) -> None:
        """Keep a token just read, unless a revocation (or any forgetting) happened while
        it was read: the row may be one just deleted."""
        if not self._enabled or generation != self._generation:
            return
        if self.remember_connection(connection):
            self._proxy_tokens[token_hash] = (connection.public_id, expires_at)

    def forget_proxy_token(self, token_hash: str) -> None:
        """The token was revoked here: refuse it from now on."""
        self._generation += 1
        self._proxy_tokens.pop(token_hash, None)

    def forget_proxy_tokens(self, public_id: str) -> None:
        """Every token of the connection was revoked here. A scan of at most MAX_ENTRIES,
        for a rare call, rather than an index kept up to date on every use."""
        self._generation += 1
        for token_hash, (owner, _) in list(self._proxy_tokens.items()):
            if owner == public_id:
                self._proxy_tokens.pop(token_hash, None)

    def drop_proxy_token(self, token_hash: str) -> None:
        """The token expired, or the database no longer holds it (revoked elsewhere)."""
        self._proxy_tokens.pop(token_hash, None)

    def take_used_proxy_tokens(self) -> dict[str, str]:
        """Tokens served since the last call, as hash -> connection's public id."""
        used = {
            token_hash: entry[0]
            for token_hash in self._used_proxy_tokens
            if (entry := self._proxy_tokens.get(token_hash)) is not None
        }
        self._used_proxy_tokens.clear()
        return used

    def confirm_proxy_token(self, token_hash: str, public_id: str) -> None:
        """The database still holds this live token for this connection: keep it another
        TTL (only if still here: never brings back one revoked meanwhile)."""
        entry = self._proxy_tokens.get(token_hash)
        if entry is not None and entry[0] == public_id:
            self._proxy_tokens[token_hash] = entry

    # --- revalidation --------------------------------------------------------------------

    def take_used(self) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
        """The entries served since the last call, to confirm against the database.

        Sessions as hash -> (public id, row version), connections as public id -> row
        version; entries that expired or were dropped meanwhile are left out.
        """
        sessions: dict[str, tuple[str, int]] = {}
        for session_hash in self._used_sessions:
            public_id = self._sessions.get(session_hash)
            connection = None if public_id is None else self._connections.get(public_id)
            if connection is not None:
                sessions[session_hash] = (connection.public_id, connection.version)
        connections = {
            public_id: connection.version
            for public_id in self._used_connections
            if (connection := self._connections.get(public_id)) is not None
        }
        self._used_sessions.clear()
        self._used_connections.clear()
        return sessions, connections

    def confirm_session(self, session_hash: str, public_id: str, version: int) -> None:
        """The database still holds this session, for this connection at this version:
        keep both entries another TTL.

        Only entries still here are renewed, never re-added: one dropped while the
        confirming query ran (a logout, a delete) stays dropped. A different version
        means a refresh happened somewhere; the entries then run out and are re-read.
        """
        if self._sessions.get(session_hash) != public_id:
            return
        if self.confirm_connection(public_id, version):
            self._sessions[session_hash] = public_id

    def confirm_connection(self, public_id: str, version: int) -> bool:
        """Keep the connection's entry another TTL if it still holds this version."""
        connection = self._connections.get(public_id)
        if connection is None or connection.version != version:
            return False
        self._connections[public_id] = connection
        return True

    def drop_session(self, session_hash: str) -> None:
        """The database no longer holds this session (a logout elsewhere, or expiry)."""
        self._sessions.pop(session_hash, None)

    # --- tokens ------------------------------------------------------------------------

    def access_token(self, connection: Connection) -> str | None:
        entry = self._tokens.get(connection.public_id)
        if entry is None or entry[0] != connection.access_token_encrypted:
            return None
        return entry[1]

    def remember_access_token(self, connection: Connection, token: str) -> None:
        if connection.public_id not in self._deleted:
            self._tokens[connection.public_id] = (connection.access_token_encrypted, token)
