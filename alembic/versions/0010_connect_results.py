"""Connect results: a connect session's login counts once the app's backend confirms it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08

A connection made through a connect session starts `pending` (a new status value, so
the status CHECK constraint is rebuilt) and is confirmed with a one-time result whose
hash, end user and, for a reconnect, new token set wait in `connect_results`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def _status_values(values: tuple[str, ...]) -> None:
    """Allow exactly `values` in connections.status (its CHECK constraint, rebuilt)."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    # Rebuilt on SQLite to change the CHECK; AUTOINCREMENT must survive the rebuild.
    batch: BatchOperations
    with op.batch_alter_table(
        "connections", table_kwargs={"sqlite_autoincrement": True} if sqlite else {}
    ) as batch:
        listed = ", ".join(f"'{v}'" for v in values)
        batch.drop_constraint(op.f("ck_connections_status"), type_="check")
        batch.create_check_constraint(op.f("ck_connections_status"), f"status IN ({listed})")


def upgrade() -> None:
    _status_values(("active", "reauthorization_required", "pending"))
    op.create_table(
        "connect_results",
        sa.Column("result_hash", sa.String(length=64), nullable=False),
        sa.Column("end_user_id", sa.String(length=255), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.Column("username", sa.String(length=255), nullable=True),
        sa.Column("scopes", sa.Text(), nullable=True),
        sa.Column("access_token_encrypted", sa.Text(), nullable=True),
        sa.Column("refresh_token_encrypted", sa.Text(), nullable=True),
        sa.Column("access_token_expires_at", Timestamp, nullable=True),
        sa.Column("refresh_token_expires_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_connect_results_connection_id_connections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("result_hash", name=op.f("pk_connect_results")),
    )
    op.create_index(op.f("ix_connect_results_connection_id"), "connect_results", ["connection_id"])
    op.create_index(op.f("ix_connect_results_expires_at"), "connect_results", ["expires_at"])


def downgrade() -> None:
    op.drop_table("connect_results")
    # Unconfirmed connections never existed for anyone; the old schema cannot hold them.
    op.execute("DELETE FROM connections WHERE status = 'pending'")
    _status_values(("active", "reauthorization_required"))
