"""The app's backend as a client: end-user-owned connections, API keys, connect sessions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

Existing connections keep their tokens and sessions; they came from browser logins, so
their end user is NULL and they stay unique per Pinterest account (a partial index).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # Rebuilt on SQLite to drop the constraint; AUTOINCREMENT must survive the rebuild.
    with op.batch_alter_table(
        "connections", table_kwargs={"sqlite_autoincrement": True} if sqlite else {}
    ) as batch:
        batch.add_column(sa.Column("end_user_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("last_refreshed_at", Timestamp, nullable=True))
        batch.drop_constraint(op.f("uq_connections_pinterest_user_id"), type_="unique")
    op.create_index(
        "uq_connections_end_user_id_pinterest_user_id",
        "connections",
        ["end_user_id", "pinterest_user_id"],
        unique=True,
    )
    op.create_index(
        "uq_connections_pinterest_user_id_browser_only",
        "connections",
        ["pinterest_user_id"],
        unique=True,
        sqlite_where=sa.text("end_user_id IS NULL"),
        postgresql_where=sa.text("end_user_id IS NULL"),
    )
    op.create_index("ix_connections_end_user_id_id", "connections", ["end_user_id", "id"])
    op.create_index("ix_connections_status_id", "connections", ["status", "id"])
    op.add_column("login_states", sa.Column("end_user_id", sa.String(length=255), nullable=True))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False),
        sa.Column("last_used_at", Timestamp, nullable=True),
        sa.Column("revoked_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    op.create_table(
        "connect_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("end_user_id", sa.String(length=255), nullable=False),
        sa.Column("return_to", sa.Text(), nullable=True),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_connect_sessions")),
    )
    op.create_index(op.f("ix_connect_sessions_expires_at"), "connect_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("connect_sessions")
    op.drop_table("api_keys")
    op.drop_column("login_states", "end_user_id")
    op.drop_index("ix_connections_status_id", "connections")
    op.drop_index("ix_connections_end_user_id_id", "connections")
    op.drop_index("uq_connections_pinterest_user_id_browser_only", "connections")
    op.drop_index("uq_connections_end_user_id_pinterest_user_id", "connections")
    with op.batch_alter_table("connections") as batch:
        batch.create_unique_constraint(
            op.f("uq_connections_pinterest_user_id"), ["pinterest_user_id"]
        )
        batch.drop_column("last_refreshed_at")
        batch.drop_column("end_user_id")
