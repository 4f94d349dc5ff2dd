"""A mistyped client secret costs no connection: `pinauth serve` and `pinauth sandbox` as
real processes (issue 19, item 1).

pinauth serves a set of connections, then is restarted with a wrong
PINTEREST_CLIENT_SECRET: calls whose tokens Pinterest no longer takes (the sandbox expired
them) need a refresh, and the keeper's start-up pass finds the idle half due. Then it is
restarted with the right secret. Every connection must still be active, with no
`connection.reauthorization_required` event, and serve again. Prints its figures.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.sandbox import SandboxConfig
from tests.helpers import (
    PinauthProcess,
    connect_in_sandbox,
    create_api_key,
    make_settings,
    outbox_types,
    sandboxed_pinauth,
)

REQUESTED = 10  # connections the app calls for while the secret is wrong
IDLE = 10  # connections only the keeper looks after meanwhile
STARTED = "refuses this app's client credentials"
SET_REFRESH_EXPIRY = "UPDATE connections SET refresh_token_expires_at = :at WHERE public_id = :id"


async def metric(client: httpx.AsyncClient, base: str, name: str) -> float:
    for line in (await client.get(f"{base}/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def keeper_pass(client: httpx.AsyncClient, base: str) -> None:
    """Wait for the process's first keeper pass (it runs one at start) to complete."""
    async with asyncio.timeout(60):
        while await metric(client, base, "pinauth_keeper_passes_total") < 1:
            await asyncio.sleep(0.1)


async def set_refresh_expiry(database_url: str, ids: list[str], days: int) -> None:
    """Bring the idle connections inside the keeper's window (as 55 days passing would)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            for public_id in ids:
                await connection.execute(
                    text(SET_REFRESH_EXPIRY),
                    {"at": datetime.now(UTC) + timedelta(days=days), "id": public_id},
                )
    finally:
        await engine.dispose()


async def statuses(database_url: str) -> Counter[str]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT status FROM connections"))
            return Counter(str(row[0]) for row in rows)
    finally:
        await engine.dispose()


async def test_a_wrong_client_secret_for_a_while_costs_no_connection(
    tmp_path: Path, database_url: str
) -> None:
    rig = sandboxed_pinauth(
        tmp_path,
        database_url,
        "/readyz",
        PINAUTH_KEEPER="true",
        PINAUTH_KEEPER_INTERVAL="3600",  # one pass at start, then none during the test
        PINAUTH_ACCESS_LOG="false",
    )
    right = rig.service.env

    def service(**changes: str) -> PinauthProcess:
        return PinauthProcess(rig.service.args, right | changes, tmp_path, rig.service.ready_url)

    key = await create_api_key(make_settings(database_url))
    backend = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    sandbox = httpx.AsyncClient(base_url=rig.sandbox_url, timeout=30)
    first = second = third = None
    try:
        rig.sandbox.start()
        first = service()
        await asyncio.to_thread(first.start)
        ids = [
            await connect_in_sandbox(backend, rig.base, f"user{n}") for n in range(REQUESTED + IDLE)
        ]
        requested, idle = ids[:REQUESTED], ids[REQUESTED:]
        await asyncio.to_thread(first.terminate)

        # Time passes: Pinterest no longer takes the access tokens, the idle connections'
        # refresh tokens near their end. Then a deploy with a mistyped secret.
        await sandbox.post("/_sandbox/expire-access-tokens")
        await set_refresh_expiry(database_url, idle, days=3)
        token_calls_before = (await sandbox.get("/_sandbox/counters")).json()["token_requests"]
        second = service(PINTEREST_CLIENT_SECRET=SandboxConfig().client_secret + "-typo")
        started = time.monotonic()
        await asyncio.to_thread(second.start)
        answers: Counter[str] = Counter()
        retry_afters = []
        for _ in range(3):
            for conn in requested:
                response = await backend.get(
                    f"{rig.base}/pinterest/boards", headers={"Pinauth-Connection-Id": conn}
                )
                answers[f"{response.status_code} {response.json().get('error', '')}"] += 1
                if "retry-after" in response.headers:
                    retry_afters.append(int(response.headers["retry-after"]))
        await keeper_pass(backend, rig.base)
        readiness = (await backend.get(f"{rig.base}/readyz")).json()
        wrong_for = time.monotonic() - started
        token_calls = (await sandbox.get("/_sandbox/counters")).json()["token_requests"]
        await asyncio.to_thread(second.terminate)
        during = await statuses(database_url)
        refused_logged = [line for line in second.log_lines() if STARTED in line["event"]]

        # The secret fixed: every connection works again, through requests and the keeper.
        third = service()
        await asyncio.to_thread(third.start)
        after_answers: Counter[int] = Counter()
        for conn in requested:
            response = await backend.get(
                f"{rig.base}/pinterest/boards", headers={"Pinauth-Connection-Id": conn}
            )
            after_answers[response.status_code] += 1
        await keeper_pass(backend, rig.base)
        refreshed_by_keeper = await metric(
            backend, rig.base, 'pinauth_keeper_refreshes_total{outcome="refreshed"}'
        )
        await asyncio.to_thread(third.terminate)
        reuse = (await sandbox.get("/_sandbox/refresh-token-reuse")).json()["reused"]
    finally:
        await backend.aclose()
        await sandbox.aclose()
        for process in (first, second, third):
            if process is not None:
                process.stop()
        rig.sandbox.stop()

    final = await statuses(database_url)
    events = Counter(kind for kind, _ in await outbox_types(make_settings(database_url)))
    refresh_calls = token_calls.get("refresh_token", 0) - token_calls_before.get("refresh_token", 0)
    span = f"{min(retry_afters, default=0)}-{max(retry_afters, default=0)}"
    print(
        f"\nwrong client secret for {wrong_for:.1f} s, {REQUESTED} connections called 3 times "
        f"and {IDLE} idle ones due for the keeper: answers {dict(answers)}, Retry-After "
        f"{span} s; {refresh_calls} refresh calls reached "
        f"the token endpoint (all 401); /readyz said {readiness['status']!r}; "
        f"{len(refused_logged)} error line. Connections meanwhile {dict(during)}; "
        f"after the fix: calls {dict(after_answers)}, keeper refreshed "
        f"{refreshed_by_keeper:.0f}; connections {dict(final)}; events {dict(events)}; "
        f"refresh tokens reused {reuse}"
    )
    assert answers == Counter({"503 pinterest_client_rejected": 3 * REQUESTED})
    assert all(1 <= seconds <= 15 for seconds in retry_afters)
    assert readiness["status"] == "degraded"
    assert readiness["error"] == "pinterest_client_rejected"
    assert len(refused_logged) == 1
    assert refused_logged[0]["level"] == "error"
    # The first call's, those of the keeper already under way (its concurrency, 4), and
    # one try per 15 s cooldown: not one per call or per connection.
    assert 1 <= refresh_calls <= 1 + 4 + int(wrong_for // 15) + 1
    assert during == Counter({"active": REQUESTED + IDLE})
    assert after_answers == Counter({200: REQUESTED})
    assert refreshed_by_keeper == IDLE
    assert final == Counter({"active": REQUESTED + IDLE})
    assert events == Counter({"connection.created": REQUESTED + IDLE})
    assert reuse == 0
