"""Fill a migrated pinauth database with many realistic connections, fast.

Rows are what a login through a connect session writes (pinauth's own models, Fernet
ciphertexts of token-shaped strings from pinauth's TokenCipher), inserted in bulk rather
than through 100,000 OAuth logins. `python bench/seed.py URL KEY --connections N` seeds a
database by hand; bench/run.py calls `seed()`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from pinauth.crypto import CookieSigner, TokenCipher, digest
from pinauth.models import AuthSession, Connection, ConnectionStatus, new_public_id

CHUNK = 2_000
SCOPES = "boards:read,boards:write,pins:read,pins:write,user_accounts:read"


@dataclass(frozen=True, slots=True)
class Seeded:
    connections: int
    end_users: int
    seconds: float
    # Connections the proxy is driven through, spread evenly over the key range, each
    # with one browser session: (public id, session cookie value).
    spread: list[tuple[str, str]]


def end_user_of(index: int, end_users: int) -> str:
    # Round robin: an end user's connections lie far apart in the key order, as when
    # people link a second account months after their first.
    return f"bench_user_{index % end_users}"


def _row(index: int, end_users: int, cipher: TokenCipher, now: datetime) -> dict[str, object]:
    created = now - timedelta(seconds=index)
    return {
        "public_id": new_public_id(),
        "end_user_id": end_user_of(index, end_users),
        "pinterest_user_id": str(1_000_000_000_000 + index),
        "username": f"pinner_{index}",
        "scopes": SCOPES,
        # Pinterest's tokens are opaque strings of about this shape and length.
        "access_token_encrypted": cipher.encrypt("pina_" + secrets.token_urlsafe(96)),
        "refresh_token_encrypted": cipher.encrypt("pinr_" + secrets.token_urlsafe(96)),
        "access_token_expires_at": now + timedelta(days=30),
        "refresh_token_expires_at": now + timedelta(days=60),
        "last_refreshed_at": created,
        # A few need their user to log in again, as in any real population.
        "status": (
            ConnectionStatus.REAUTHORIZATION_REQUIRED
            if index % 97 == 0
            else ConnectionStatus.ACTIVE
        ),
        "version": 1,
        "refresh_lease_owner": None,
        "refresh_lease_until": None,
        "created_at": created,
        "updated_at": created,
    }


async def _copy(db: AsyncConnection, rows: list[dict[str, object]]) -> None:
    """COPY instead of INSERT: PostgreSQL loads 100,000 rows several times faster."""
    columns = list(rows[0])
    # asyncpg takes the enum column's stored value, not the Python enum.
    records = [
        tuple(v.value if isinstance(v, ConnectionStatus) else v for v in row.values())
        for row in rows
    ]
    raw = await db.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    await driver.copy_records_to_table(Connection.__tablename__, records=records, columns=columns)


async def seed(
    database_url: str,
    encryption_keys: Sequence[str],
    secret_key: str,
    *,
    connections: int,
    end_users: int,
    spread: int,
) -> Seeded:
    """Insert `connections` rows for `end_users` end users, and a browser session for
    `spread` active ones of them."""
    started = time.perf_counter()
    cipher = TokenCipher(encryption_keys)
    signer = CookieSigner(secret_key, "session")
    now = datetime.now(UTC)
    engine = create_async_engine(database_url)
    try:
        for start in range(0, connections, CHUNK):
            rows = [
                _row(i, end_users, cipher, now)
                for i in range(start, min(start + CHUNK, connections))
            ]
            async with engine.begin() as db:
                if engine.dialect.name == "postgresql":
                    await _copy(db, rows)
                else:
                    await db.execute(insert(Connection), rows)
        async with engine.begin() as db:
            active = (
                select(Connection.id, Connection.public_id)
                .where(
                    Connection.status == ConnectionStatus.ACTIVE,
                    Connection.end_user_id.like("bench_user_%"),
                )
                .order_by(Connection.id)
            )
            candidates = (await db.execute(active)).all()
            step = max(1, len(candidates) // max(spread, 1))
            chosen = candidates[::step][:spread]
            sessions, spread_out = [], []
            for row_id, public_id in chosen:
                session_id = secrets.token_urlsafe(32)
                sessions.append(
                    {
                        "id_hash": digest(session_id),
                        "connection_id": row_id,
                        "created_at": now,
                        "expires_at": now + timedelta(days=30),
                    }
                )
                spread_out.append((public_id, signer.sign(session_id)))
            if sessions:
                await db.execute(insert(AuthSession), sessions)
            if engine.dialect.name == "postgresql":
                # What autovacuum would do soon after a bulk load: fresh planner statistics.
                await db.exec_driver_sql("ANALYZE connections")
                await db.exec_driver_sql("ANALYZE sessions")
    finally:
        await engine.dispose()
    random.shuffle(spread_out)
    return Seeded(connections, end_users, time.perf_counter() - started, spread_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("database_url", help="a migrated pinauth database (SQLAlchemy URL)")
    parser.add_argument("encryption_keys", help="PINAUTH_ENCRYPTION_KEYS of its pinauth")
    parser.add_argument("--secret-key", default="", help="PINAUTH_SECRET_KEY (for sessions)")
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--end-users", type=int)
    parser.add_argument("--spread", type=int, default=0, help="sessions to create")
    args = parser.parse_args()
    seeded = asyncio.run(
        seed(
            args.database_url,
            args.encryption_keys.split(","),
            args.secret_key,
            connections=args.connections,
            end_users=args.end_users or max(1, args.connections // 2),
            spread=args.spread,
        )
    )
    print(f"seeded {seeded.connections} connections in {seeded.seconds:.1f} s")


if __name__ == "__main__":
    main()
