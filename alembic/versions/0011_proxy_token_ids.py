"""Proxy tokens get a public id (`pt_…`), so that one can be revoked by name.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08

Tokens already minted get an id here, as connections did in 0002; a token's hash stays
its primary key (what every use looks up).
"""

import base64
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _public_id() -> str:
    # A frozen copy of the models' new_public_id("pt_"): migrations never import app code.
    return "pt_" + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def upgrade() -> None:
    op.add_column("proxy_tokens", sa.Column("public_id", sa.String(length=40), nullable=True))
    tokens = sa.table("proxy_tokens", sa.column("token_hash", sa.String()), sa.column("public_id"))
    bind = op.get_bind()
    for (token_hash,) in bind.execute(sa.select(tokens.c.token_hash)).all():
        bind.execute(
            tokens.update().where(tokens.c.token_hash == token_hash).values(public_id=_public_id())
        )
    with op.batch_alter_table("proxy_tokens") as batch:
        batch.alter_column("public_id", existing_type=sa.String(length=40), nullable=False)
        batch.create_unique_constraint(op.f("uq_proxy_tokens_public_id"), ["public_id"])


def downgrade() -> None:
    with op.batch_alter_table("proxy_tokens") as batch:
        batch.drop_constraint(op.f("uq_proxy_tokens_public_id"), type_="unique")
        batch.drop_column("public_id")
