"""`pinauth rotate-keys`: every stored token re-encrypted under the first key, while
refreshes go on, and no refresh lost; rows no key decrypts need a login, never a 500."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import respx
from cryptography.fernet import Fernet

from pinauth.app import create_app
from pinauth.crypto import TokenCipher
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import PinauthError
from pinauth.models import ConnectionStatus
from pinauth.repository import ConnectionRepository
from pinauth.rotation import KeyRotator
from pinauth.settings import Settings
from tests.helpers import (
    API,
    TOKEN_URL,
    RotatingTokenEndpoint,
    SimClock,
    create_api_key,
    make_settings,
    outbox_types,
    replica,
    seed_connections,
    serve_app,
    stored_connections,
)

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
LIFE = timedelta(days=50)


def keyed(database_url: str, *keys: str) -> Settings:
    return make_settings(database_url, encryption_keys=",".join(keys))


async def refresh_storm(settings: Settings, pinterest: respx.MockRouter, rounds: int) -> int:
    """Refresh every connection `rounds` times, all connections at once; refreshes done."""
    done = 0
    async with replica(settings, pinterest, SimClock()) as one:

        async def keep_refreshing(public_id: str) -> None:
            nonlocal done
            for _ in range(rounds):
                async with one.sessionmaker() as db:
                    row = await ConnectionRepository(db).get(public_id)
                assert row is not None
                try:
                    await one.tokens.refresh(row)
                except PinauthError:
                    continue  # another process's lease outlasted the wait: try again
                done += 1

        ids = list(await stored_connections(settings))
        await asyncio.gather(*(keep_refreshing(public_id) for public_id in ids))
    return done


async def test_rotate_to_a_new_key_during_a_refresh_storm_then_drop_the_old_one(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    endpoint = RotatingTokenEndpoint()
    pinterest.post(TOKEN_URL).mock(side_effect=endpoint)
    await seed_connections(keyed(database_url, KEY_A), endpoint, 40, refresh_expires_in=LIFE)

    # Every replica first learns the new key (first) and keeps the old one, then rotation
    # runs while they serve.
    both = keyed(database_url, KEY_B, KEY_A)
    engine = create_engine(both)
    try:
        rotator = KeyRotator(create_sessionmaker(engine), TokenCipher([KEY_B, KEY_A]), batch_size=7)
        before = await rotator.check()
        storm = asyncio.create_task(refresh_storm(both, pinterest, rounds=5))
        report = await rotator.rotate()
        refreshed = await storm
        after = await rotator.check()
    finally:
        await engine.dispose()

    assert before.by_key == {1: 40}
    assert before.outdated == 40
    assert report.undecryptable == report.gave_up == 0
    assert after.by_key == {0: 40}
    assert after.outdated == after.undecryptable == 0
    assert refreshed > 40
    # No refresh lost: every stored refresh token is the one Pinterest considers live,
    # and no spent one was ever sent again.
    only_b = keyed(database_url, KEY_B)
    stored = await stored_connections(only_b)
    assert {row["refresh"] for row in stored.values()} == endpoint.live
    assert endpoint.reused == []

    # The old key dropped: everything still works.
    assert await refresh_storm(only_b, pinterest, rounds=1) == 40
    stored = await stored_connections(only_b)
    assert {row["refresh"] for row in stored.values()} == endpoint.live
    assert {row["status"] for row in stored.values()} == {ConnectionStatus.ACTIVE}


async def test_a_row_refreshed_between_read_and_write_keeps_its_new_tokens(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Guards the compare-and-swap on the version: a refresh lands between rotation's read
    and its write. Without it, rotation wrote the re-encrypted old (spent) refresh token
    over the new one, and the connection was lost at its next refresh."""
    endpoint = RotatingTokenEndpoint()
    pinterest.post(TOKEN_URL).mock(side_effect=endpoint)
    [public_id] = await seed_connections(
        keyed(database_url, KEY_A), endpoint, 1, refresh_expires_in=LIFE
    )
    both = keyed(database_url, KEY_B, KEY_A)

    async with replica(both, pinterest, SimClock()) as one:

        async def refresh_in_between(_ids: list[str]) -> None:
            if endpoint.calls == 0:
                async with one.sessionmaker() as db:
                    row = await ConnectionRepository(db).get(public_id)
                assert row is not None
                await one.tokens.refresh(row)

        rotator = KeyRotator(
            one.sessionmaker, TokenCipher([KEY_B, KEY_A]), before_write=refresh_in_between
        )
        report = await rotator.rotate()
        usage = await rotator.check()

    assert endpoint.calls == 1
    assert report.retried == 1
    assert usage.by_key == {0: 1}
    stored = await stored_connections(keyed(database_url, KEY_B))
    assert stored[public_id]["refresh"] == "pinr_0_1"


