"""Database schema: Pinterest connections, browser sessions and pending logins."""

from __future__ import annotations

import base64
import enum
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Explicit constraint names keep Alembic migrations deterministic on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class ConnectionStatus(enum.StrEnum):
    ACTIVE = "active"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    # Made through a connect session and not yet confirmed by the app's backend
    # (POST /v1/connections/confirm): never served, listed only when asked for.
    PENDING = "pending"


CONNECTION_ID_PREFIX = "conn_"
PROXY_TOKEN_ID_PREFIX = "pt_"


def new_public_id(prefix: str = CONNECTION_ID_PREFIX) -> str:
    """A random, never-reused id (128 bits, base32) for the API, logs and caches."""
    return prefix + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


class Connection(Base):
    """A Pinterest account linked to pinauth, with its (encrypted) token pair."""

    __tablename__ = "connections"
    __table_args__ = (
        # One connection per (app end user, Pinterest account); logins without an end
        # user (the browser-only flow) keep one connection per Pinterest account.
        Index(
            "uq_connections_end_user_id_pinterest_user_id",
            "end_user_id",
            "pinterest_user_id",
            unique=True,
        ),
        Index(
            "uq_connections_pinterest_user_id_browser_only",
            "pinterest_user_id",
            unique=True,
            sqlite_where=text("end_user_id IS NULL"),
            postgresql_where=text("end_user_id IS NULL"),
        ),
        # Keyset pagination of the connections API, filtered or not.
        Index("ix_connections_end_user_id_id", "end_user_id", "id"),
        Index("ix_connections_status_id", "status", "id"),
        # Both filters at once (SQLite, without statistics, would otherwise walk the
        # status index across every connection in that status).
        Index("ix_connections_end_user_id_status_id", "end_user_id", "status", "id"),
        # The keeper's query: active connections by refresh-token expiry.
        Index(
            "ix_connections_status_refresh_token_expires_at", "status", "refresh_token_expires_at"
        ),
        # SQLite would otherwise hand a deleted row's id to the next insert; nothing keyed
        # by the old id may ever resolve to a new user's row.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # What leaves the process (logs, caches, later the API) is this random id; the
    # integer key is for joins only.
    public_id: Mapped[str] = mapped_column(String(40), unique=True, default=new_public_id)
    # The app's own user who linked this account through a connect session; None for
    # logins that came straight from a browser.
    end_user_id: Mapped[str | None] = mapped_column(String(255))
    pinterest_user_id: Mapped[str] = mapped_column(String(64))
    username: Mapped[str] = mapped_column(String(255))
    scopes: Mapped[str] = mapped_column(Text)
    access_token_encrypted: Mapped[str] = mapped_column(Text)
    refresh_token_encrypted: Mapped[str | None] = mapped_column(Text)
    access_token_expires_at: Mapped[datetime]
    refresh_token_expires_at: Mapped[datetime | None]
    last_refreshed_at: Mapped[datetime | None]
    status: Mapped[ConnectionStatus] = mapped_column(
        Enum(
            ConnectionStatus,
            name="status",
            native_enum=False,
            create_constraint=True,
            length=32,
            values_callable=lambda statuses: [s.value for s in statuses],
        ),
        default=ConnectionStatus.ACTIVE,
    )
    # Bumped by the ORM on every UPDATE, which also adds `WHERE version = <read value>`:
    # a compare-and-swap that makes a lost concurrent update fail loudly, and lets
    # in-process caches tell a stale token from a fresh one.
    version: Mapped[int] = mapped_column(Integer)
    # A committed claim on the next call to Pinterest's token endpoint (see tokens.py):
    # whoever holds it may spend the refresh token; everyone else waits for the new
    # version or for the lease to run out. Changing it does not bump `version`.
    refresh_lease_owner: Mapped[str | None] = mapped_column(String(32))
    refresh_lease_until: Mapped[datetime | None]
    # The keeper's schedule (see keeper.py): not before this moment may a keeper take the
    # connection (its claim, its jittered due time, or its back-off), and its failures in
    # a row. Like the lease, changing them does not bump `version`.
    keeper_not_before: Mapped[datetime | None]
    keeper_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The refresh-token expiry a `connection.expiring` event went out for (one per token).
    keeper_expiring_for: Mapped[datetime | None]
    # How many webhook events were recorded for it: each one increments it in its own
    # transaction and carries the new value as its `sequence` (webhooks.record_event).
    # Like the lease, changing it does not bump `version`; deferred, as nothing reads it
    # through the ORM (and do not session.merge() a stale copy: merge writes it back).
    webhook_sequence: Mapped[int] = mapped_column(Integer, server_default="0", deferred=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    sessions: Mapped[list[AuthSession]] = relationship(
        back_populates="connection", cascade="all, delete-orphan", passive_deletes=True
    )

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 (SQLAlchemy declares it)

    @property
    def scope_list(self) -> list[str]:
        return [s for s in self.scopes.split(",") if s]


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """A connection as the connections API lists it: no tokens, no ORM bookkeeping.

    A page of a hundred of these costs a fraction of a hundred ORM rows (identity map,
    instance state, two token ciphertexts each) to load.
    """

    id: int
    public_id: str
    end_user_id: str | None
    pinterest_user_id: str
    username: str
    scopes: str
    status: ConnectionStatus
    created_at: datetime
    updated_at: datetime
    last_refreshed_at: datetime | None
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    # For the keeper's next_refresh_at, which the listing shows.
    keeper_not_before: datetime | None

    @property
    def scope_list(self) -> list[str]:
        return [s for s in self.scopes.split(",") if s]


class AuthSession(Base):
    """A browser's login. Only a hash of the cookie's session id is stored."""

    __tablename__ = "sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(index=True)

    connection: Mapped[Connection] = relationship(back_populates="sessions")


class LoginState(Base):
    """A login in progress; deleting the row is what makes its OAuth state single-use."""

    __tablename__ = "login_states"

    nonce_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    # Set when the login came through a connect session: whose connection it makes.
    end_user_id: Mapped[str | None] = mapped_column(String(255))


class ApiKey(Base):
    """A credential of the app's backend. Only a hash of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # The first characters of the key, so people can tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class ConnectSession(Base):
    """A backend's permission for one browser to link a Pinterest account to an end user.

    Only a hash of its token is stored; deleting the row at /auth/login makes it single-use.
    """

    __tablename__ = "connect_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    end_user_id: Mapped[str] = mapped_column(String(255))
    return_to: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ConnectResult(Base):
    """The outcome of a connect session's login, waiting for the app's backend to confirm it.

    A connect link is a bearer link: whoever completes it picks the Pinterest account.
    Only the app knows who is logged in to it, so the login's result is handed back to the
    browser (one-time, stored only as a hash) and counts only once the app confirms it
    for the end user the connect session was minted for.

    For a new connection, `connection_id` is a row in status pending and the token
    columns are empty. For a reconnect of an existing connection, that row keeps serving
    its old tokens, and the new login's tokens wait here (encrypted) until confirmation.
    Deleting the connection deletes its results; deleting a result of a reconnect is what
    drops its token set.
    """

    __tablename__ = "connect_results"

    result_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    end_user_id: Mapped[str] = mapped_column(String(255))
    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), index=True
    )
    expires_at: Mapped[datetime] = mapped_column(index=True)
    # A reconnect's new login, applied to the connection on confirmation.
    username: Mapped[str | None] = mapped_column(String(255))
    scopes: Mapped[str | None] = mapped_column(Text)
    access_token_encrypted: Mapped[str | None] = mapped_column(Text)
    refresh_token_encrypted: Mapped[str | None] = mapped_column(Text)
    access_token_expires_at: Mapped[datetime | None]
    refresh_token_expires_at: Mapped[datetime | None]


class ProxyToken(Base):
    """A short-lived credential acting for one connection on the proxy routes only.

    Handed to code the app's backend runs (the official Pinterest SDK, say) as its
    "access token". Only a hash of it is stored; it dies at `expires_at`, when revoked
    by its `public_id` (or with all of its connection's), and, through the foreign key,
    with its connection.
    """

    __tablename__ = "proxy_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    # What the API names it by (`pt_…`): random, so it says nothing about the token.
    public_id: Mapped[str] = mapped_column(
        String(40), unique=True, default=lambda: new_public_id(PROXY_TOKEN_ID_PREFIX)
    )
    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(index=True)

    connection: Mapped[Connection] = relationship()


class WebhookEventStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


EVENT_ID_PREFIX = "evt_"


def new_event_id() -> str:
    return new_public_id(EVENT_ID_PREFIX)


class WebhookEvent(Base):
    """The webhook outbox: a lifecycle event, written in the transaction of its change.

    The body is stored exactly as it will be sent and signed, so every delivery attempt
    (and a redelivery years later) carries the same bytes.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (
        # The dispatcher's scan: what is due, oldest first.
        Index("ix_webhook_events_status_next_attempt_at", "status", "next_attempt_at"),
        # Per-connection order: is an older event of this connection still pending?
        Index("ix_webhook_events_connection_id_id", "connection_id", "id"),
        # The purge of events past their retention.
        Index("ix_webhook_events_retry_until", "retry_until"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True, default=new_event_id)
    type: Mapped[str] = mapped_column(String(64))
    # The connection's public id, not a foreign key: the event outlives a deleted row.
    connection_id: Mapped[str] = mapped_column(String(40))
    # The connection's count of events at this one (1, 2, …, no gaps), also in the body;
    # None for events recorded before sequences existed.
    sequence: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[WebhookEventStatus] = mapped_column(
        Enum(
            WebhookEventStatus,
            name="status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda statuses: [s.value for s in statuses],
        ),
        default=WebhookEventStatus.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    # Retries stop here (24 hours after the event, or after a redelivery was asked for).
    retry_until: Mapped[datetime]
    # A committed claim by one dispatcher (any replica) on the next delivery attempt; it
    # runs out by itself if that process dies mid-delivery, and the event goes again.
    lease_owner: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(255))


class WebhookAttempt(Base):
    """One delivery attempt of an event: when, how long, and what came back."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime]
    duration_ms: Mapped[int] = mapped_column(Integer)
    # The receiver's status code; None when none came (connection error, timeout).
    response_code: Mapped[int | None] = mapped_column(Integer)
    # delivered, retry or failed: what this attempt decided.
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(String(255))
