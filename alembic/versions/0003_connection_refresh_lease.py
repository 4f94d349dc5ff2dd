"""Connections get a refresh lease, so no token call runs inside a database transaction.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

A refresh used to call Pinterest while holding `SELECT … FOR UPDATE` (and, on SQLite,
no lock at all): a cancelled request, a failed commit or a second process threw the
rotated refresh token away. The lease is committed before the call and cleared by the
write that stores the answer; both columns are empty for connections nobody is refreshing.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "connections", sa.Column("refresh_lease_owner", sa.String(length=32), nullable=True)
    )
    op.add_column(
        "connections",
        sa.Column("refresh_lease_until", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("refresh_lease_until")
        batch.drop_column("refresh_lease_owner")
