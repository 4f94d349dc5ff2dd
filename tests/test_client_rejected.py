"""Pinterest refusing the app's own client credentials kills no connection (issue 19, 1).

A wrong PINTEREST_CLIENT_SECRET makes the token endpoint answer 401 to every refresh,
whatever the refresh token: no connection may change state and no webhook may go out.
Only a refused grant (400: the refresh token spent, revoked or expired) marks its one
connection. Pinterest is mocked at the edge (respx); time is a clock the test moves.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import respx
from fastapi import FastAPI
from sqlalchemy import update

from pinauth.app import create_app
from pinauth.cli import main
from pinauth.clientstate import (
    CLIENT_REJECTED_COOLDOWN,
    ClientCredentials,
    ClientCredentialsProbe,
)
from pinauth.db import create_engine, create_sessionmaker
from pinauth.errors import PinterestClientRejected, ReauthorizationRequired
from pinauth.logs import TextFormatter
from pinauth.models import Connection, ConnectionStatus
from pinauth.observability import Metrics
from pinauth.pinterest.http import create_http_client
from pinauth.pinterest.oauth import CLIENT_CHECK_REFRESH_TOKEN, PinterestOAuth, TokenRejected
from pinauth.repository import ConnectionRepository
from pinauth.sandbox import SandboxConfig, create_sandbox_app
from pinauth.settings import Settings
from pinauth.webhooks import EventType, record_event
from tests.helpers import (
    API,
    TOKEN_URL,
    ManualClock,
    Replica,
    RotatingTokenEndpoint,
    ServedWithSandbox,
    SimClock,
    captured_logs,
    connect_in_sandbox,
    create_api_key,
    events,
    make_settings,
    outbox_types,
    pinauth_with_sandbox,
    replica,
    seed_connections,
    serve_app,
    stored_connections,
)

AUTHENTICATION_FAILED = {"code": 2, "message": "Authentication failed."}
BOARDS: dict[str, object] = {"items": [], "bookmark": None}
STARTED = "refuses this app's client credentials"
ENDED = "accepts this app's client credentials again"


class TokenEndpoint(RotatingTokenEndpoint):
    """The strict rotating token endpoint, which can also refuse the app's credentials
    (401, code 2, before it looks at the grant), as Pinterest does for a wrong secret."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_client = False
        self.refused = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.refuse_client:
            self.calls += 1
            self.refused += 1
            return httpx.Response(401, json=AUTHENTICATION_FAILED)
        return await super().__call__(request)


@pytest.fixture
def endpoint(pinterest: respx.MockRouter) -> TokenEndpoint:
    fake = TokenEndpoint()
    pinterest.post(TOKEN_URL).mock(side_effect=fake)
    return fake


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def app(settings: Settings, pinterest: respx.MockRouter, clock: ManualClock) -> FastAPI:
    return create_app(settings, transport=httpx.MockTransport(pinterest.async_handler), clock=clock)


@dataclass
class Backend:
    client: httpx.AsyncClient
    key: str

    async def boards(self, connection_id: str) -> httpx.Response:
        return await self.client.get(
            "/pinterest/boards",
            headers={"Authorization": f"Bearer {self.key}", "Pinauth-Connection-Id": connection_id},
        )


@pytest.fixture
async def backend(app: FastAPI, settings: Settings) -> AsyncIterator[Backend]:
    key = await create_api_key(settings)
    async with serve_app(app) as client:
        yield Backend(client, key)


async def seed_expired(settings: Settings, endpoint: TokenEndpoint, count: int) -> list[str]:
    """Connections whose access tokens have expired: every call needs a refresh first."""
    return await seed_connections(
        settings,
        endpoint,
        count,
        refresh_expires_in=timedelta(days=50),
        access_expires_in=timedelta(minutes=-1),
    )


async def statuses(settings: Settings) -> dict[str, str]:
    return {k: str(v["status"]) for k, v in (await stored_connections(settings)).items()}


