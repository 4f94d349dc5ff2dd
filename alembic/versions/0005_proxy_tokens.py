"""Proxy tokens: short-lived credentials acting for one connection on the proxy routes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "proxy_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_proxy_tokens_connection_id_connections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_proxy_tokens")),
    )
    op.create_index(op.f("ix_proxy_tokens_connection_id"), "proxy_tokens", ["connection_id"])
    op.create_index(op.f("ix_proxy_tokens_expires_at"), "proxy_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_table("proxy_tokens")
