"""Connections get a random public id, and SQLite never reuses their integer ids.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Without AUTOINCREMENT SQLite hands the highest deleted rowid to the next insert, so an
in-process cache keyed by the integer id served one user's token to the next user who
connected. The table is rebuilt with AUTOINCREMENT (batch mode copies every row, tokens
and sessions untouched), and every existing connection gets a public id.
"""

import base64
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _public_id() -> str:
    # A frozen copy of the models' new_public_id: migrations never import app code.
    return "conn_" + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def upgrade() -> None:
    op.add_column("connections", sa.Column("public_id", sa.String(length=40), nullable=True))
    connections = sa.table("connections", sa.column("id", sa.Integer()), sa.column("public_id"))
    bind = op.get_bind()
    for (connection_id,) in bind.execute(sa.select(connections.c.id)).all():
        bind.execute(
            connections.update()
            .where(connections.c.id == connection_id)
            .values(public_id=_public_id())
        )
    table_kwargs = {"sqlite_autoincrement": True} if bind.dialect.name == "sqlite" else {}
    with op.batch_alter_table(
        "connections",
        recreate="always" if bind.dialect.name == "sqlite" else "auto",
        table_kwargs=table_kwargs,
    ) as batch:
        batch.alter_column("public_id", existing_type=sa.String(length=40), nullable=False)
        batch.create_unique_constraint(op.f("uq_connections_public_id"), ["public_id"])


def downgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.drop_constraint(op.f("uq_connections_public_id"), type_="unique")
        batch.drop_column("public_id")