async def test_a_refused_client_marks_nothing_and_answers_503_until_the_credentials_work(
    backend: Backend,
    pinterest: respx.MockRouter,
    settings: Settings,
    endpoint: TokenEndpoint,
    clock: ManualClock,
) -> None:
    """Guards the app-wide state: a 401 from the token endpoint marks no connection and
    records no event; calls that need a refresh get 503 pinterest_client_rejected with
    Retry-After, without a token call each (one try per cooldown); /readyz says so; one
    error line when it starts, one when it ends; with the credentials working again every
    connection refreshes and serves."""
    ids = await seed_expired(settings, endpoint, 4)
    before = await stored_connections(settings)
    pinterest.get(f"{API}/boards").respond(200, json=BOARDS)
    endpoint.refuse_client = True

    with captured_logs() as logs:
        first = [await backend.boards(conn) for conn in ids]
        readiness = await backend.client.get("/readyz")
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        probe = await backend.boards(ids[0])  # the one try of this cooldown: refused again
        held = await backend.boards(ids[1])
        assert endpoint.refused == 2

        endpoint.refuse_client = False
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        recovered = [await backend.boards(conn) for conn in ids]
        ready = await backend.client.get("/readyz")

    for response in [*first, probe, held]:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "pinterest_client_rejected"
        assert 1 <= int(response.headers["retry-after"]) <= CLIENT_REJECTED_COOLDOWN
    assert first[0].headers["retry-after"] == str(int(CLIENT_REJECTED_COOLDOWN))
    assert readiness.status_code == 200
    assert readiness.json()["status"] == "degraded"
    assert readiness.json()["error"] == "pinterest_client_rejected"
    assert [r.status_code for r in recovered] == [200] * 4
    assert ready.json() == {"status": "ready"}
    # Nothing was marked or reported, and no refresh token was spent while refused.
    assert await outbox_types(settings) == []
    after = await stored_connections(settings)
    assert {k: v["status"] for k, v in after.items()} == dict.fromkeys(ids, "active")
    assert endpoint.reused == []
    assert sorted(endpoint.spent) == sorted(str(before[conn]["refresh"]) for conn in ids)
    started, ended = events(logs, STARTED), events(logs, ENDED)
    assert len(started) == 1
    assert len(ended) == 1
    assert started[0]["level"] == ended[0]["level"] == "error"
    # 2 tries refused by Pinterest, 4 calls refused without one.
    assert "6 token refreshes were refused" in ended[0]["event"]


async def test_a_current_access_token_is_still_used_while_the_client_is_refused(
    backend: Backend, pinterest: respx.MockRouter, settings: Settings, endpoint: TokenEndpoint
) -> None:
    """Guards the fallback: a call whose token is due for refresh but not yet expired
    goes on with it; only calls that truly need a refresh get the 503."""
    (conn,) = await seed_connections(
        settings,
        endpoint,
        1,
        refresh_expires_in=timedelta(days=50),
        access_expires_in=timedelta(seconds=60),  # inside the 300 s refresh margin
    )
    boards = pinterest.get(f"{API}/boards").respond(200, json=BOARDS)
    endpoint.refuse_client = True

    response = await backend.boards(conn)

    assert response.status_code == 200
    assert endpoint.refused == 1
    assert boards.calls.last.request.headers["authorization"] == f"Bearer pina_{0}_0"


async def test_a_refused_grant_marks_only_its_own_connection(
    backend: Backend, pinterest: respx.MockRouter, settings: Settings, endpoint: TokenEndpoint
) -> None:
    """Guards the other branch: a 400 (the refresh token itself spent) marks that one
    connection reauthorization_required with its one event; the others refresh."""
    ids = await seed_expired(settings, endpoint, 3)
    pinterest.get(f"{API}/boards").respond(200, json=BOARDS)
    endpoint.live.discard(f"pinr_{1}_0")  # connection 1's refresh token was spent elsewhere

    answers = [await backend.boards(conn) for conn in ids]

    assert [r.status_code for r in answers] == [200, 401, 200]
    assert answers[1].json()["error"] == "reauthorization_required"
    assert await statuses(settings) == {
        ids[0]: "active",
        ids[1]: "reauthorization_required",
        ids[2]: "active",
    }
    assert await outbox_types(settings) == [("connection.reauthorization_required", ids[1])]
    assert (await backend.client.get("/readyz")).json() == {"status": "ready"}


