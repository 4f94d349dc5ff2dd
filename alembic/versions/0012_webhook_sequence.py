"""Webhook events get a per-connection sequence number.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08

`connections.webhook_sequence` counts the events recorded for the connection; recording
one increments it in the event's transaction (an UPDATE, so the row lock orders two
replicas recording for one connection at once), and the event carries the new value as
`sequence` in its payload and in `webhook_events.sequence`. Receivers see a gap as a
missing number. Rows of before this revision start at 0: their next event is 1; older
events have no sequence (NULL), as their payload has none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "connections",
        sa.Column("webhook_sequence", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("webhook_events", sa.Column("sequence", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("sequence")
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("webhook_sequence")