async def test_a_row_no_key_decrypts_needs_a_login_on_the_proxy_path_not_a_500(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    endpoint = RotatingTokenEndpoint()
    [public_id] = await seed_connections(
        keyed(database_url, KEY_A), endpoint, 1, refresh_expires_in=LIFE
    )
    boards = pinterest.get(f"{API}/boards").respond(200, json={"items": []})
    only_b = keyed(database_url, KEY_B)  # key A removed before rotating: an operator error
    key = await create_api_key(only_b)
    headers = {"Authorization": f"Bearer {key}", "Pinauth-Connection-Id": public_id}
    app = create_app(only_b, transport=httpx.MockTransport(pinterest.async_handler))
    async with serve_app(app) as client:
        first = await client.get("/pinterest/boards", headers=headers)
        second = await client.get("/pinterest/boards", headers=headers)
        shown = await client.get(
            f"/v1/connections/{public_id}", headers={"Authorization": f"Bearer {key}"}
        )
    assert first.status_code == second.status_code == 401
    assert first.json()["error"] == "reauthorization_required"
    assert not boards.called
    assert shown.json()["status"] == "reauthorization_required"
    assert shown.json()["next_refresh_at"] is None
    outbox = await outbox_types(only_b)
    assert outbox == [("connection.reauthorization_required", public_id)]


async def test_rotation_marks_rows_no_key_decrypts(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    endpoint = RotatingTokenEndpoint()
    lost = await seed_connections(keyed(database_url, KEY_A), endpoint, 2, refresh_expires_in=LIFE)
    kept = await seed_connections(
        keyed(database_url, KEY_B), endpoint, 3, refresh_expires_in=LIFE, first=2
    )
    engine = create_engine(keyed(database_url, KEY_B))
    try:
        rotator = KeyRotator(create_sessionmaker(engine), TokenCipher([KEY_B]))
        first = await rotator.rotate()
        second = await rotator.rotate()
        usage = await rotator.check()
    finally:
        await engine.dispose()
    assert (first.undecryptable, first.marked, first.already_current) == (2, 2, 3)
    assert (second.undecryptable, second.marked) == (2, 0)
    assert usage.undecryptable == 2
    assert usage.by_key == {0: 3}
    outbox = await outbox_types(keyed(database_url, KEY_B))
    assert sorted(outbox) == sorted(("connection.reauthorization_required", i) for i in lost)
    stored = await stored_connections(keyed(database_url, KEY_B))
    assert {stored[i]["status"] for i in lost} == {ConnectionStatus.REAUTHORIZATION_REQUIRED}
    assert {stored[i]["status"] for i in kept} == {ConnectionStatus.ACTIVE}


def test_rotate_keys_command_prints_counts_and_check_tells_when_done(
    tmp_path: Path, database_url: str
) -> None:
    endpoint = RotatingTokenEndpoint()
    asyncio.run(seed_connections(keyed(database_url, KEY_A), endpoint, 3, refresh_expires_in=LIFE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env |= {
        "PINAUTH_DATABASE_URL": database_url,
        "PINAUTH_SECRET_KEY": "k" * 40,
        "PINAUTH_ENCRYPTION_KEYS": f"{KEY_B},{KEY_A}",
    }

    def pinauth(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pinauth", *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )

    check = pinauth("rotate-keys", "--check")
    assert check.returncode == 1, check.stderr
    assert ": 0" in check.stdout.splitlines()[1]  # key 1 encrypts nothing yet
    assert check.stdout.splitlines()[2].endswith(": 3")  # key 2 all three
    rotate = pinauth("rotate-keys", "--batch-size", "2")
    assert rotate.returncode == 0, rotate.stderr
    assert "re-encrypted 3 rows" in rotate.stdout
    done = pinauth("rotate-keys", "--check")
    assert done.returncode == 0
    assert "the others can be removed" in done.stdout
    # Key B dropped too early (only A configured): the rows are active and unreadable,
    # so the check must not say all is well.
    env["PINAUTH_ENCRYPTION_KEYS"] = KEY_A
    too_early = pinauth("rotate-keys", "--check")
    assert too_early.returncode == 1, too_early.stdout
    assert "3 active rows no configured key decrypts" in too_early.stdout
    for output in (check, rotate, done, too_early):
        assert KEY_A not in output.stdout + output.stderr
        assert KEY_B not in output.stdout + output.stderr