async def test_the_keeper_pauses_while_the_client_is_refused(
    settings: Settings, pinterest: respx.MockRouter, endpoint: TokenEndpoint
) -> None:
    """Guards the keeper: refused client credentials cost no connection (none marked, no
    failure counted, no event, the row handed back unclaimed); the next pass inside the
    cooldown claims nothing and calls nothing; after it, a pass refreshes them all."""
    clock = SimClock()
    ids = await seed_connections(
        settings, endpoint, 6, refresh_expires_in=timedelta(days=5), now=clock.now()
    )
    endpoint.refuse_client = True

    async with replica(settings, pinterest, clock) as one:
        refused = await one.keeper.run_once()
        calls = endpoint.calls
        rows = await stored_connections(settings)
        paused = await one.keeper.run_once()
        assert one.tokens.client_credentials.rejected

        endpoint.refuse_client = False
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        resumed = await one.keeper.run_once()
        assert not one.tokens.client_credentials.rejected

    # At most the calls already under way when the first 401 came back.
    assert 1 <= calls <= settings.keeper_concurrency
    assert refused.client_rejected == 6
    assert refused.failed == refused.reauthorization_required == refused.refreshed == 0
    for conn in ids:
        assert rows[conn]["status"] == ConnectionStatus.ACTIVE
        assert rows[conn]["keeper_failures"] == 0
        assert rows[conn]["keeper_not_before"] is None
    assert paused.seen == set()
    assert resumed.refreshed == 6
    assert endpoint.calls == calls + 6
    assert await outbox_types(settings) == []


# --- the token endpoint's answers, told apart (oauth.py) ---------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, AUTHENTICATION_FAILED, PinterestClientRejected),
        (401, {"error": "invalid_grant"}, PinterestClientRejected),  # a 401 is the client's
        (401, None, PinterestClientRejected),
        (400, {"error": "invalid_client"}, PinterestClientRejected),
        (400, {"error": "unauthorized_client"}, PinterestClientRejected),
        (400, {"code": 1, "message": "Invalid refresh token."}, TokenRejected),
        (400, {"error": "invalid_grant"}, TokenRejected),
        (400, None, TokenRejected),
        (403, {"code": 29, "message": "not permitted"}, TokenRejected),
    ],
)
async def test_the_token_endpoints_refusals_are_told_apart(
    settings: Settings,
    pinterest: respx.MockRouter,
    status: int,
    body: dict[str, object] | None,
    expected: type[Exception],
) -> None:
    """Guards the classification: the app's credentials refused (401, or an RFC 6749
    client error) against the grant refused (any other 400 or 403)."""
    content = b"not json" if body is None else json.dumps(body).encode()
    pinterest.post(TOKEN_URL).respond(status, content=content)
    async with create_http_client(settings, httpx.MockTransport(pinterest.async_handler)) as http:
        oauth = PinterestOAuth(http, settings, Metrics())
        with pytest.raises(expected):
            await oauth.refresh("pinr_x")


