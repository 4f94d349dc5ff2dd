"""Several `pinauth serve` replicas on one PostgreSQL, `pinauth sandbox` as Pinterest."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pinauth.sandbox import SandboxConfig
from tests.helpers import (
    POSTGRES_ADMIN_URL,
    TOKEN_URL,
    Process,
    create_api_key,
    free_port,
    log_in,
    make_settings,
    new_postgres_database,
    run_client,
    stored_refresh_token,
    token_json,
)

# Most of these exercise PostgreSQL itself (advisory locks, row locks, its MVCC under
# storms); the proxy-token storm runs on SQLite too (two processes on one file).
needs_postgres = pytest.mark.skipif(
    not POSTGRES_ADMIN_URL, reason="needs PostgreSQL (PINAUTH_TEST_POSTGRES_URL)"
)

SANDBOX = SandboxConfig()


@pytest.fixture
def deployment(database_url: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    sandbox_port, port_a, port_b = free_port(), free_port(), free_port()
    # Behind a load balancer both replicas share one public callback URL.
    redirect_uri = f"http://127.0.0.1:{port_a}/auth/callback"
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    encryption_key = Fernet.generate_key().decode()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PINAUTH_", "PINTEREST_"))}
    env = base_env | {
        "PINTEREST_CLIENT_ID": SANDBOX.client_id,
        "PINTEREST_CLIENT_SECRET": SANDBOX.client_secret,
        "PINTEREST_REDIRECT_URI": redirect_uri,
        "PINTEREST_AUTHORIZE_URL": f"{sandbox_url}/oauth/",
        "PINTEREST_API_URL": f"{sandbox_url}/v5",
        "PINAUTH_DATABASE_URL": database_url,
        "PINAUTH_SECRET_KEY": "replica-shared-secret-" + "r" * 32,
        "PINAUTH_ENCRYPTION_KEYS": encryption_key,
        "PINAUTH_LOG_LEVEL": "warning",
        "PINAUTH_ACCESS_LOG": "false",
    }
    sandbox = Process(
        ["sandbox", "--port", str(sandbox_port), "--redirect-uri", redirect_uri],
        base_env,
        tmp_path,
        f"{sandbox_url}/_sandbox/counters",
    )
    replicas = [
        Process(["serve", "--port", str(port)], env, tmp_path, f"http://127.0.0.1:{port}/readyz")
        for port in (port_a, port_b)
    ]
    sandbox.start()
    for replica in replicas:  # started together: both migrate at once
        replica.start()
    try:
        for process in (sandbox, *replicas):
            process.wait_ready()
        yield {
            "sandbox": sandbox_url,
            "replicas": replicas,
            "a": f"http://127.0.0.1:{port_a}",
            "b": f"http://127.0.0.1:{port_b}",
            "key": encryption_key,
            "database_url": database_url,
        }
    finally:
        for process in (*replicas, sandbox):
            process.stop()


async def refreshes(sandbox: httpx.AsyncClient) -> int:
    counters = (await sandbox.get("/_sandbox/counters")).json()
    return int(counters["token_requests"].get("refresh_token", 0))


async def storm(browser: httpx.AsyncClient, urls: tuple[str, str], count: int) -> list[int]:
    calls = [browser.get(f"{urls[i % 2]}/pinterest/boards") for i in range(count)]
    return [response.status_code for response in await asyncio.gather(*calls)]


@needs_postgres
async def test_two_replicas_share_logins_and_refresh_exactly_once(
    deployment: dict[str, object],
) -> None:
    a, b = str(deployment["a"]), str(deployment["b"])
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(limits=limits, timeout=60) as browser,
        httpx.AsyncClient(base_url=str(deployment["sandbox"])) as sandbox,
    ):
        # Log in on A; Pinterest sends the browser back to B.
        login = await browser.get(f"{a}/auth/login")
        params = parse_qs(urlsplit(login.headers["location"]).query)
        fields = {k: v[0] for k, v in params.items() if k != "response_type"}
        decision = await sandbox.post("/oauth/", data=fields | {"decision": "allow"})
        callback = urlsplit(decision.headers["location"]).query
        assert (await browser.get(f"{b}/auth/callback?{callback}")).status_code == 303
        assert (await browser.get(f"{a}/me")).json()["username"] == SANDBOX.username
        assert (await browser.get(f"{b}/me")).json()["username"] == SANDBOX.username

        # Every access token expires; 100 calls spread over both replicas.
        await sandbox.post("/_sandbox/expire-access-tokens")
        before = await refreshes(sandbox)
        assert await storm(browser, (a, b), 100) == [200] * 100
        assert await refreshes(sandbox) - before == 1

        # The refresh token in the database is the one Pinterest considers live.
        database_url, key = str(deployment["database_url"]), str(deployment["key"])
        stored = await stored_refresh_token(database_url, key)
        live = (await sandbox.post("/_sandbox/introspect", json={"token": stored})).json()
        assert live == {"active": True, "token_type": "refresh_token"}

        # Restart both replicas: the session and tokens carry on.
        replicas = deployment["replicas"]
        assert isinstance(replicas, list)
        for replica in replicas:
            replica.stop()
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        await sandbox.post("/_sandbox/expire-access-tokens")
        before = await refreshes(sandbox)
        assert await storm(browser, (a, b), 40) == [200] * 40
        assert await refreshes(sandbox) - before == 1
        stored = await stored_refresh_token(database_url, key)
        live = (await sandbox.post("/_sandbox/introspect", json={"token": stored})).json()
        assert live["active"] is True


@needs_postgres
def test_replicas_migrating_together_all_succeed(tmp_path: Path) -> None:
    """Three `pinauth migrate` at once on an empty database: the advisory lock serialises them."""
    with new_postgres_database("pinauth_migrate") as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PINAUTH_")}
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "pinauth", "migrate"],
                env=env | {"PINAUTH_DATABASE_URL": url},
                cwd=tmp_path,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        results = [process.communicate(timeout=60) for process in processes]
        assert [process.returncode for process in processes] == [0, 0, 0], results


@needs_postgres
async def test_refresh_waits_for_a_held_row_lock_only_so_long(
    database_url: str, pinterest: respx.MockRouter
) -> None:
    """Another replica holds the connection row (mid-refresh); this one gives up in time."""
    settings = make_settings(database_url, refresh_lock_timeout_seconds=0.5)
    async with run_client(settings, pinterest) as client:
        await log_in(client, pinterest)
        token_route = pinterest.post(TOKEN_URL).respond(200, json=token_json("pina_N", "pinr_N"))
        other_replica = create_async_engine(database_url)
        try:
            async with other_replica.begin() as connection:
                await connection.execute(text("SELECT id FROM connections FOR UPDATE"))
                started = time.monotonic()
                response = await client.post("/auth/refresh")
                waited = time.monotonic() - started
        finally:
            await other_replica.dispose()

    assert response.status_code == 503
    assert response.json()["error"] == "upstream_error"
    assert int(response.headers["retry-after"]) >= 1
    assert 0.4 < waited < 5
    assert token_route.call_count == 0


@needs_postgres
async def test_connect_sessions_and_backend_storms_span_replicas(
    deployment: dict[str, object],
) -> None:
    """A connect session minted on A completes on B and is confirmed on A; then 100
    concurrent API-key calls with an expired token, over both replicas: one refresh.
    (A connect-session login gives the browser no session: the connection is the
    backend's.)"""
    a, b = str(deployment["a"]), str(deployment["b"])
    settings = make_settings(str(deployment["database_url"]))
    key = await create_api_key(settings)
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(limits=limits, timeout=60) as browser,
        httpx.AsyncClient(
            limits=limits, timeout=60, headers={"Authorization": f"Bearer {key}"}
        ) as backend,
        httpx.AsyncClient(base_url=str(deployment["sandbox"])) as sandbox,
    ):
        minted = await backend.post(f"{a}/v1/connect-sessions", json={"end_user_id": "u-9"})
        token = minted.json()["token"]
        # Through the load balancer in front of both, which passes the public Host on.
        login = await browser.get(
            f"{b}/auth/login",
            params={"connect_session": token},
            headers={"Host": urlsplit(a).netloc},
        )
        assert login.status_code == 302
        params = parse_qs(urlsplit(login.headers["location"]).query)
        fields = {k: v[0] for k, v in params.items() if k != "response_type"}
        decision = await sandbox.post("/oauth/", data=fields | {"decision": "allow"})
        callback = urlsplit(decision.headers["location"]).query
        landed = await browser.get(f"{b}/auth/callback?{callback}")
        assert landed.status_code == 303
        [result] = parse_qs(urlsplit(landed.headers["location"]).query)["pinauth_connect_result"]
        confirmed = await backend.post(
            f"{a}/v1/connections/confirm", json={"result": result, "end_user_id": "u-9"}
        )
        assert confirmed.status_code == 200, confirmed.text
        found = (await backend.get(f"{b}/v1/connections", params={"end_user_id": "u-9"})).json()
        [connection] = found["items"]
        assert connection["id"] == confirmed.json()["id"]

        await sandbox.post("/_sandbox/expire-access-tokens")
        before = await refreshes(sandbox)
        named = {"Pinauth-Connection-Id": connection["id"]}
        calls = [
            backend.get(f"{(a, b)[i % 2]}/pinterest/boards", headers=named) for i in range(100)
        ]
        statuses = [response.status_code for response in await asyncio.gather(*calls)]
        assert statuses == [200] * 100
        assert await refreshes(sandbox) - before == 1


