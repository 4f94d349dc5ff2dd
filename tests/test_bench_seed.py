"""bench/seed.py writes rows pinauth itself reads: listed, decrypted, logged in with.

`make bench`'s figures at 100,000 connections mean something only if the seeded rows are
what logins write; this checks a few dozen of them through the real service.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from sqlalchemy import select

from pinauth.app import create_app
from pinauth.crypto import TokenCipher
from pinauth.db import create_engine, create_sessionmaker
from pinauth.models import Connection
from pinauth.settings import Settings
from tests.helpers import create_api_key, serve_app

SEED_PY = Path(__file__).parents[1] / "bench" / "seed.py"


def _seed_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_seed", SEED_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses resolve their annotations through sys.modules.
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


async def test_seeded_connections_are_listed_decrypted_and_logged_in_with(
    settings: Settings,
) -> None:
    seed = _seed_module()
    keys = [key.get_secret_value() for key in settings.encryption_keys]
    seeded = await seed.seed(
        settings.database_url,
        keys,
        settings.secret_key.get_secret_value(),
        connections=40,
        end_users=20,
        spread=5,
    )
    assert seeded.connections == 40
    assert len(seeded.spread) == 5
    key = await create_api_key(settings)
    app = create_app(settings)
    async with serve_app(app) as client:
        listed = await client.get(
            "/v1/connections",
            params={"end_user_id": seed.end_user_of(3, 20)},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert listed.status_code == 200, listed.text
        items = listed.json()["items"]
        assert [item["end_user_id"] for item in items] == ["bench_user_3", "bench_user_3"]
        assert items[0]["scopes"] == seed.SCOPES.split(",")
        # The listing (columns only) shows each connection exactly as its own page does
        # (the ORM row), next_refresh_at included.
        for item in items:
            one = await client.get(
                f"/v1/connections/{item['id']}", headers={"Authorization": f"Bearer {key}"}
            )
            assert one.json() == item
        assert items[0]["next_refresh_at"] is not None
        walked = await client.get(
            "/v1/connections", params={"limit": 100}, headers={"Authorization": f"Bearer {key}"}
        )
        assert len(walked.json()["items"]) == 40
        # Each spread connection's cookie is a live session of exactly that connection.
        for public_id, cookie in seeded.spread:
            me = await client.get("/me", headers={"Cookie": f"pinauth_session={cookie}"})
            assert me.status_code == 200, me.text
            assert me.json()["connection_id"] == public_id
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db:
            rows = (await db.execute(select(Connection))).scalars().all()
    finally:
        await engine.dispose()
    cipher = TokenCipher(keys)
    assert all(cipher.decrypt(row.access_token_encrypted).startswith("pina_") for row in rows)
    assert all(
        cipher.decrypt(row.refresh_token_encrypted or "").startswith("pinr_") for row in rows
    )