async def test_a_login_whose_code_exchange_meets_a_refused_client_says_so(
    backend: Backend, pinterest: respx.MockRouter, clock: ManualClock
) -> None:
    """Guards the code exchange's part in the app-wide state: a 401 from the token
    endpoint is told apart the same way (503 pinterest_client_rejected, not the login's
    fault; a browser is sent to ?pinauth_error=pinterest_client_rejected) and enters the
    state like a refused refresh: one error line, /readyz degraded. A later exchange that
    Pinterest answers ends it. Without it, no line and /readyz said ready."""
    exchange = pinterest.post(TOKEN_URL)
    exchange.respond(401, json=AUTHENTICATION_FAILED)

    async def callback(*, as_json: bool) -> httpx.Response:
        login = await backend.client.get("/auth/login")
        state = httpx.URL(login.headers["location"]).params["state"]
        return await backend.client.get(
            "/auth/callback",
            params={"code": "c", "state": state},
            headers={"Accept": "application/json"} if as_json else {},
        )

    with captured_logs(logging.WARNING) as logs:
        response = await callback(as_json=True)
        browser = await callback(as_json=False)
        readiness = await backend.client.get("/readyz")
        exchange.respond(400, json={"code": 1, "message": "Invalid authorization code"})
        clock.advance(1)
        refused_code = await callback(as_json=False)
        ready = await backend.client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["error"] == "pinterest_client_rejected"
    assert "retry-after" in response.headers
    assert browser.status_code == 303
    assert "pinauth_error=pinterest_client_rejected" in browser.headers["location"]
    assert readiness.json()["status"] == "degraded"
    assert readiness.json()["error"] == "pinterest_client_rejected"
    assert refused_code.status_code == 303
    assert "pinterest_client_rejected" not in refused_code.headers["location"]
    assert ready.json() == {"status": "ready"}
    started, ended = events(logs, STARTED), events(logs, ENDED)
    assert len(started) == 1
    assert len(ended) == 1
    assert started[0]["level"] == "error"


# --- the probe: the state ends on a replica with no refresh demand -------------------


async def test_the_probe_ends_the_state_with_no_refresh_demand(
    app: FastAPI,
    backend: Backend,
    pinterest: respx.MockRouter,
    settings: Settings,
    endpoint: TokenEndpoint,
    clock: ManualClock,
) -> None:
    """Guards the probe (F6): one refused refresh, then no demand at all, keeper off
    (PINAUTH_KEEPER=false, as in these settings). The probe started with the app checks
    the credentials once per cooldown with a made-up refresh token: refused (401), the
    state stays; accepted (the made-up grant refused with 400), it ends, with one error
    line, and /readyz is ready again. No user's refresh token is ever sent, no connection
    changes. Without the probe /readyz stayed degraded."""
    assert not settings.keeper
    probe = app.state.client_credentials_probe
    assert probe.running
    (conn,) = await seed_expired(settings, endpoint, 1)
    before = await stored_connections(settings)
    endpoint.refuse_client = True

    with captured_logs() as logs:
        assert (await backend.boards(conn)).status_code == 503
        assert (await backend.client.get("/readyz")).json()["status"] == "degraded"
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        await probe.probe()  # due: refused again
        still = await backend.client.get("/readyz")
        endpoint.refuse_client = False
        await probe.probe()  # not due yet: no call
        calls_before_due = endpoint.calls
        clock.advance(CLIENT_REJECTED_COOLDOWN)
        await probe.probe()  # due: the client gets through, the made-up grant is refused
        ready = await backend.client.get("/readyz")

    assert still.json()["status"] == "degraded"
    assert calls_before_due == 2
    assert endpoint.calls == 3
    assert probe.checks == 2
    assert ready.json() == {"status": "ready"}
    assert endpoint.spent == []
    assert endpoint.reused == [CLIENT_CHECK_REFRESH_TOKEN]  # the only grant it ever saw
    assert await outbox_types(settings) == []
    after = await stored_connections(settings)
    assert after[conn]["refresh"] == before[conn]["refresh"]
    assert after[conn]["status"] == "active"
    started, ended = events(logs, STARTED), events(logs, ENDED)
    assert len(started) == 1
    assert len(ended) == 1
    assert ended[0]["level"] == "error"
    assert "1 token refreshes were refused" in ended[0]["event"]  # the probe's not counted


