"""Connections get the keeper's schedule: when it may next look at them, and its failures.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

The keeper (keeper.py) refreshes connections whose refresh token nears its 60-day end.
`keeper_not_before` is one column for three things, all "not before this moment": a
keeper's claim on a batch (so replicas split the work), a connection's jittered due time,
and its back-off after a transient failure. `keeper_failures` counts failures in a row,
for the back-off. `keeper_expiring_for` is the refresh-token expiry a
`connection.expiring` event was recorded for: one event per refresh token. None of them
bumps the row version: they say nothing about the tokens.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "connections",
        sa.Column("keeper_not_before", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "connections",
        sa.Column("keeper_failures", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "connections",
        sa.Column("keeper_expiring_for", sa.DateTime(timezone=True), nullable=True),
    )
    # The keeper's query: active connections by refresh-token expiry.
    op.create_index(
        "ix_connections_status_refresh_token_expires_at",
        "connections",
        ["status", "refresh_token_expires_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_connections_status_refresh_token_expires_at", table_name="connections")
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("keeper_expiring_for")
        batch.drop_column("keeper_failures")
        batch.drop_column("keeper_not_before")
