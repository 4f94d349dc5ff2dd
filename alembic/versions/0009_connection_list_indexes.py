"""Connections listed by end user and status stay an index range scan at any size.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29

`GET /v1/connections?end_user_id=…&status=…` has both columns as equalities. With
(end_user_id, id) and (status, id) alone, SQLite (which keeps no statistics unless
ANALYZE runs) takes the status index and walks every active connection in key order
looking for the end user's: 0.3 s at 100,000 connections. With all three columns in one
index it reads only the end user's rows of that status, already in key order, on every
backend.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_connections_end_user_id_status_id", "connections", ["end_user_id", "status", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_connections_end_user_id_status_id", "connections")