class WatchedProbe(ClientCredentialsProbe):
    """The probe, its pauses on a manual clock, telling the test when it goes idle."""

    def __init__(
        self, credentials: ClientCredentials, oauth: PinterestOAuth, clock: ManualClock
    ) -> None:
        super().__init__(credentials, oauth.check_client)
        self._clock = clock
        self.pauses: list[float] = []
        self.on_pause: list[Callable[[], None]] = []
        self.idle = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        if self.on_pause:
            self.on_pause.pop(0)()
        self._clock.advance(seconds)
        await asyncio.sleep(0)  # a pause lets others run, as the real one does

    async def _until_rejected(self) -> None:
        if self.pauses:  # back to waiting after having checked
            self.idle.set()
        await super()._until_rejected()


async def test_the_probe_loop_checks_once_per_cooldown_until_accepted(
    settings: Settings, pinterest: respx.MockRouter, endpoint: TokenEndpoint, clock: ManualClock
) -> None:
    """The loop, on an injected clock: idle until the state is entered, then one check per
    cooldown (refused, refused, accepted), then idle again."""
    credentials = ClientCredentials(clock)
    endpoint.refuse_client = True
    async with create_http_client(settings, httpx.MockTransport(pinterest.async_handler)) as http:
        probe = WatchedProbe(credentials, PinterestOAuth(http, settings, Metrics()), clock)

        def accept() -> None:
            endpoint.refuse_client = False

        probe.on_pause = [lambda: None, accept]
        probe.start()
        credentials.record_rejected()
        await asyncio.wait_for(probe.idle.wait(), 10)
        await probe.stop()

    assert probe.pauses == [CLIENT_REJECTED_COOLDOWN, CLIENT_REJECTED_COOLDOWN]
    assert endpoint.calls == 2
    assert endpoint.refused == 1
    assert not credentials.rejected


async def test_the_sandbox_checks_the_client_before_the_grant(database_url: str) -> None:
    """What makes the probe sound, on the built-in sandbox as on Pinterest: a made-up
    refresh token with a wrong secret is a 401 (client refused), with the right one a
    400 (the grant refused, so the client was authenticated)."""
    config = SandboxConfig(redirect_uris=("http://localhost:8000/auth/callback",))
    transport = httpx.ASGITransport(create_sandbox_app(config))
    answers: list[type[Exception]] = []
    for secret in ("not-the-secret", config.client_secret):
        settings = make_settings(
            database_url,
            client_id=config.client_id,
            client_secret=secret,
            api_url="http://sandbox.test/v5",
        )
        async with create_http_client(settings, transport) as http:
            with pytest.raises((PinterestClientRejected, TokenRejected)) as raised:
                await PinterestOAuth(http, settings, Metrics()).check_client()
        answers.append(type(raised.value))

    assert answers == [PinterestClientRejected, TokenRejected]


# --- `pinauth connections recheck`, on a real database against the sandbox over HTTP ----


def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, **changes: str) -> None:
    """The environment `pinauth` reads, for the service `settings` describe."""
    values = {
        "PINTEREST_CLIENT_ID": settings.client_id,
        "PINTEREST_CLIENT_SECRET": settings.client_secret.get_secret_value(),
        "PINTEREST_REDIRECT_URI": settings.redirect_uri,
        "PINTEREST_API_URL": settings.api_url,
        "PINAUTH_DATABASE_URL": settings.database_url,
        "PINAUTH_SECRET_KEY": settings.secret_key.get_secret_value(),
        "PINAUTH_ENCRYPTION_KEYS": settings.encryption_keys[0].get_secret_value(),
    } | changes
    for name, value in values.items():
        monkeypatch.setenv(name, value)


async def mark_by_mistake(settings: Settings, public_id: str, at: datetime) -> None:
    """What the old code did to a connection whose refresh token was fine: marked it
    reauthorization_required and recorded its event, in one transaction."""
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as db, db.begin():
            repository = ConnectionRepository(db)
            row = await repository.get(public_id)
            assert row is not None
            assert await repository.replace_version(
                public_id, row.version, {"status": ConnectionStatus.REAUTHORIZATION_REQUIRED}
            )
            current = await repository.get(public_id)
            assert current is not None
            await record_event(db, EventType.REAUTHORIZATION_REQUIRED, current, now=at)
    finally:
        await engine.dispose()