async def test_proxy_token_storm_over_two_replicas_refreshes_once(
    deployment: dict[str, object],
) -> None:
    """Guards the one-refresh rule for proxy-token callers (issue 11), on SQLite and
    PostgreSQL: with the access token expired, 100 concurrent calls carrying proxy
    tokens (one minted on each replica), spread over both replicas and both proxy routes,
    all succeed on exactly one token request, and the stored refresh token is live."""
    a, b = str(deployment["a"]), str(deployment["b"])
    settings = make_settings(str(deployment["database_url"]))
    key = await create_api_key(settings)
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(limits=limits, timeout=60) as caller,
        httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as backend,
        httpx.AsyncClient(timeout=60) as browser,
        httpx.AsyncClient(base_url=str(deployment["sandbox"])) as sandbox,
    ):
        login = await browser.get(f"{a}/auth/login")
        params = parse_qs(urlsplit(login.headers["location"]).query)
        fields = {k: v[0] for k, v in params.items() if k != "response_type"}
        decision = await sandbox.post("/oauth/", data=fields | {"decision": "allow"})
        callback = urlsplit(decision.headers["location"]).query
        assert (await browser.get(f"{b}/auth/callback?{callback}")).status_code == 303
        connection_id = (await browser.get(f"{a}/me")).json()["connection_id"]
        tokens = []
        for replica in (a, b):
            minted = await backend.post(f"{replica}/v1/connections/{connection_id}/proxy-tokens")
            assert minted.status_code == 201, minted.text
            tokens.append(minted.json()["token"])

        await sandbox.post("/_sandbox/expire-access-tokens")
        before = await refreshes(sandbox)
        calls = [
            caller.get(
                f"{(a, b)[i % 2]}{('/pinterest/boards', '/boards')[i // 2 % 2]}",
                headers={"Authorization": f"Bearer {tokens[i // 4 % 2]}"},
            )
            for i in range(100)
        ]
        responses = await asyncio.gather(*calls)
        assert [r.status_code for r in responses] == [200] * 100, responses[0].text
        assert await refreshes(sandbox) - before == 1

        database_url, encryption_key = str(deployment["database_url"]), str(deployment["key"])
        stored = await stored_refresh_token(database_url, encryption_key)
        live = (await sandbox.post("/_sandbox/introspect", json={"token": stored})).json()
        assert live == {"active": True, "token_type": "refresh_token"}