async def connect_through_sandbox(served: ServedWithSandbox, count: int) -> list[str]:
    """`count` end users each connect through a connect session and the sandbox's consent."""
    key = await create_api_key(served.settings)
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=served.base, headers=auth) as backend:
        return [await connect_in_sandbox(backend, served.base, f"u{n}") for n in range(count)]


async def test_connections_recheck_revives_the_marked_connections_whose_tokens_still_work(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards `pinauth connections recheck`: of the connections marked since --since, the
    ones whose stored refresh token Pinterest (the sandbox, over HTTP) still takes become
    active with connection.recovered; a really spent one stays marked; one marked before
    --since is not touched; --id takes one; a refused client changes nothing (exit 2)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    async with pinauth_with_sandbox(database_url) as served:
        settings = served.settings
        a, b, spent, old, other = await connect_through_sandbox(served, 5)
        now = datetime.now(UTC)
        await mark_by_mistake(settings, old, now - timedelta(hours=2))
        for conn in (a, b, spent, other):
            await mark_by_mistake(settings, conn, now)
        # `spent`'s refresh token really is dead: someone used it at Pinterest.
        stored = await stored_connections(settings)
        async with httpx.AsyncClient() as http:
            used = await http.post(
                settings.token_url,
                data={"grant_type": "refresh_token", "refresh_token": stored[spent]["refresh"]},
                auth=(settings.client_id, settings.client_secret.get_secret_value()),
            )
        assert used.status_code == 200
        before_events = len(await outbox_types(settings))

        cli_env(monkeypatch, settings, PINTEREST_CLIENT_SECRET="not-the-secret")
        refused = await asyncio.to_thread(run, "connections", "recheck", "--id", other)
        assert (await statuses(settings))[other] == "reauthorization_required"

        cli_env(monkeypatch, settings)
        since = (now - timedelta(minutes=5)).isoformat()
        rechecked = await asyncio.to_thread(run, "connections", "recheck", "--since", since)
        one = await asyncio.to_thread(run, "connections", "recheck", "--id", old)
        again = await asyncio.to_thread(run, "connections", "recheck", "--id", a)
        after = await stored_connections(settings)
        events_after = await outbox_types(settings)

    assert refused[0] == 2
    assert "refuses this app's client credentials" in refused[2]
    assert rechecked[0] == 0, rechecked
    assert f"{a}: recovered" in rechecked[1]
    assert f"{b}: recovered" in rechecked[1]
    assert f"{other}: recovered" in rechecked[1]
    assert f"{spent}: still rejected" in rechecked[1]
    assert old not in rechecked[1]
    assert "rechecked 4: 3 recovered" in rechecked[1]
    assert one[0] == 0
    assert f"{old}: recovered" in one[1]
    assert f"{a}: not reauthorization_required" in again[1]
    assert {conn: after[conn]["status"] for conn in (a, b, spent, old, other)} == {
        a: "active",
        b: "active",
        spent: "reauthorization_required",
        old: "active",
        other: "active",
    }
    assert after[a]["refresh"] != stored[a]["refresh"]  # rotated, and the new one stored
    assert sorted(events_after[before_events:]) == sorted(
        ("connection.recovered", conn) for conn in (a, b, other, old)
    )


async def test_keeper_once_with_a_refused_client_changes_nothing_and_exits_2(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards `pinauth keeper --once`: with a wrong secret its due connection stays active
    with no event, and the command says why it did nothing (exit 2), not "failed 0"."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    async with pinauth_with_sandbox(database_url) as served:
        (conn,) = await connect_through_sandbox(served, 1)
        engine = create_engine(served.settings)
        try:
            async with create_sessionmaker(engine)() as db, db.begin():
                await db.execute(
                    update(Connection).values(
                        refresh_token_expires_at=datetime.now(UTC) + timedelta(days=3)
                    )
                )
        finally:
            await engine.dispose()
        cli_env(monkeypatch, served.settings, PINTEREST_CLIENT_SECRET="not-the-secret")
        refused = await asyncio.to_thread(run, "keeper", "--once")
        cli_env(monkeypatch, served.settings)
        fixed = await asyncio.to_thread(run, "keeper", "--once")
        events_after = await outbox_types(served.settings)
        after = await statuses(served.settings)

    assert refused[0] == 2
    assert "refreshed 0, failed 0, need reauthorization 0" in refused[1]
    assert "refuses this app's client credentials" in refused[2]
    assert fixed[0] == 0
    assert "refreshed 1, failed 0, need reauthorization 0" in fixed[1]
    assert after == {conn: "active"}
    assert events_after == [("connection.created", conn)]


@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("yesterday", "--since 'yesterday' is not a time; write it"),
        ("0001-01-01T00:00:00+01:00", "--since '0001-01-01T00:00:00+01:00' is out of range"),
        ("9999-12-31T23:00:00-05:00", "--since '9999-12-31T23:00:00-05:00' is out of range"),
    ],
)
def test_connections_recheck_refuses_a_bad_since_in_one_line(
    since: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Guards recheck's --since: a time outside datetime's years once crashed with
    OverflowError; bad input is one line, exit 2, worded like `webhooks redeliver`'s (not
    "cannot start"), before anything is touched."""
    monkeypatch.setenv("PINAUTH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'never.db'}")

    assert main(["connections", "recheck", "--since", since]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pinauth: " + message), err
    assert err.count("\n") == 1
    assert not (tmp_path / "never.db").exists()


# --- log lines about a connection name it, outside a request too (F7) ---------------


async def test_the_token_endpoints_answers_are_logged_with_their_connection(
    settings: Settings,
    pinterest: respx.MockRouter,
    endpoint: TokenEndpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards F7: pinterest/oauth.py does not know whose refresh it is, yet its lines
    about a refused client (401) and a refused grant (400), logged during a refresh with
    no request around it (the keeper's, a recheck's), carry the connection's public id:
    as the JSON format's connection_id, and appended by the text format."""
    # The CLI tests above configure logging as the command does (pinauth's own handler,
    # not propagated): captured here at the root, as in a server's tests.
    monkeypatch.setattr(logging.getLogger("pinauth"), "propagate", True)
    clock = SimClock()
    good, spent = await seed_connections(
        settings, endpoint, 2, refresh_expires_in=timedelta(days=50)
    )
    endpoint.live.remove("pinr_1_0")  # spent elsewhere: the grant is refused
    text = io.StringIO()
    text_handler = logging.StreamHandler(text)
    text_handler.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(text_handler)
    try:
        async with replica(settings, pinterest, clock) as one:
            with captured_logs(logging.WARNING) as logs:
                endpoint.refuse_client = True
                with pytest.raises(PinterestClientRejected):
                    await one.tokens.refresh(await one_row(one, good))
                endpoint.refuse_client = False
                clock.mono += CLIENT_REJECTED_COOLDOWN
                with pytest.raises(ReauthorizationRequired):
                    await one.tokens.refresh(await one_row(one, spent))
    finally:
        logging.getLogger().removeHandler(text_handler)

    [client] = events(logs, "token endpoint refused the app's client credentials (HTTP 401)")
    [grant] = events(logs, "token endpoint rejected refresh_token grant (HTTP 400)")
    assert client["connection_id"] == good
    assert grant["connection_id"] == spent
    lines = text.getvalue().splitlines()
    assert any("(HTTP 401)" in line and line.endswith(f"connection_id={good}") for line in lines)
    assert any("(HTTP 400)" in line and line.endswith(f"connection_id={spent}") for line in lines)
    # A line that names its connection already is not given it twice.
    assert not [line for line in lines if line.count(spent) > 1]


async def one_row(one: Replica, public_id: str) -> Connection:
    async with one.sessionmaker() as db:
        row = await ConnectionRepository(db).get(public_id)
    assert row is not None
    return row
